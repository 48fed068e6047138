"""Pure logic of training and the workflow: schedules, gates, configs, lockstep pools."""
from __future__ import annotations

import itertools

import pytest
import torch

from atoken.config import preset
from atoken.model import AToken
from orchestration.gates import Gates, check_gates
from trainers.config import TrainConfig
from trainers.data import MixedStream, Sample, TaskPool, lr_lambda, task_schedule

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


def _metrics(photos=21.0, floor=20.0, fsq_floor=17.0, discrete=False, video=None, vfloor=None, d3=None, bg=None, probe=None):
    m = {"latent_channels": 48, "discrete": int(discrete), "image/photos/psnr": photos, "image/photos/pca_psnr": floor,
         "image/photos/pca_fsq_psnr": fsq_floor, "image/photos/mean_colour_psnr": 14.0,
         "image/mnist/psnr": 20.0, "image/mnist/pca_psnr": 21.0}
    if video is not None:
        m.update({"video/psnr": video, "video/pca_psnr": vfloor})
    if d3 is not None:
        m.update({"3d/psnr": d3, "3d/background_psnr": bg})
    if probe is not None:
        m["und/mnist/linear_probe_acc"] = probe
    return m


def test_gates_are_relative_to_baselines_and_report_by_how_much():
    g = Gates(image_datasets=["photos"])
    assert check_gates(g, _metrics(), None, ["image_rec"]) == []
    fails = check_gates(g, _metrics(photos=19.5), None, ["image_rec"])
    assert len(fails) == 1 and "image_vs_pca: photos PSNR 19.50 dB < PCA-48 20.00 + 0.10" in fails[0] and "short by 0.60" in fails[0]
    # the margin: sitting at the floor (where the PCA initialisation starts) is not enough
    assert check_gates(g, _metrics(photos=20.05), None, ["image_rec"])
    # every image dataset is gated when none is named: the digits here fall short of their own floor
    assert any("mnist" in f for f in check_gates(Gates(), _metrics(), None, ["image_rec"]))
    # once discrete, the floor is PCA through the same quantiser at the same bits
    assert check_gates(g, _metrics(photos=18.0, discrete=True), None, ["image_rec"]) == []
    assert "PCA+FSQ-48" in check_gates(g, _metrics(photos=16.5, discrete=True), None, ["image_rec"])[0]
    fails = check_gates(g, _metrics(video=24.0, vfloor=25.0, d3=20.0, bg=19.0), None, ["image_rec", "video_rec", "3d_rec"])
    assert any("video_vs_pca" in f and "short by 1.10" in f for f in fails)
    assert any("threed_vs_background" in f and "short by 2.00" in f for f in fails)
    # a trained modality the evaluation did not measure fails its gate
    assert any("no eval video" in f for f in check_gates(g, _metrics(), None, ["image_rec", "video_rec"]))
    prev = _metrics(photos=22.5, probe=0.9)
    fails = check_gates(g, _metrics(photos=21.0, probe=0.7), prev, ["image_rec"])
    assert any("max_image_psnr_drop" in f and "over by 0.50" in f for f in fails)
    assert any("max_understanding_drop" in f and "over by 0.100" in f for f in fails)
    # continuous -> discrete: the drop allowed grows by what the quantiser costs PCA (20.00 - 17.00 here)
    assert check_gates(g, _metrics(photos=18.5, discrete=True), prev, ["image_rec"]) == []
    fails = check_gates(g, _metrics(photos=18.0, discrete=True), prev, ["image_rec"])
    assert len(fails) == 1 and "limit 1.00 + 3.00 the quantiser costs PCA, over by 0.50" in fails[0]
    # between two discrete stages it does not
    assert check_gates(g, _metrics(photos=18.5, discrete=True), _metrics(photos=20.0, discrete=True), ["image_rec"])
    # the gates read the metrics the workflow keeps (numbers only): the discrete flag must survive that
    from orchestration.workflow import _numbers
    assert "PCA+FSQ-48" in check_gates(g, _numbers(_metrics(photos=16.5, discrete=True)), None, ["image_rec"])[0]
    # the probe must beat the same probe on a random encoder by the margin, where understanding trains
    m = {**_metrics(probe=0.79), "und/mnist/probe_random_encoder": 0.77}
    fails = check_gates(g, m, None, ["image_rec", "image_und"])
    assert len(fails) == 1 and "probe_vs_random_encoder: mnist linear probe 0.790 < random encoder 0.770 + 0.030" in fails[0]
    assert check_gates(g, {**m, "und/mnist/linear_probe_acc": 0.81}, None, ["image_rec", "image_und"]) == []
    assert check_gates(g, m, None, ["image_rec"]) == []  # a stage without understanding is not held to it
    off = Gates(image_vs_pca=None, video_vs_pca=None, threed_vs_background=None, max_image_psnr_drop=None,
                max_understanding_drop=None, probe_vs_random_encoder=None)
    assert check_gates(off, _metrics(photos=1.0, video=1.0, vfloor=25), prev, ["image_rec", "video_rec"]) == []


def test_train_config_validation_names_keys():
    c = TrainConfig()
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
    for key, value, match in (("scaling.zero_persistence_threshold", -2, "scaling.zero_persistence_threshold"),
                              ("data.read_concurrency", -1, "data.read_concurrency"),
                              ("data.min_und_samples", 1, "data.min_und_samples"),
                              ("data.rec_dataset_weights", {"photos": -1.0}, "data.rec_dataset_weights"),
                              ("init.fresh", "magic", "init.fresh"), ("optim.betas", [0.9], "optim.betas")):
        bad = TrainConfig()
        bad.data.shards = "x"
        section, leaf = key.split(".")
        setattr(getattr(bad, section), leaf, value)
        with pytest.raises(ValueError, match=match):
            bad.validate()


def _lr_by_part(groups: list[dict]) -> dict[str, float]:
    """part name (enc-wd, logit-nowd, ...) -> its learning rate, through the merged groups' names."""
    return {part: g["lr"] for g in groups for part in g["name"].split("+")}


def test_encoder_lr_multiplier_only_for_a_pretrained_encoder():
    from trainers.engine import param_groups
    from trainers.module import TrainModule
    from trainers.start import gaussian_decoder_for_grid

    c = TrainConfig()
    c.data.shards = "x"
    mod = TrainModule(AToken(preset("tiny")), 384, None, c)
    groups = param_groups(mod, c)
    lrs = _lr_by_part(groups)
    assert lrs["enc-wd"] == lrs["rest-wd"] == c.optim.lr  # a fresh encoder learns at the full rate
    # parts that share lr and weight decay share a group: one gradient norm and all-reduce each in ZeRO-3's step
    assert len(groups) == 2 and {g["weight_decay"] for g in groups} == {0.0, c.optim.weight_decay}
    c.model.siglip2_path = "/siglip2"
    lrs = _lr_by_part(param_groups(mod, c))
    assert lrs["enc-wd"] == pytest.approx(0.1 * c.optim.lr) and lrs["rest-wd"] == c.optim.lr
    assert lrs["logit-nowd"] == c.optim.lr  # the sigmoid loss's t and b: their own multiplier (1 by default)
    c.optim.logit_lr_mult = 100
    assert _lr_by_part(param_groups(mod, c))["logit-nowd"] == pytest.approx(100 * c.optim.lr)
    c.optim.encoder_lr_mult = 0.5
    assert _lr_by_part(param_groups(mod, c))["enc-nowd"] == pytest.approx(0.5 * c.optim.lr)
    mod.model.attach_gaussian_decoder(gaussian_decoder_for_grid(None, 8))
    c.optim.gaussian_lr_mult = 0.3
    groups = param_groups(mod, c)
    lrs = _lr_by_part(groups)
    assert lrs["gs-wd"] == pytest.approx(0.3 * c.optim.lr) and lrs["rest-wd"] == c.optim.lr
    assert len(groups) == len({(g["lr"], g["weight_decay"]) for g in groups})  # no two groups alike
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in mod.parameters() if p.requires_grad)


def test_zero3_persistence_threshold_auto_by_device_and_explicit():
    """auto keeps nothing whole on CPU (measured faster over gloo) and DeepSpeed's 1e5 on GPU."""
    from trainers.engine import deepspeed_config

    c = TrainConfig()
    zero = lambda gpu: deepspeed_config(c, gpu)["zero_optimization"]  # noqa: E731
    assert zero(False)["stage3_param_persistence_threshold"] == 0 and zero(False)["stage"] == 3
    assert zero(True)["stage3_param_persistence_threshold"] == 100_000
    c.scaling.zero_persistence_threshold = 5000
    assert zero(False)["stage3_param_persistence_threshold"] == zero(True)["stage3_param_persistence_threshold"] == 5000


def test_zero_overrides_reach_deepspeed_and_bad_keys_are_named():
    """Extra zero_optimization keys go through the config tree; DeepSpeed's own model rejects unknown ones
    at start-up, and keys the tree owns elsewhere point there."""
    from orchestration.hydra_config import load
    from trainers.engine import deepspeed_config

    cfg = load("run", ["+train.scaling.zero_overrides.stage3_prefetch_bucket_size=1000"])
    s1 = cfg.stage_train_config(0)
    assert deepspeed_config(s1, False)["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    cfg.validate()
    s1.data.shards = "x"
    for overrides, match in (({"stage3_prefetch_bucket_sise": 1}, r"zero_overrides\.stage3_prefetch_bucket_sise: Extra"),
                             ({"stage3_max_live_parameters": "many"}, r"zero_overrides\.stage3_max_live_parameters"),
                             ({"stage": 2}, "stage 3 is the trainer's design"),
                             ({"stage3_param_persistence_threshold": 0}, "scaling.zero_persistence_threshold"),
                             ({"stage3_module_granularity_threshold": 10 ** 9},
                              r"zero_overrides\.stage3_module_granularity_threshold: .*scaling\.zero_leaf_modules")):
        s1.scaling.zero_overrides = overrides
        with pytest.raises(ValueError, match=match):
            s1.validate()


def test_a_rank_imports_deepspeed_without_mlflow_and_mlflow_stays_importable():
    """`import deepspeed` pulls in MLflow (its autotuner's optional import); a training rank's import leaves
    it out and does not poison the name for code that imports MLflow later. A fresh process, since this
    one may already hold both."""
    import subprocess
    import sys

    code = ("import sys; from trainers.engine import import_deepspeed; ds = import_deepspeed(); "
            "print('got', int('mlflow' in sys.modules), int(ds.autotuning.autotuner.has_mlflow)); "
            "import mlflow; print('got', int(sys.modules['mlflow'] is not None))")

    def run(code: str) -> list[str]:  # DeepSpeed logs to stdout too: keep the lines this code printed
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return [w for line in out.splitlines() if line.startswith("got ") for w in line.split()[1:]]

    assert run(code) == ["0", "0", "1"]
    assert run("import sys, deepspeed; print('got', int('mlflow' in sys.modules))") == ["1"]  # what the helper exists for: the plain import does load MLflow


def test_zero_leaf_modules_mark_the_named_blocks_and_bad_names_are_named():
    """`scaling.zero_leaf_modules` (a Hydra override) marks exactly the modules of the named class for
    ZeRO-3; a name that is no model class fails validation naming the key."""
    from atoken.layers import TransformerBlock
    from orchestration.hydra_config import load
    from trainers.engine import mark_leaf_modules
    from trainers.module import TrainModule

    cfg = load("run", ["train.scaling.zero_leaf_modules=[TransformerBlock]"])
    s1 = cfg.stage_train_config(0)
    mod = TrainModule(AToken(preset("tiny")), 384, None, s1)
    marked = mark_leaf_modules(mod, s1)
    blocks = [m for m in mod.modules() if isinstance(m, TransformerBlock)]
    assert blocks and {id(m) for m in marked} == {id(m) for m in blocks}
    assert {id(m) for m in mod.modules() if getattr(m, "_z3_leaf", False)} == {id(m) for m in blocks}
    assert mark_leaf_modules(TrainModule(AToken(preset("tiny")), 384, None, s1), TrainConfig()) == []  # the default marks nothing
    s1.data.shards = "x"
    s1.scaling.zero_leaf_modules = ["TransformerBlock", "TransfomerBlock"]
    with pytest.raises(ValueError, match=r"scaling\.zero_leaf_modules: TransfomerBlock: no module class"):
        s1.validate()


def test_one_config_tree_stages_override_train_and_errors_name_the_key():
    from orchestration.hydra_config import load

    cfg = load("run", ["curriculum=paper", "model=base"])
    assert [s.stage for s in cfg.curriculum.stages] == [1, 2, 3, 4]
    s4 = cfg.stage_train_config(3)
    assert s4.model.fsq and s4.model.preset == "base" and s4.steps == 100000 and s4.optim.lr == 3e-4
    assert cfg.stage_train_config(1).data.ratios == {"image_rec": 2.0, "image_und": 1.0, "video_rec": 6.0, "video_und": 1.0}
    # every leaf of the training tree is reachable, for all stages or for one
    cfg = load("run", ["train.losses.perceptual.weight=5", "train.losses.perceptual.start=300",
                       "curriculum.stages.1.optim.lr=0.01", "train.optim.betas=[0.8,0.9]", "train.init.fresh=zero"])
    s1, s2 = cfg.stage_train_config(0), cfg.stage_train_config(1)
    assert s1.losses.perceptual.weight == s2.losses.perceptual.weight == 5 and s1.losses.perceptual.at(299) == 0
    assert s2.optim.lr == 0.01 and s1.optim.lr != 0.01 and s2.optim.betas == [0.8, 0.9] and s2.init.fresh == "zero"
    assert "curriculum" in cfg.resolved_yaml() and "perceptual" in cfg.resolved_yaml()
    for override, match in (("curriculum.bogus=1", "curriculum.bogus"), ("start_stage=3", "start_stage"),
                            ("train.scaling.num_workers=two", "train.scaling.num_workers"),
                            ("train.losses.perceptal=1", "train.losses.perceptal")):
        with pytest.raises(ValueError, match=match):
            load("run", [override]).validate()
    for override, match in (("curriculum.stages.0.steps=-5", r"curriculum\.stages\.0\.steps: -5"),
                            ("train.scaling.num_workers=0", r"^train\.scaling\.num_workers"),
                            ("curriculum.stages.1.optim.lr=-1", r"curriculum\.stages\.1\.optim\.lr"),
                            ("train.optim.lr=-1", r"^train\.optim\.lr"),
                            ("ingest.video.frames_per_clip=6", "video.frames_per_clip"),
                            ("eval.max_items=0", "eval.max_items")):
        with pytest.raises(ValueError, match=match):
            load("run", [override]).validate()
    with pytest.raises(ValueError, match="resources.task_resources"):
        load("ingest", ["input=a", "output=b", "+resources.task_resources.GPU=1"])
    with pytest.raises(ValueError, match="model.official_variant"):
        load("run", ["train.model.init_official=/x.pt", "train.model.official_variant=3d-gs", "start_stage=3"]).validate()
    c = TrainConfig()
    c.data.shards, c.data.ratios, c.scaling.custom_resources = "x", {"image_rec": 1.0}, {"train_node": 0}
    with pytest.raises(ValueError, match="scaling.custom_resources"):
        c.validate()


def test_train_step_key_follows_every_training_knob_and_only_those():
    from dataclasses import replace

    from orchestration.workflow import train_key

    base = TrainConfig()
    k = train_key(base, "index", "1")
    assert train_key(TrainConfig(), "index", "1") == k
    changed = TrainConfig()
    changed.optim.warmup_steps += 1
    assert train_key(changed, "index", "1") != k
    changed = TrainConfig()
    changed.scaling.num_workers = 4
    assert train_key(changed, "index", "1") != k
    assert train_key(base, "other-index", "1") != k and train_key(base, "index", "2") != k
    # what the workflow derives from the inputs is represented by the inputs, not by paths
    derived = replace(base, run=replace(base.run, name="stage1-abc"), data=replace(base.data, shards="s3://x"))
    assert train_key(derived, "index", "1") == k


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


def test_task_pool_tops_up_the_agreed_count_towards_the_budget():
    """The ranks agree on the fewest samples any fullest bin holds (2, here a rank of 64-token photos);
    a rank whose fullest bin held three smaller samples takes its best two within the budget, not the
    first two of that bin (84 of 128 tokens: the other rank waited for the fuller one at every step)."""
    full, other = TaskPool(_Stream([64]), 6), TaskPool(_Stream([70, 50, 40, 40, 44]), 5)
    full.wait(), other.wait()
    k = min(len(full.best_bin(128)), len(other.best_bin(128)))
    assert k == 2 and len(other.best_bin(128)) == 3
    sizes = [s.tokens for s in other.samples]
    best_pair = max(a + b for a, b in itertools.combinations(sizes, 2) if a + b <= 128)
    batch = other.take(k, 128)
    assert len(batch) == k and sum(s.tokens for s in batch) == best_pair


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


class _MixedSizes:
    """Half 4-token digits, half 35-64-token photos: the kind of draw (digit or photo) in the same order on
    every rank, as MixedStream draws it, the photos' sizes each rank's own (its augmentation)."""

    def __init__(self, rank: int):
        import numpy as np

        self.kind, self.size, self.consumed = np.random.default_rng(7), np.random.default_rng([3, rank]), 0

    def next(self):
        self.consumed += 1
        n = 4 if self.kind.random() < 0.5 else int(self.size.integers(35, 65))
        return Sample("image", None, n, "", None, str(self.consumed))


def test_lockstep_pools_serve_small_samples_within_a_bounded_wait():
    """Two ranks agree each step on how many samples to take (the fewest any fullest bin holds) and how
    many to add; each then takes its own. Small samples must leave within a few steps of arriving, and the
    batches stay full on both ranks. With only the oldest overdue sample taken per step, digits waited up to
    33 steps here, the pool grew to 97 samples and the ranks filled 98.0% / 98.8% of the budget; taking
    every overdue one without letting the rank's top-up replace them filled 95.0% / 96.4%."""
    budget, steps = 256, 300
    pools = [TaskPool(_MixedSizes(r), 8, max_wait=4) for r in range(2)]
    arrived: list[dict[str, int]] = [{}, {}]
    waits, tokens, peak = [], [[], []], 0
    for step in range(steps):
        for r, p in enumerate(pools):
            p.wait()
            for smp in p.samples:
                arrived[r].setdefault(smp.sample_id, step)
        bests = [p.best_bin(budget) for p in pools]
        k, extra = min(len(b) for b in bests), max(p.want(2 * budget) for p in pools)
        for r, p in enumerate(pools):
            batch = p.take(k, budget, extra, bests[r])  # as TaskData.next: the bin packed for the agreement
            assert len(batch) == k  # the lockstep: every rank takes the agreed count
            tokens[r].append(sum(s.tokens for s in batch))
            waits += [step - arrived[r][s.sample_id] for s in batch]
            peak = max(peak, len(p.samples))
    settled = slice(50, None)
    fill = [sum(t[settled]) / (budget * (steps - 50)) for t in tokens]
    assert min(fill) >= 0.985, fill  # measured 0.994 / 0.996
    assert max(waits) <= 20, max(waits)  # measured 13
    assert peak <= 80, peak  # measured 59


class _Rows:
    """A stand-in for a Ray Train dataset shard: iter_rows() over fixed rows (one pass each call)."""

    def __init__(self, rows):
        self.rows = rows

    def iter_rows(self):
        return iter(self.rows)


def _image_row(i: int, size: int, dataset: str, caption: str) -> dict:
    import numpy as np

    px = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return {"modality": "image", "frames": 1, "height": size, "width": size, "channels": 3, "pixel_encoding": "raw",
            "pixels": [px.tobytes()], "caption": caption, "label": None, "sample_id": f"{dataset}{i}", "dataset": dataset}


def test_mixed_streams_draw_the_same_rows_per_stream_on_every_rank():
    """The draw order of a dataset mixture is seeded by the task, not the rank, so two ranks take the same
    number of rows from each stream (the lockstep streaming_split and ZeRO-3 need) at the planned shares."""
    from trainers.data import TaskStream

    def ranks_streams(rank):
        streams = {k: TaskStream(lambda epoch, k=k: iter([_image_row(j, 32, k, "c") for j in range(1000)]), 256, key=k,
                                 rng=np.random.default_rng([0, rank])) for k in ("image_rec@photos", "image_rec@mnist")}
        return MixedStream(streams, {"image_rec@photos": 0.75, "image_rec@mnist": 0.25}, [0, 7]), streams

    import numpy as np

    (m0, s0), (m1, s1) = ranks_streams(0), ranks_streams(1)
    for _ in range(400):
        a, b = m0.next(), m1.next()
        assert a.stream == b.stream
    assert {k: v.consumed for k, v in s0.items()} == {k: v.consumed for k, v in s1.items()}
    assert 0.68 < s0["image_rec@photos"].consumed / 400 < 0.82


def test_understanding_batches_hold_their_negatives():
    """A 3D-sized sample would fill the budget alone (no negatives); understanding samples are capped at
    budget / min_und_samples tokens, so every batch holds at least that many samples."""
    from trainers.data import TaskData

    c = TrainConfig()
    c.data.shards, c.data.ratios, c.data.token_budget, c.data.min_und_samples = "x", {"image_und": 1.0}, 64, 4
    c.data.augment, c.data.shuffle_buffer = False, 0  # the stand-in shard has no Ray Data shuffle
    rows = [_image_row(i, 128, "photos", f"caption {i % 3}") for i in range(40)]  # 64 tokens each, uncapped
    data = TaskData(c, {"image_und": _Rows(rows)}, None, 0)
    for _ in range(5):
        batch, _ = data.next("image_und")
        assert len(batch) >= 4 and sum(s.tokens for s in batch) <= 64


def test_identical_captions_are_positives_not_negatives():
    from trainers.module import caption_targets

    t = caption_targets(["a handwritten digit zero", "a cat", "a handwritten digit zero"])
    assert t.tolist() == [[1, -1, 1], [-1, 1, -1], [1, -1, 1]]


def test_ema_decay_warms_up_to_its_target():
    from trainers.ema import ShardedEMA

    ema = ShardedEMA(torch.nn.Linear(2, 2), 0.999)
    d = [ema.decay_at(n) for n in (1, 10, 100, 10_000)]
    assert d[0] < 0.2 and d == sorted(d) and d[-1] == 0.999  # early updates track closely, later ones average


def test_console_summary_and_registry_text_show_understanding_beside_its_baselines():
    """The eval line, the summary row and the MLflow description each carry the retrieval figures with
    what they are compared with; the description names each metric in full (it used to print the dataset
    alone, e.g. 'video_retrieval 0.625' for every retrieval figure)."""
    from orchestration.tracking import describe_version
    from orchestration.workflow import eval_line, summary_table

    m = {"und/mnist/linear_probe_acc": 0.91, "und/mnist/probe_random_encoder": 0.77, "und/mnist/probe_pixels": 0.86,
         "und/mnist/zero_shot_acc": 0.89, "und/video_retrieval/v2t_r1": 0.625,
         "und/video_retrieval/random_encoder_v2t_r1": 0.125, "und/video_retrieval/v2t_chance_r1": 0.5,
         "und/video_retrieval/t2v_r1": 1.0}
    line = eval_line(m)
    assert "mnist probe 0.91 (random encoder 0.77, pixels 0.86), 0-shot 0.89" in line
    assert "video->text R@1 0.62 (random encoder 0.12, chance 0.50)" in line and "image->text" not in line
    head, row = summary_table([{"stage": 2, "version": 7, "metrics": m, "gates": "pass", "aliases": ["stage2"]}])
    assert "video->text" in head and "0.91/0.77" in row and "0.62/0.12" in row
    text = describe_version(2, m)
    assert "video_retrieval/v2t_r1 0.625" in text and "video_retrieval/t2v_r1 1.000" in text
    assert "mnist/linear_probe_acc 0.910" in text


def test_idle_stream_pause_backs_off_only_while_the_scheduling_loop_does_not_block():
    """Fast loop steps (no task in flight) sleep, doubling up to the cap; a step that blocked resets."""
    import pipelines.idle_backoff as ib

    clock = {"t": 0.0}
    slept = []

    def sleep(s):
        slept.append(s)
        clock["t"] += s
    cb = ib.IdleLoopBackoff(clock=lambda: clock["t"], sleep=sleep)

    def step(duration):
        clock["t"] += duration
        n = len(slept)
        cb.on_execution_step(None)
        return slept[n] if len(slept) > n else 0.0

    assert step(0.0005) == 0.0  # the first step has nothing to compare with
    pauses = [step(0.0005) for _ in range(9)]
    assert pauses[:3] == [ib.FIRST_PAUSE_S, 2 * ib.FIRST_PAUSE_S, 4 * ib.FIRST_PAUSE_S]
    assert max(pauses) == ib.MAX_PAUSE_S and pauses[-1] == ib.MAX_PAUSE_S
    assert step(0.1) == 0.0  # blocked in ray.wait for a running task: no pause, and the next fast step
    assert step(0.0005) == ib.FIRST_PAUSE_S  # starts the ramp again


def test_a_streams_pass_covers_its_stage_even_when_augmentation_shrinks_every_sample(monkeypatch):
    """12 photos of 4x4 patches (16 tokens full size) average 12.25 tokens after the augmentation's crop:
    the listed pass must still hold every row the stage's image_rec steps take, on both workers."""
    import pipelines.reader as reader
    from trainers.stage import passes_per_stage

    monkeypatch.setattr(reader, "dataset_counts", lambda *a, **k: {"photos": 12})
    monkeypatch.setattr(reader, "token_count", lambda *a, **k: 12 * 16)
    cfg = TrainConfig(steps=500)
    cfg.data.ratios = {"image_rec": 1.0, "image_und": 2.0}
    cfg.data.token_budget = 256
    repeat = passes_per_stage(cfg, "image_rec", {"image_rec@photos": 1.0})["image_rec@photos"]
    rec_steps = 500 / 3
    taken = rec_steps * cfg.scaling.num_workers * 256 / 12.25  # rows the augmented stream consumes
    assert repeat * 12 >= taken
    assert repeat <= 1000


def test_token_balance_is_the_mean_share_of_the_fullest_rank():
    from trainers.metrics import token_balance

    # step 1: both ranks 100 tokens; step 2: 80 against 100 (the lighter rank idles a fifth of its step)
    assert token_balance(torch.tensor([[100.0, 80.0], [100.0, 100.0]])) == pytest.approx((1.0 + 0.9) / 2)
    assert token_balance(torch.tensor([[64.0, 48.0]])) == 1.0  # one rank: nothing to wait for
    assert token_balance(torch.empty(2, 0)) == 1.0
