"""Pure logic of training and the workflow: schedules, gates, configs, lockstep pools."""
from __future__ import annotations

import pytest

from orchestration.workflow import check_gates
from orchestration.workflow_config import Gates
from trainers.config import StageConfig
from trainers.data import Sample, TaskPool, lr_lambda, task_schedule

pytestmark = pytest.mark.unit


def test_task_schedule_follows_paper_ratios_and_interleaves():
    c = task_schedule({"image_rec": 2, "image_und": 1, "video_rec": 6, "video_und": 1})
    assert {t: c.count(t) for t in set(c)} == {"image_rec": 2, "image_und": 1, "video_rec": 6, "video_und": 1}
    assert all(c[i] != c[i + 1] or c[i] == "video_rec" for i in range(len(c) - 1))
    assert task_schedule({"image_rec": 1.0}) == ["image_rec"]
    s3 = task_schedule({"image_rec": 2, "image_und": 1, "video_rec": 4, "video_und": 1, "3d_rec": 1, "3d_und": 1})
    assert s3.count("video_rec") == 4 and s3.count("3d_rec") == 1


def test_lr_warmup_then_cosine_to_min_ratio():
    f = lr_lambda(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_gates_report_which_failed_by_how_much():
    g = Gates(min_image_psnr=20.0, max_image_psnr_drop=1.0, min_video_psnr=None, beat_pca_floor=True)
    assert check_gates(g, {"image_psnr": 25.0, "pca_floor_psnr": 24.0}, {"image_psnr": 25.5}) == []
    fails = check_gates(g, {"image_psnr": 18.5, "pca_floor_psnr": 19.0}, {"image_psnr": 21.0})
    assert any("min_image_psnr" in f and "short by 1.50" in f for f in fails)
    assert any("max_image_psnr_drop" in f and "over by 1.50" in f for f in fails)
    assert any("beat_pca_floor" in f for f in fails)
    assert check_gates(Gates(min_image_psnr=None, max_image_psnr_drop=None), {"image_psnr": 1.0}, None) == []


def test_stage_config_validation_names_keys():
    c = StageConfig()
    with pytest.raises(ValueError, match="data.shards"):
        c.validate()
    c.data.shards = "x"
    c.data.ratios = {"audio_rec": 1.0}
    with pytest.raises(ValueError, match="data.ratios.*audio_rec"):
        c.validate()
    c.data.ratios = {"image_rec": 1.0}
    c.model.fsq, c.model.latent_channels = True, 32
    with pytest.raises(ValueError, match="model.latent_channels"):
        c.validate()
    c.model.fsq = False
    c.scaling.zero_persistence_threshold = -2
    with pytest.raises(ValueError, match="scaling.zero_persistence_threshold"):
        c.validate()
    c.scaling.zero_persistence_threshold, c.data.read_concurrency = -1, -1
    with pytest.raises(ValueError, match="data.read_concurrency"):
        c.validate()


def test_zero3_persistence_threshold_auto_by_device_and_explicit():
    """auto keeps nothing whole on CPU (measured faster over gloo) and DeepSpeed's 1e5 on GPU."""
    from trainers.loop import deepspeed_config

    c = StageConfig()
    zero = lambda gpu: deepspeed_config(c, gpu)["zero_optimization"]  # noqa: E731
    assert zero(False)["stage3_param_persistence_threshold"] == 0 and zero(False)["stage"] == 3
    assert zero(True)["stage3_param_persistence_threshold"] == 100_000
    c.scaling.zero_persistence_threshold = 5000
    assert zero(False)["stage3_param_persistence_threshold"] == zero(True)["stage3_param_persistence_threshold"] == 5000


def test_workflow_config_composes_and_rejects_bad_keys():
    from orchestration.hydra_config import load

    cfg = load("run", ["curriculum=paper", "model=base"])
    assert [s.stage for s in cfg.curriculum.stages] == [1, 2, 3, 4] and cfg.curriculum.stages[3].fsq
    assert cfg.curriculum.stages[1].ratios == {"image_rec": 2.0, "image_und": 1.0, "video_rec": 6.0, "video_und": 1.0}
    with pytest.raises(ValueError, match="curriculum.bogus"):
        load("run", ["curriculum.bogus=1"])
    with pytest.raises(ValueError, match="start_stage"):
        load("run", ["start_stage=3"])
    with pytest.raises(ValueError, match="cluster.num_workers"):
        load("run", ["cluster.num_workers=two"])
    with pytest.raises(ValueError, match="resources.task_resources"):
        load("ingest", ["input=a", "output=b", "+resources.task_resources.GPU=1"])
    with pytest.raises(ValueError, match="model.official_variant"):
        load("run", ["model.init_official=/x.pt", "model.official_variant=3d-gs", "start_stage=3"])
    c = StageConfig()
    c.data.shards, c.data.ratios, c.scaling.custom_resources = "x", {"image_rec": 1.0}, {"train_node": 0}
    with pytest.raises(ValueError, match="scaling.custom_resources"):
        c.validate()


class _Stream:
    def __init__(self, sizes):
        self.sizes, self.i, self.consumed = sizes, 0, 0

    def next(self):
        n = self.sizes[self.i % len(self.sizes)]
        self.i += 1
        self.consumed += 1
        return Sample("image", None, n, "", None, str(self.i))


def test_task_pool_takes_exactly_k_and_refills_the_same_amount():
    pool = TaskPool(_Stream([100, 60, 50, 40, 20, 200, 10, 5]), 6)
    pool.wait()
    best = pool.best_bin(128)
    assert sum(pool.samples[i].tokens for i in best) <= 128
    batch = pool.take(2, 128)  # the ranks agreed on 2 (the minimum over ranks)
    assert len(batch) == 2 and sum(s.tokens for s in batch) <= 128
    pool.wait()
    assert len(pool.samples) == 6 and pool.stream.consumed == 8  # refilled exactly what was taken


def test_task_pool_grows_until_it_can_fill_the_budget():
    """A mix of 1-token digits and 64-token photos: a pool of 8 fills ~70 of a 128-token budget; asking for
    the extra samples its budget needs (equal on every rank) makes later batches full."""
    pool = TaskPool(_Stream([64, 1, 1, 1, 1, 1, 1, 1]), 8)
    pool.wait()
    first = sum(pool.samples[i].tokens for i in pool.best_bin(128))
    assert first < 80 and pool.want(256) > 0
    fills = []
    for _ in range(6):
        pool.wait()
        k, extra = len(pool.best_bin(128)), pool.want(256)
        before = pool.stream.consumed
        batch = pool.take(k, 128, extra)
        pool.wait()
        assert pool.stream.consumed - before == k + extra  # refills exactly what the ranks agreed on
        fills.append(sum(s.tokens for s in batch))
    assert max(fills[2:]) >= 120 and all(f <= 128 for f in fills)
    assert sum(s.tokens for s in pool.samples) >= 128  # the pool keeps enough for a full budget


def test_task_pool_never_starves_small_samples():
    """Two 64-token photos fill a 128-token budget exactly; the 1-token digit between them must still be
    trained on, and the pool must not fill up with digits waiting forever."""
    pool = TaskPool(_Stream([64, 64, 1]), 8)
    sizes, peak = [], 0
    for _ in range(60):
        pool.wait()
        batch = pool.take(len(pool.best_bin(128)), 128, pool.want(256))
        sizes += [s.tokens for s in batch]
        peak = max(peak, len(pool.samples))
    pool.wait()
    waiting = sum(1 for s in pool.samples if s.tokens == 1)
    assert sizes.count(1) >= 15 and waiting <= 4  # digits leave as they arrive (the fullest-bin rule: 0 taken, 61 waiting)
    assert peak <= 16  # bounded look-ahead (the fullest-bin rule alone: 64 samples, no digit ever taken)
    assert sum(sizes) / 60 >= 0.85 * 128  # batches stay nearly full (measured 116 of 128)
