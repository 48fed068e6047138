"""Image decoding with a stated policy.

- EXIF orientation is applied.
- Any mode -> RGB uint8. 16-bit and float images are scaled to 8 bits by their type's range; CMYK goes
  through PIL's conversion; palette images are expanded.
- Alpha rule: images with transparency (RGBA, LA, palette with a transparent index) are composited over
  a white background, the common convention for web graphics and logos.
- Decompression bombs: the pixel count from the header is checked against `max_pixels` before any pixel
  is decoded.
- Resolution: the short side is raised to `min_side` and the long side lowered to `max_side` (aspect
  kept, bicubic / antialiased), then the image is centre-cropped to multiples of `multiple`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class ImagePolicy:
    max_side: int = 512
    min_side: int = 32
    multiple: int = 16
    max_pixels: int = 64_000_000

    def validate(self) -> "ImagePolicy":
        if self.min_side < self.multiple:
            raise ValueError(f"image.min_side={self.min_side} must be >= image.multiple={self.multiple}")
        if self.max_side < self.min_side:
            raise ValueError(f"image.max_side={self.max_side} must be >= image.min_side={self.min_side}")
        if self.max_pixels < 1:
            raise ValueError(f"image.max_pixels={self.max_pixels} must be positive")
        return self


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def fit_scale(h: int, w: int, min_side: int, max_side: int) -> float:
    """Scale that raises the short side to min_side, then caps the long side at max_side (aspect kept)."""
    scale = 1.0
    if min(h, w) < min_side:
        scale = min_side / min(h, w)
    if max(h, w) * scale > max_side:
        scale = max_side / max(h, w)
    return scale


def resize_policy(h: int, w: int, policy: ImagePolicy) -> tuple[int, int]:
    scale = fit_scale(h, w, policy.min_side, policy.max_side)
    return max(policy.multiple, round(h * scale)), max(policy.multiple, round(w * scale))


def center_crop(arr: np.ndarray, multiple: int) -> np.ndarray:
    h, w = arr.shape[-3], arr.shape[-2]
    nh, nw = h - h % multiple, w - w % multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return arr[..., top:top + nh, left:left + nw, :]


def decode_image(data: bytes, policy: ImagePolicy = ImagePolicy()) -> np.ndarray:
    """Encoded bytes -> RGB uint8 [H, W, 3] following the policy. Raises ValueError on bad input."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression bomb refused ({e}); limit image.max_pixels={policy.max_pixels}") from None
    except Exception as e:
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > policy.max_pixels:
        raise ValueError(f"header declares {w}x{h} = {w * h} pixels, above image.max_pixels={policy.max_pixels}")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
    except Exception as e:
        raise ValueError(f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    nh, nw = resize_policy(im.height, im.width, policy)
    if (nh, nw) != (im.height, im.width):
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    return center_crop(np.asarray(im, dtype=np.uint8), policy.multiple)
