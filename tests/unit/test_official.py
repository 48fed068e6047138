"""Official checkpoint compatibility: key coverage, numerical parity, round trips, export."""
from __future__ import annotations

import pickle

import json

import pytest
import torch

from atoken.model import AToken
from atoken.official import (NOT_IN_OFFICIAL, check_keys, config_from_official_arch, convert_official,
                             load_official, read_state_dict, to_official_state_dict, variant_config)
from atoken.patchify import pack, unpack
from atoken.sparse import SparseBatch

pytestmark = pytest.mark.unit
SAMPLES = ["image", "video", "video_long", "obj3d"]
ATOL = RTOL = 1e-5  # the parity README's suggestion for float32 on the reduced vectors


@pytest.fixture(scope="module")
def parity(reference_dir):
    from safetensors.torch import load_file

    d = reference_dir / "official-parity"
    cfg = json.loads((d / "soc-reduced.config.json").read_text())
    return {
        "dir": d,
        "soc": load_official(d / "soc-reduced.safetensors",
                             config=config_from_official_arch(cfg["arch_cfg_resolved_soc"])).eval(),
        "sod": load_official(d / "soc-reduced.safetensors",
                             config=config_from_official_arch(cfg["arch_cfg_resolved_sod"])).eval(),
        "inp": load_file(str(d / "inputs.safetensors")),
        "out": load_file(str(d / "outputs-soc.safetensors")),
        "out_sod": load_file(str(d / "outputs-sod.safetensors")),
        "tol": json.loads((d / "tolerances.json").read_text()),
    }


def _sparse(p, name):
    inp = p["inp"]
    if name == "batch_image_video":
        return SparseBatch(torch.cat([inp["image.sparse.feats"], inp["video.sparse.feats"]]),
                           inp["batch_image_video.sparse.coords"])
    return SparseBatch(inp[f"{name}.sparse.feats"], inp[f"{name}.sparse.coords"])


def _forward(model, sb):
    enc_cap, dec_cap = {}, {}
    with torch.no_grad():
        enc = model.encode_sparse(sb, enc_cap)
        rec = model.decode_sparse(enc.posterior.mean, sb.coords, dec_cap)
    res = {"enc_tokens": enc.tokens, "kl_mean": enc.posterior.mean, "kl_logvar": enc.posterior.logvar,
           "semantic": enc.semantic, "semantic_raw": enc.semantic_raw, "rec_tokens": rec}
    res.update({f"enc.{k}": v for k, v in enc_cap.items()})
    res.update({f"dec.{k}": v for k, v in dec_cap.items()})
    return res


def test_packing_is_bit_exact(parity):
    inp = parity["inp"]
    for name in ("image", "video"):
        b = pack([(name, inp[f"{name}.pixels"])])
        assert torch.equal(b.feats, inp[f"{name}.sparse.feats"]) and torch.equal(b.coords, inp[f"{name}.sparse.coords"])
    b = pack([("3d", (inp["obj3d.feats_u8"].float() / 255, inp["obj3d.voxel_coords"]))])
    assert torch.equal(b.feats, inp["obj3d.sparse.feats"]) and torch.equal(b.coords, inp["obj3d.sparse.coords"])
    both = pack([("image", inp["image.pixels"]), ("video", inp["video.pixels"])])
    assert torch.equal(both.coords, inp["batch_image_video.sparse.coords"])


@pytest.mark.parametrize("name", SAMPLES + ["batch_image_video"])
def test_soc_outputs_match_official(parity, name):
    res = _forward(parity["soc"], _sparse(parity, name))
    compared = 0
    for key, value in res.items():
        ref = parity["out"].get(f"{name}.{key}")
        if ref is None:
            continue
        compared += 1
        if key == "enc.rope_positions":
            assert torch.equal(value.int(), ref.int())
        else:
            torch.testing.assert_close(value, ref, atol=ATOL, rtol=RTOL, msg=f"{name}.{key}")
    assert compared >= 6


def test_image_reconstruction_unpatchifies_like_official(parity):
    b = pack([("image", parity["inp"]["image.pixels"])])
    px = unpack(b, parity["out"]["image.rec_tokens"])[0]
    assert torch.equal(px.permute(0, 3, 1, 2), parity["out"]["image.rec_pixels"])


@pytest.mark.parametrize("name", ["image", "video", "obj3d"])
def test_sod_fsq_codes_and_dequant_match_official(parity, name):
    model = parity["sod"]
    with torch.no_grad():
        deq, codes = model.bottleneck(model.encode_sparse(_sparse(parity, name)))
    assert torch.equal(codes.int(), parity["out_sod"][f"{name}.fsq_codes"])
    assert torch.equal(deq, parity["out_sod"][f"{name}.fsq_dequant"])
    assert torch.equal(model.quantizer.codes_to_latents(codes), deq)


def test_batch_equals_single_runs(parity):
    """Packed together or run alone, each sample's outputs agree (to rounding: the GEMMs see other row
    counts, so other CPUs may round differently; a sample leaking into another would be far above it)."""
    both = _forward(parity["soc"], _sparse(parity, "batch_image_video"))
    single = [_forward(parity["soc"], _sparse(parity, n)) for n in ("image", "video")]
    for key in ("enc_tokens", "kl_mean", "rec_tokens"):
        torch.testing.assert_close(both[key], torch.cat([s[key] for s in single]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,key", [("soc", "atoken-soc"), ("sod", "atoken-sod"), ("soc-s1", "atoken-soc-s1")])
def test_full_size_mapping_covers_official_key_list(reference_dir, variant, key):
    spec = json.loads((reference_dir / "official-atoken-params.json").read_text())["models"][key]
    official = {name: torch.empty(shape, device="meta") for name, shape, _ in spec["params"]}
    with torch.device("meta"):
        model = AToken(variant_config(variant))
    state = model.state_dict()
    check_keys(official, state)  # raises listing names on any difference
    assert set(state) - set(official) == set(NOT_IN_OFFICIAL)
    assert sum(v.numel() for k, v in state.items() if k not in NOT_IN_OFFICIAL) == spec["totals"]["state_dict_numel"]


def test_mismatched_checkpoint_error_lists_names(parity, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(parity["dir"] / "soc-reduced.safetensors"))
    state.pop("decoder.out_norm.weight")
    state["encoder.extra.weight"] = torch.zeros(2)
    state["proj.weight"] = torch.zeros(64, 144)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    cfg = parity["soc"].config
    with pytest.raises(ValueError) as e:
        load_official(bad, config=cfg)
    msg = str(e.value)
    assert "decoder.out_norm.weight" in msg and "encoder.extra.weight" in msg and "proj.weight" in msg


def test_pt_checkpoints_load_with_weights_only(parity, tmp_path, capsys):
    state = to_official_state_dict(parity["soc"])
    torch.save({"state_dict": state}, tmp_path / "ckpt.pt")
    loaded = read_state_dict(tmp_path / "ckpt.pt")
    assert set(loaded) == set(state)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_state_dict(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out  # the payload never ran


def test_official_save_load_round_trip_is_bit_identical(parity, tmp_path):
    model = parity["soc"]
    sb = _sparse(parity, "batch_image_video")
    before = _forward(model, sb)
    model.save_pretrained(tmp_path / "export")
    again = AToken.from_pretrained(tmp_path / "export").eval()
    after = _forward(again, sb)
    for k in ("enc_tokens", "kl_mean", "kl_logvar", "semantic", "rec_tokens"):
        assert torch.equal(before[k], after[k]), k
    # and back to the official naming
    convert_official(tmp_path / "export", tmp_path / "back.safetensors", to_official=True)
    back = load_official(tmp_path / "back.safetensors", config=model.config).eval()
    assert torch.equal(_forward(back, sb)["rec_tokens"], before["rec_tokens"])
    original = read_state_dict(parity["dir"] / "soc-reduced.safetensors")
    exported = read_state_dict(tmp_path / "back.safetensors")
    assert set(original) == set(exported) and all(torch.equal(original[k], exported[k]) for k in original)
