"""Metrics and feature-network losses."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atoken.metrics import frechet_distance, linear_probe_accuracy, psnr, retrieval_recall, ssim, zero_shot_accuracy
from atoken.pca_floor import TokenPCA

pytestmark = pytest.mark.unit


def test_psnr_and_ssim():
    x = torch.rand(2, 3, 32, 32)
    y = (x + 0.1).clamp(0, 1)
    mse = (x - y).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(1 / mse))
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim(x, noisy) < 0.9).all() and (ssim(x, noisy) > ssim(x, torch.rand_like(x))).all()


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    shifted = frechet_distance(a, a + np.array([1.0, 0, 0, 0]))
    assert shifted == pytest.approx(1.0, abs=1e-6)  # only the mean moved by 1
    # b = 2a: S2 = 4 S1, tr sqrt(S1 S2) = 2 tr S1, so FD = |mu|^2 + tr S1 exactly
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, a * 2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_matrix_square_root():
    """The sample-space trace equals FID's sqrtm formula, also with fewer samples than dimensions."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    for n1, n2, d in ((300, 200, 6), (12, 9, 40)):
        a, b = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-4)


def test_understanding_metrics():
    emb = torch.eye(4)
    assert zero_shot_accuracy(emb, emb, torch.arange(4)) == 1.0
    assert zero_shot_accuracy(emb, emb, torch.tensor([1, 0, 2, 3])) == 0.5
    r = retrieval_recall(emb + 0.01, emb, ks=(1, 2))
    assert (r["R@1"], r["R@2"]) == (1.0, 1.0)
    assert r["chance@1"] == pytest.approx(0.25) and r["chance@2"] == pytest.approx(0.5)
    assert retrieval_recall(emb, emb.flip(0), ks=(1,))["R@1"] == 0.0
    # keyed: items 0, 1 share caption "a", 2, 3 caption "b"; a query scoring the other copy of its own
    # caption first is a hit, scoring the other caption first a miss
    items = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keyed = retrieval_recall(items, texts, (1,), ["a", "a", "b", "b"], ["a", "b"])
    assert keyed["R@1"] == 1.0 and keyed["chance@1"] == pytest.approx(0.5)
    assert retrieval_recall(items, texts.flip(0), (1,), ["a", "a", "b", "b"], ["a", "b"])["R@1"] == 0.0
    t2v = retrieval_recall(texts, items, (1, 2), ["a", "b"], ["a", "a", "b", "b"])
    assert t2v["R@1"] == 1.0 and t2v["chance@1"] == pytest.approx(0.5)
    assert t2v["chance@2"] == pytest.approx(1 - (2 / 4) * (1 / 3))
    with pytest.raises(ValueError, match="matching"):
        retrieval_recall(texts, items, (1,), ["a", "c"], ["a", "a", "b", "b"])
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (50, 3)), rng.normal(4, 1, (50, 3))])
    y = np.array([0] * 50 + [1] * 50)
    assert linear_probe_accuracy(x[::2], y[::2], x[1::2], y[1::2]) > 0.95


def test_evaluation_subsets_hold_every_group_of_sorted_rows():
    from trainers.evaluate import round_robin

    rows = [{"id": i, "label": str(i // 100), "dataset": "mnist"} for i in range(1000)]  # sorted by label
    rows += [{"id": 1000 + i, "label": None, "dataset": "photos"} for i in range(3)]
    sub = round_robin(rows[:1000], 250)
    counts = {lab: sum(r["label"] == lab for r in sub) for lab in {r["label"] for r in rows[:1000]}}
    assert len(sub) == 250 and set(counts.values()) == {25}  # a plain head held labels 0-2 only
    assert [r["id"] for r in sub if r["label"] == "3"] == list(range(300, 325))  # each group in stored order
    by_ds = round_robin(iter(rows), 10, key="dataset")
    assert sum(r["dataset"] == "photos" for r in by_ds) == 3 and len(by_ds) == 10


def _patch_psnr(rec: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / (rec.clamp(-1, 1) - ref).pow(2).mean()))


def test_pca_floor_improves_with_components_and_fsq_costs_what_its_bits_allow():
    from skimage import data

    from atoken.bottleneck import FSQ
    from atoken.patchify import image_to_tokens

    tok = lambda im: image_to_tokens(torch.tensor(im / 127.5 - 1).float())[0][:, :768]  # noqa: E731
    train, held = tok(data.astronaut()[:256, :256]), tok(data.astronaut()[256:, 256:])
    low, high = (_patch_psnr(TokenPCA(k).fit(train).reconstruct(held), held) for k in (8, 48))
    assert 18 < low < high
    fsq = FSQ((4,) * 6, 8)
    quantised = TokenPCA(48).fit(train).with_quantizer(lambda z: fsq(z)[0], train)
    q = _patch_psnr(quantised.reconstruct(held), held)
    plain = TokenPCA(48).fit(train)
    plain.quantize, plain.gains, plain.scales = (lambda z: fsq(z)[0]), torch.ones(48), torch.ones(48)
    assert _patch_psnr(plain.reconstruct(held), held) < q < high  # fitted gains beat a raw quantiser, lose to float


def test_feature_losses_use_packaged_mobilenet_and_respond_to_structure():
    from atoken.features import FeatureNetwork
    from atoken.losses import ImageReconstructionLoss, LossWeights

    net = FeatureNetwork(resolution=64)
    loss = ImageReconstructionLoss(LossWeights(), net)
    assert loss.describe()["perceptual"] == "mobilenet_v2@64"
    from skimage import data

    img = torch.tensor(data.chelsea()[:128, :128] / 127.5 - 1).permute(2, 0, 1)[None].float()
    same = loss(img, img)
    blurred = torch.nn.functional.avg_pool2d(img, 5, 1, 2)
    blur = loss(blurred, img)
    assert same["perceptual"] < 1e-6 and same["gram"] < 1e-9 and same["clip"] < 1e-5
    assert blur["perceptual"] > 0.01 and blur["total"] > same["total"]
    pred = blurred.clone().requires_grad_()
    loss(pred, img)["total"].backward()
    assert pred.grad.abs().sum() > 0


def test_feature_weights_follow_their_schedule_and_skip_the_network_while_zero():
    from atoken.losses import ImageReconstructionLoss, LossWeights, Scheduled

    w = LossWeights(perceptual=Scheduled(10.0, start=100, ramp=50), gram=Scheduled(0.0), clip=Scheduled(1.0, start=200))
    assert [w.perceptual.at(s) for s in (0, 99, 100, 124, 149, 500)] == [0, 0, 0.2, 5.0, 10.0, 10.0]
    assert w.feature_weights(150) == {"perceptual": 10.0, "gram": 0.0, "clip": 0.0}

    class Counting(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return [x.mean(1, keepdim=True) - 0.5], x.flatten(1)

    loss = ImageReconstructionLoss(w, Counting())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    before = loss(x, -x, step=50)
    assert Counting.calls == 0 and set(before) == {"l1", "mse", "total"}  # no network forward while all weights are 0
    after = loss(x, -x, step=150)
    assert Counting.calls == 2 and after["total"] > before["total"] and "perceptual" in after


def test_missing_weights_name_the_setting(tmp_path):
    from atoken.features import FeatureNetwork
    from atoken.text import text_tower

    with pytest.raises(FileNotFoundError, match="losses.feature_network_path"):
        FeatureNetwork(path=tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="text.path"):
        text_tower("siglip2")
    with pytest.raises(FileNotFoundError, match="losses.feature_network_path"):
        FeatureNetwork("siglip2")


def test_minilm_text_tower_offline():
    from atoken.text import text_tower

    t = text_tower("minilm")
    e = t.encode(["a photo of a cat", "a picture of a cat", "a rocket launch"])
    assert e.shape == (3, 384) and t.dim == 384
    assert e[0] @ e[1] > e[0] @ e[2]
