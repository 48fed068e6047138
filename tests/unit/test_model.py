"""AToken model: packing, RoPE, attention isolation, presets, latents, semantic head, API."""
from __future__ import annotations

import pytest
import torch

from atoken.bottleneck import FSQ
from atoken.config import ATokenConfig, preset
from atoken.layers import RotaryEmbedding4D
from atoken.model import AToken
from atoken.patchify import (image_to_tokens, pack, tokens_to_video, unpack, video_to_tokens,
                             voxel_features_from_views)
from atoken.sparse import SparseBatch, segments

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AToken(preset("tiny")).eval()


@pytest.mark.parametrize("shape", [(1, 64, 48), (1, 70, 53), (9, 33, 50), (16, 32, 32), (5, 17, 17)])
def test_patchify_unpatchify_is_exact_after_crop(shape):
    T, H, W = shape
    x = torch.rand(T, H, W, 3) * 2 - 1
    if T == 1:
        feats, coords, kept = image_to_tokens(x[0])
        assert feats[:, 768:].abs().sum() == 0  # zero-padded frames
    else:
        feats, coords, kept = video_to_tokens(x)
    back = tokens_to_video(feats, coords, kept)
    h, w = H - H % 16, W - W % 16
    top, left = (H - h) // 2, (W - w) // 2
    t = 1 if T == 1 else T - T % 4
    assert torch.equal(back, x[:t, top:top + h, left:left + w])
    assert coords[:, 1:].tolist() == sorted(coords[:, 1:].tolist())  # t, then x, then y


def test_mixed_batch_packs_contiguously_and_unpacks(tiny):
    img, vid = torch.rand(48, 64, 3) * 2 - 1, torch.rand(8, 32, 32, 3) * 2 - 1
    vox = (torch.rand(5, 768), torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 0, 0], [3, 3, 3]]))
    b = pack([("image", img), ("video", vid), ("3d", vox)])
    assert b.offsets.tolist() == [0, 12, 20, 25] and b.modalities == ["image", "video", "3d"]
    assert (b.coords[20:, 1] == 1).all() and torch.equal(b.coords[20:, 2:], vox[1].int())
    out = unpack(b)
    assert torch.equal(out[0][0], img) and torch.equal(out[1], vid)
    assert torch.allclose((out[2] + 1) / 2, vox[0], atol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        SparseBatch(b.feats, b.coords.flip(0))


def _naive_tokens(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The token layout written out token by token: each 4x16x16 block as (frame-in-patch, row, col,
    channel), tokens ordered t, x, y; frames past the sample's own (an image's 3) are zeros."""
    T, H, W = x.shape[0], x.shape[1] - x.shape[1] % 16, x.shape[2] - x.shape[2] % 16
    top, left = (x.shape[1] - H) // 2, (x.shape[2] - W) // 2
    out = []
    for t in range(0, max(T - T % 4, 1), 4):
        for i in range(H // 16):
            for j in range(W // 16):
                tok = torch.zeros(4, 16, 16, 3, dtype=x.dtype)
                for f in range(frames):
                    tok[f] = x[t + f, top + 16 * i: top + 16 * i + 16, left + 16 * j: left + 16 * j + 16]
                out.append(tok.reshape(-1))
    return torch.stack(out)


def test_pack_writes_the_token_layout_of_every_sample():
    g = torch.Generator().manual_seed(0)
    img, vid = torch.rand(70, 53, 3, generator=g) * 2 - 1, torch.rand(9, 33, 50, 3, generator=g) * 2 - 1
    vox = (torch.rand(3, 768, generator=g), torch.tensor([[1, 2, 3], [4, 5, 6], [0, 7, 1]]))
    b = pack([("video", vid), ("3d", vox), ("image", img)])
    n_vid = 2 * 2 * 3
    assert torch.equal(b.feats[:n_vid], _naive_tokens(vid, 4))
    assert torch.equal(b.feats[n_vid + 3:], _naive_tokens(img[None], 1))
    assert torch.equal(b.feats[n_vid:n_vid + 3, :768], vox[0] * 2 - 1) and b.feats[n_vid:n_vid + 3, 768:].abs().sum() == 0
    t, i, j = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(3), indexing="ij")
    assert b.coords[:n_vid].tolist() == torch.stack([t * 0, t, i, j, t * 0], -1).reshape(-1, 5).tolist()
    assert b.coords[n_vid:n_vid + 3].tolist() == [[1, 1, 1, 2, 3], [1, 1, 4, 5, 6], [1, 1, 0, 7, 1]]
    assert b.coords[n_vid + 3:, 0].unique().tolist() == [2] and b.shapes == [(8, 32, 48), None, (1, 64, 48)]
    assert pack([("image", img.double())]).feats.dtype == torch.float64  # the samples' dtype, promoted
    with pytest.raises(ValueError, match="shorter than one 4-frame patch"):
        pack([("video", vid[:3])])


def test_trimmed_tokens_give_the_first_frame_of_the_4_frame_computation(tiny):
    """Images and 3D voxels packed with one frame per token: the encoder reads, and the decoder writes,
    only that frame's channels, and the model computes what it computes for the zero-padded tokens
    (different matmul shapes: equal to rounding)."""
    torch.manual_seed(0)
    samples = [("image", torch.rand(64, 48, 3) * 2 - 1), ("3d", (torch.rand(6, 768), torch.randint(0, 8, (6, 3)))),
               ("image", torch.rand(48, 80, 3) * 2 - 1)]
    full, trim = pack(samples), pack(samples, trim_padding=True)
    assert trim.feats.shape == (len(full.feats), 768) and torch.equal(trim.feats, full.feats[:, :768])
    assert pack(samples + [("video", torch.rand(4, 32, 32, 3))], trim_padding=True).feats.shape[1] == 3072
    a = tiny(full, sample=True, generator=torch.Generator().manual_seed(1))
    b = tiny(trim, sample=True, generator=torch.Generator().manual_seed(1))
    assert b["rec"].shape == (len(full.feats), 768)
    assert torch.allclose(b["rec"], a["rec"][:, :768], atol=1e-5)
    assert torch.allclose(b["semantic"], a["semantic"], atol=1e-5)
    for x, y in zip(unpack(trim, b["rec"]), unpack(full, a["rec"])):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)


def test_position_table_lookup_matches_a_lookup_per_segment():
    """The learned table is resized once per distinct grid and read for all tokens at once: the same
    values as resizing and reading per segment, and the same gradient to rounding."""
    import torch.nn.functional as F

    from atoken.layers import LearnedPositionEmbedder

    torch.manual_seed(0)
    m = LearnedPositionEmbedder(8, grid=16)
    b = pack([("image", torch.rand(h, w, 3)) for h, w in [(128, 128), (96, 128), (128, 128), (256, 256), (48, 80)]])
    s = segments(b.coords, 1)
    out = m(s.pos, s.cu, s.grid)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    table = m.position_embedding.weight.detach().clone().requires_grad_()
    base = table.reshape(16, 16, 8).permute(2, 0, 1)[None]
    ref = torch.cat([(base if g == (16, 16) else F.interpolate(base, size=g, mode="bilinear", align_corners=False,
                                                                antialias=True))[0][:, s.pos[a:e, 1], s.pos[a:e, 2]].T
                     for g, a, e in zip(s.grid, s.cu[:-1], s.cu[1:])])
    (ref * w).sum().backward()
    assert torch.equal(out, ref)
    assert torch.allclose(m.position_embedding.weight.grad, table.grad, atol=1e-5)


def test_nearest_view_voxel_features():
    from atoken.cameras import intrinsics, look_at

    views = torch.stack([torch.full((64, 64, 3), 0.2), torch.full((64, 64, 3), 0.9)])
    views[1, 16:32, 32:48] = 0.5  # a distinct patch in view 1
    eye = torch.tensor([[0.0, 0, 3.0], [0.0, 0, -1.5]])  # view 1 is nearer to everything near the origin
    vm, K = look_at(eye, up=(0, 1, 0)), intrinsics(60, 64, 64, 2)
    coords = torch.tensor([[32, 32, 32], [33, 31, 30]])
    f = voxel_features_from_views(views, vm, K, coords, grid=64)
    assert f.shape == (2, 768) and torch.all((f == 0.9) | (f == 0.5))
    assert not torch.any(f == 0.2)


def test_rope_logits_invariant_to_common_shift_and_sensitive_to_relative():
    rope = RotaryEmbedding4D(72)
    q, k = torch.randn(5, 2, 72), torch.randn(5, 2, 72)
    pos = torch.tensor([[0, 1, 2, 0], [1, 0, 3, 0], [2, 2, 2, 1], [3, 5, 1, 0], [0, 0, 0, 4]])

    def logits(p):
        r = rope.angles(p)
        return torch.einsum("ihd,jhd->hij", rope.apply(q, r), rope.apply(k, r))

    base = logits(pos)
    torch.testing.assert_close(logits(pos + torch.tensor([7, -3, 11, 5])), base, atol=1e-4, rtol=1e-4)
    moved = pos.clone()
    moved[0, 1] += 3  # change one token's relative position
    assert (logits(moved) - base).abs().max() > 1e-2
    # every axis rotates: shifting only z of one token changes logits too
    z = pos.clone()
    z[2, 3] += 1
    assert (logits(z) - base).abs().max() > 1e-3


def test_attention_never_crosses_samples_bit_identical(tiny):
    """Same shapes, other values in the neighbouring sample: the first sample's output is bit-identical
    (same kernels run on every CPU); packed alone (other shapes) it agrees within a stated tolerance."""
    a = torch.rand(32, 48, 3) * 2 - 1
    b1, b2 = torch.rand(8, 32, 32, 3) * 2 - 1, torch.rand(8, 32, 32, 3) * 2 - 1
    with torch.no_grad():
        out1 = tiny(tiny.pack([("image", a), ("video", b1)]), sample=False)
        out2 = tiny(tiny.pack([("image", a), ("video", b2)]), sample=False)
        alone = tiny(tiny.pack([("image", a)]), sample=False)
    n = 6
    assert torch.equal(out1["rec"][:n], out2["rec"][:n])
    # packed alone, GEMMs see fewer rows (different BLAS blocking): equal up to rounding
    torch.testing.assert_close(out1["rec"][:n], alone["rec"], atol=1e-5, rtol=1e-5)
    assert torch.equal(out1["semantic"][0], out2["semantic"][0])


def test_windows_group_by_sample_and_time():
    coords = torch.tensor([[0, 0, 0, 0, 0], [0, 5, 0, 0, 0], [1, 1, 2, 3, 4], [1, 1, 0, 0, 0]])
    s = segments(coords, 4)
    assert s.cu == [0, 1, 2, 4] and s.sample_of_segment == [0, 0, 1]
    assert s.pos[:, 0].tolist() == [0, 1, 1, 1] and s.grid == [(1, 1), (1, 1), (3, 4)]
    # a mixed batch against the windows worked out per segment
    b = pack([("video", torch.rand(16, 32, 48, 3)), ("image", torch.rand(48, 64, 3)),
              ("3d", (torch.rand(4, 768), torch.tensor([[0, 0, 0], [5, 1, 2], [2, 6, 0], [1, 1, 1]])))])
    for window in (1, 2, 4):
        s = segments(b.coords, window)
        cs = b.coords.long()[s.order]
        t0 = int(b.coords[:, 1].min())
        for k, (a, e) in enumerate(zip(s.cu[:-1], s.cu[1:])):
            seg = cs[a:e]
            assert s.sample_of_segment[k] == int(seg[0, 0]) and (seg[:, 0] == seg[0, 0]).all()
            assert s.grid[k] == (int(seg[:, 2].max()) + 1, int(seg[:, 3].max()) + 1)
            assert torch.equal(s.pos[a:e, 0], seg[:, 1] - t0 - window * ((int(seg[0, 1]) - t0) // window))


@pytest.mark.parametrize("name,paper", [("base", 192e6), ("so400m", 800e6)])
def test_preset_parameter_counts_match_paper(name, paper):
    with torch.device("meta"):
        m = AToken(preset(name))
    n = m.num_parameters()["encoder"] + m.num_parameters()["decoder"] + m.num_parameters()["proj"]
    assert abs(n - paper) / paper < 0.10, n


def test_config_validation_names_the_bad_key():
    with pytest.raises(ValueError, match="encoder_num_heads"):
        preset("tiny", encoder_num_heads=5)
    with pytest.raises(ValueError, match="fsq_num_codebooks"):
        preset("tiny", use_quantizer=True, latent_channels=32)
    with pytest.raises(ValueError, match="unknown keys"):
        ATokenConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="model.preset"):
        preset("huge")


def test_grow_latent_32_to_48_keeps_reconstruction(tiny):
    torch.manual_seed(1)
    m = AToken(preset("tiny", latent_channels=32)).eval()
    b = m.pack([("image", torch.rand(32, 32, 3) * 2 - 1), ("video", torch.rand(4, 16, 32, 3) * 2 - 1)])
    with torch.no_grad():
        before = m(b, sample=False)["rec"]
        m.grow_latent(48)
        after = m(b, sample=False)
        # whatever the new channels hold (posterior noise, anything), the zero-grown decoder ignores it
        noisy = after["latent"].clone()
        noisy[:, 32:] = torch.randn(len(noisy), 16) * 10
        rec_noisy = m.decode_sparse(noisy, b.coords)
        moved = after["latent"].clone()
        moved[:, :32] += 0.5  # while the old channels still drive it
        rec_moved = m.decode_sparse(moved, b.coords)
    assert m.config.latent_channels == 48 and after["latent"].shape[1] == 48
    assert torch.allclose(after["rec"], before, atol=1e-6)
    assert torch.allclose(after["latent"][:, :32], m.encode_sparse(b).posterior.mean[:, :32])
    assert torch.equal(rec_noisy, after["rec"]) and (rec_moved - after["rec"]).abs().max() > 1e-2


def test_fsq_round_trip_and_straight_through_gradient():
    fsq = FSQ()
    z = torch.randn(100, 48, requires_grad=True)
    deq, codes = fsq(z)
    assert codes.shape == (100, 8) and codes.min() >= 0 and codes.max() < 4096
    assert set(deq.unique().tolist()) <= {-1.0, -0.5, 0.0, 0.5}
    assert torch.equal(fsq.codes_to_latents(codes), deq.detach())
    assert torch.equal(fsq.latents_to_codes(fsq.codes_to_latents(codes)), codes)
    all_codes = torch.arange(4096).repeat(8, 1).T
    assert torch.equal(fsq.latents_to_codes(fsq.codes_to_latents(all_codes)), all_codes)
    deq.sum().backward()
    assert z.grad is not None and (z.grad.abs() > 0).all()


def test_semantic_head_and_losses():
    from atoken.losses import LossWeights, distillation_kl, siglip_sigmoid_loss

    torch.manual_seed(0)
    m = AToken(preset("tiny"))
    out = m(m.pack([("image", torch.rand(32, 32, 3) * 2 - 1), ("image", torch.rand(16, 48, 3) * 2 - 1)]))
    torch.testing.assert_close(out["semantic"].norm(dim=-1), torch.ones(2))
    v = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    t_match, t_shuf = v.clone(), v[torch.randperm(8)]
    assert siglip_sigmoid_loss(v, t_match, m.logit_scale, m.logit_bias) < siglip_sigmoid_loss(v, t_shuf, m.logit_scale, m.logit_bias)
    s = torch.randn(4, 6)
    assert distillation_kl(s, s).abs() < 1e-6 and distillation_kl(s, s.flip(1)) > 0
    w = LossWeights()  # the paper's weights, constant unless a schedule is set
    assert (w.rec, w.sem, w.kl, w.l1, w.mse, w.distill_tau) == (0.2, 1.0, 1e-8, 1, 0, 2)
    assert [(x.weight, x.start, x.ramp) for x in (w.perceptual, w.gram, w.clip)] == [(10, 0, 0), (1e3, 0, 0), (1, 0, 0)]


def test_encode_decode_api_and_fsq_codes(tiny):
    img = torch.rand(48, 32, 3) * 2 - 1
    lat, batch = tiny.encode([("image", img)])
    assert lat.shape == (6, 48)
    rec = tiny.decode(lat, batch)[0]
    assert rec.shape == (1, 48, 32, 3)
    with pytest.raises(ValueError, match="use_quantizer"):
        tiny.encode([("image", img)], codes=True)
    d = AToken(preset("tiny", use_quantizer=True)).eval()
    codes, batch = d.encode([("image", img)], codes=True)
    assert codes.dtype == torch.long and codes.shape == (6, 8)
    lat_d, _ = d.encode([("image", img)])
    assert torch.equal(d.decode(codes, batch)[0], d.decode(lat_d, batch)[0])


def test_save_load_round_trip_is_bit_identical_and_pickle_free(tiny, tmp_path):
    b = tiny.pack([("image", torch.rand(32, 32, 3) * 2 - 1), ("3d", (torch.rand(4, 768), torch.randint(0, 16, (4, 3))))])
    d = tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    again = AToken.from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.equal(tiny(b, sample=False)["rec"], again(b, sample=False)["rec"])
    assert again.gs_decoder is not None
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (d / "model.safetensors").unlink()
        AToken.from_pretrained(d)


def test_from_siglip2_initialises_encoder_from_local_checkpoint(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    from atoken.siglip2 import init_encoder_from_siglip2

    torch.manual_seed(0)
    vcfg = Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               num_patches=256, patch_size=16)
    hf = Siglip2VisionModel(vcfg).eval()
    hf.save_pretrained(tmp_path / "siglip2")
    cfg = preset("tiny", encoder_model_channels=64, encoder_num_blocks=2, encoder_num_heads=2, encoder_mlp_channels=128)
    m = init_encoder_from_siglip2(tmp_path / "siglip2", cfg).eval()
    w = hf.state_dict()["embeddings.patch_embedding.weight"]
    assert torch.equal(m.encoder.input_layer.weight[:, :768], w)
    assert m.encoder.input_layer.weight[:, 768:].abs().sum() == 0  # temporal slots zero-initialised
    # one 16x16 patch: RoPE is the identity at position 0, so outputs must equal SigLIP2's
    img = torch.rand(16, 16, 3) * 2 - 1
    with torch.no_grad():
        ours = m.encode_sparse(m.pack([("image", img)]))
        px = img.reshape(1, 1, 768)
        ref = hf(pixel_values=px, pixel_attention_mask=torch.ones(1, 1, dtype=torch.long),
                 spatial_shapes=torch.tensor([[1, 1]]))
    torch.testing.assert_close(ours.tokens, ref.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.semantic_raw, ref.pooler_output, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encoder_model_channels"):
        init_encoder_from_siglip2(tmp_path / "siglip2", preset("tiny"))
    with pytest.raises(FileNotFoundError, match="model.siglip2_path"):
        init_encoder_from_siglip2(tmp_path / "nowhere", cfg)
