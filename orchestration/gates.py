"""Promotion gates: every threshold is relative to a baseline measured in the same evaluation (or to the
previous stage), so an untrained model cannot pass them. Each failure says which gate, the value, what
it was compared with and by how much it missed."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Gates:
    """None disables a gate; margins are in dB (PSNR) or accuracy points (understanding)."""

    # each image dataset's PSNR >= PCA at the model's latent size (PCA+FSQ once discrete) + margin: the
    # margin keeps a model that only starts at the linear codec (the PCA initialisation, ~0.03 dB below
    # it) from passing by rounding
    image_vs_pca: float | None = 0.1
    video_vs_pca: float | None = 0.1  # video PSNR >= PCA over the same 4x16x16 space-time patches + margin
    threed_vs_background: float | None = 3.0  # held-out-view 3D PSNR >= the background-only render + margin
    # an image dataset's PSNR may fall at most this far below the previous stage's; on the step from
    # continuous to discrete latents, plus what the same quantiser costs the PCA codec on that dataset
    max_image_psnr_drop: float | None = 1.0
    max_understanding_drop: float | None = 0.1  # image understanding (linear probe, zero-shot) may lose at most this
    # each labelled image dataset's linear probe on the semantic head >= the same probe on a randomly
    # initialised encoder of the same config + margin (an untrained model ties it: the margin is about
    # one standard error of a 256-item accuracy)
    probe_vs_random_encoder: float | None = 0.03
    image_datasets: list[str] = field(default_factory=list)  # datasets the image gates apply to; empty: all


def image_datasets(metrics: dict) -> list[str]:
    return sorted({k.split("/")[1] for k in metrics if k.startswith("image/") and k.endswith("/psnr")
                   and k.count("/") == 2 and not k.split("/")[2].startswith(("pca", "mean"))})


def image_floor(metrics: dict, ds: str) -> tuple[str, float | None]:
    """The floor a dataset's PSNR is compared with: PCA through the quantiser once the model is discrete."""
    if metrics.get("discrete") and f"image/{ds}/pca_fsq_psnr" in metrics:
        return "PCA+FSQ", metrics[f"image/{ds}/pca_fsq_psnr"]
    return "PCA", metrics.get(f"image/{ds}/pca_psnr")


def quantiser_cost(metrics: dict, ds: str) -> float:
    """dB the model's quantiser takes from the PCA codec on dataset `ds`: the part of a continuous-to-
    discrete drop that is the bit budget's, not training's."""
    a, b = metrics.get(f"image/{ds}/pca_psnr"), metrics.get(f"image/{ds}/pca_fsq_psnr")
    return max(0.0, a - b) if a is not None and b is not None else 0.0


def video_floor(metrics: dict) -> tuple[str, float | None]:
    if metrics.get("discrete") and "video/pca_fsq_psnr" in metrics:
        return "PCA+FSQ", metrics["video/pca_fsq_psnr"]
    return "PCA", metrics.get("video/pca_psnr")


def check_gates(g: Gates, metrics: dict, previous: dict | None, tasks: list[str]) -> list[str]:
    """Failures as 'gate: value vs what (short by / over by)'; empty when every gate passes. A modality
    the stage trained but the evaluation could not measure fails its gate."""
    fails: list[str] = []
    k = metrics.get("latent_channels", "?")
    sets = [d for d in image_datasets(metrics) if not g.image_datasets or d in g.image_datasets]
    if g.image_vs_pca is not None:
        if "image_rec" in tasks and not sets:
            fails.append("image_vs_pca: no eval images were measured")
        for ds in sets:
            name, floor = image_floor(metrics, ds)
            v = metrics[f"image/{ds}/psnr"]
            if floor is not None and v < floor + g.image_vs_pca:
                fails.append(f"image_vs_pca: {ds} PSNR {v:.2f} dB < {name}-{k} {floor:.2f} + {g.image_vs_pca:.2f} "
                             f"(short by {floor + g.image_vs_pca - v:.2f} dB)")
    if g.video_vs_pca is not None and "video_rec" in tasks:
        name, floor = video_floor(metrics)
        v = metrics.get("video/psnr")
        if v is None or floor is None:
            fails.append("video_vs_pca: no eval video was measured")
        elif v < floor + g.video_vs_pca:
            fails.append(f"video_vs_pca: video PSNR {v:.2f} dB < {name}-{k} {floor:.2f} + {g.video_vs_pca:.2f} "
                         f"(short by {floor + g.video_vs_pca - v:.2f} dB)")
    if g.threed_vs_background is not None and "3d_rec" in tasks:
        v, bg = metrics.get("3d/psnr"), metrics.get("3d/background_psnr")
        if v is None or bg is None:
            fails.append("threed_vs_background: no eval 3D asset was measured")
        elif v < bg + g.threed_vs_background:
            fails.append(f"threed_vs_background: 3D PSNR {v:.2f} dB < background-only render {bg:.2f} + "
                         f"{g.threed_vs_background:.2f} (short by {bg + g.threed_vs_background - v:.2f} dB)")
    if g.probe_vs_random_encoder is not None and "image_und" in tasks:
        for key in sorted(k for k in metrics if k.startswith("und/") and k.endswith("/linear_probe_acc")):
            ds = key.split("/")[1]
            v, rnd = metrics[key], metrics.get(f"und/{ds}/probe_random_encoder")
            if rnd is not None and v < rnd + g.probe_vs_random_encoder:
                fails.append(f"probe_vs_random_encoder: {ds} linear probe {v:.3f} < random encoder {rnd:.3f} + "
                             f"{g.probe_vs_random_encoder:.3f} (short by {rnd + g.probe_vs_random_encoder - v:.3f})")
    if previous:
        if g.max_image_psnr_drop is not None:
            for ds in sets:
                before, now = previous.get(f"image/{ds}/psnr"), metrics[f"image/{ds}/psnr"]
                limit, why = g.max_image_psnr_drop, f"{g.max_image_psnr_drop:.2f}"
                cost = quantiser_cost(metrics, ds) if metrics.get("discrete") and not previous.get("discrete") else 0.0
                if cost > 0:
                    limit, why = limit + cost, f"{g.max_image_psnr_drop:.2f} + {cost:.2f} the quantiser costs PCA"
                if before is not None and before - now > limit:
                    fails.append(f"max_image_psnr_drop: {ds} PSNR fell {before - now:.2f} dB from {before:.2f} "
                                 f"(limit {why}, over by {before - now - limit:.2f})")
        if g.max_understanding_drop is not None:
            keys = sorted(k for k in metrics if k.startswith("und/") and k.endswith(("/linear_probe_acc", "/zero_shot_acc")))
            for key in keys:
                before, now = previous.get(key), metrics.get(key)
                if before is not None and now is not None and before - now > g.max_understanding_drop:
                    name = key[len("und/"):]
                    fails.append(f"max_understanding_drop: {name} fell {before - now:.3f} from {before:.3f} "
                                 f"(limit {g.max_understanding_drop:.3f}, over by {before - now - g.max_understanding_drop:.3f})")
    return fails
