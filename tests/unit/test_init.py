"""The recipe's initialisation and transitions, on real photos: each must do what docs/model.md claims,
measured against the alternative it replaces."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from atoken.config import preset
from atoken.init import (fit_scalar_gains, fsq_switch_from_data, grow_latent_from_data, linear_path_init,
                         standard_init)
from atoken.model import AToken
from atoken.pca_floor import TokenPCA
from atoken.patchify import image_to_tokens

pytestmark = pytest.mark.unit


def _photos() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """64-px crops of real photos (train) and of other photos (held out)."""
    from PIL import Image
    from skimage import data

    def crops(img, n):
        im = np.asarray(Image.fromarray(img).resize((128, 128)))
        return [torch.tensor(im[y:y + 64, x:x + 64] / 127.5 - 1).float() for y in range(0, 65, 32)
                for x in range(0, 65, 32)][:n]

    train = crops(data.astronaut(), 9) + crops(data.coffee(), 9) + crops(data.chelsea(), 9) + crops(data.rocket(), 9)
    held = crops(data.hubble_deep_field()[:512, :512], 4) + crops(np.stack([data.camera()] * 3, -1), 4)
    return train, held


def _psnr(model, images) -> float:
    out = []
    with torch.no_grad():
        for x in images:
            lat, b = model.encode([("image", x)])
            rec = model.decode(lat, b)[0][0].clamp(-1, 1)
            out.append(float(10 * torch.log10(4 / (rec - x).pow(2).mean())))
    return float(np.mean(out))


def _pca_psnr(k, train, held) -> float:
    tok = lambda x: image_to_tokens(x)[0][:, :768]  # noqa: E731
    p = TokenPCA(k).fit(torch.cat([tok(x) for x in train]))
    return float(np.mean([10 * torch.log10(4 / (p.reconstruct(tok(x)).clamp(-1, 1) - tok(x)).pow(2).mean())
                          for x in held]))


@pytest.fixture(scope="module")
def photos():
    return _photos()


@pytest.fixture(scope="module")
def started(photos):
    torch.manual_seed(0)
    m = AToken(preset("tiny", latent_channels=32)).eval()
    info = linear_path_init(m, [("image", x) for x in photos[0]])
    return m, info


def test_standard_init_starts_at_the_mean_image_not_noise():
    torch.manual_seed(0)
    m = AToken(preset("tiny")).eval()
    x = torch.rand(32, 48, 3) * 2 - 1
    noisy = m.decode(*m.encode([("image", x)]))[0]
    standard_init(m)
    flat = m.decode(*m.encode([("image", x)]))[0]
    assert noisy.std() > 0.3 and flat.abs().max() == 0  # zero output layer: mid-grey, whatever the input
    table = m.encoder.pos_embedder.position_embedding.weight
    assert abs(float(table.std()) - table.shape[1] ** -0.5) < 0.02


def test_linear_path_init_starts_at_the_pca_floor_on_held_out_photos(started, photos):
    m, info = started
    train, held = photos
    floor = _pca_psnr(32, train, held)
    assert info["components"] >= 32 and 0 < info["explained_variance"] < 1
    assert abs(_psnr(m, held) - floor) < 0.2, (_psnr(m, held), floor)  # a fresh default init scores ~6 dB
    assert _psnr(m, held) > _psnr(AToken(preset("tiny", latent_channels=32)).eval(), held) + 10


def test_data_growth_opens_the_new_channels_where_zero_growth_cannot(started, photos):
    m, _ = started
    train, held = photos
    plain = copy.deepcopy(m).grow_latent(48)
    grown = copy.deepcopy(m)
    info = grow_latent_from_data(grown, [("image", x) for x in train], 48)
    assert info["method"] == "data" and info["train_mse_after"] < info["train_mse_before"]
    assert _psnr(plain, held) == pytest.approx(_psnr(m, held), abs=1e-4)  # zero growth changes nothing
    assert _psnr(grown, held) > _psnr(plain, held) + 0.3  # the 16 new channels carry detail at once
    assert grown.config.latent_channels == 48 and grown.proj.weight[32:48].abs().sum() > 0


def test_fitted_fsq_switch_beats_plain_fsq_and_keeps_codes_exact(started, photos):
    m, _ = started
    train, held = photos
    base = copy.deepcopy(m).grow_latent(48)
    plain = copy.deepcopy(base).enable_fsq()
    fitted = copy.deepcopy(base)
    info = fsq_switch_from_data(fitted, [("image", x) for x in train])
    assert info["latent_mse_fitted_fsq"] < info["latent_mse_plain_fsq"]
    assert _psnr(fitted, held) > _psnr(plain, held) + 0.3
    codes, batch = fitted.encode([("image", held[0])], codes=True)
    lat, _ = fitted.encode([("image", held[0])])
    assert torch.equal(fitted.decode(codes, batch)[0], fitted.decode(lat, batch)[0])


def test_scalar_gains_fit_the_quantiser_range():
    from atoken.bottleneck import FSQ

    z = torch.randn(2000, 48) * torch.linspace(0.1, 5, 48)  # channels of very different ranges
    fsq = FSQ((4,) * 6, 8)
    g, s, err = fit_scalar_gains(z, lambda x: fsq(x)[0])
    plain = float((fsq(z)[0] - z).pow(2).mean())
    assert err < 0.5 * plain and g[0] > g[-1]  # narrow channels are spread, wide ones squeezed


def test_colour_ridge_is_chosen_on_held_out_assets():
    """Per-asset features that only identify an asset fit its voxels exactly; chosen on random halves of
    the voxels a weak ridge wins, chosen on held-out assets (what a new asset is) a strong one."""
    from atoken.init import _ridge_held_out

    g = torch.Generator().manual_seed(0)
    groups = torch.arange(4).repeat_interleave(60)
    identity = torch.randn(4, 30, generator=g, dtype=torch.float64) * 3  # what tells one asset from another
    X = identity[groups] + 0.1 * torch.randn(240, 30, generator=g, dtype=torch.float64)
    Y = torch.tensor([0.8, -0.5, 0.1, 0.4], dtype=torch.float64)[groups][:, None]  # each asset one colour
    assert _ridge_held_out(X, Y, torch.zeros_like(groups)) <= 1e-2
    assert _ridge_held_out(X, Y, groups) >= 10.0
