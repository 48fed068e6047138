"""The MLflow pyfunc flavour of an exported AToken: `mlflow.pyfunc.load_model("models:/atoken@champion")`
tokenizes images.

predict(model_input, params={"mode": ...}):
  model_input  a list of images: uint8 arrays [H, W, 3], encoded image bytes, or a DataFrame with an
               "image" column of either; or a dict {"image": [...], "mode": ...}
  mode         (params or the dict's "mode") "encode" (default): per image {"tokens": latents [L, C] or FSQ codes [L, 8], "coords": [L, 5]}
               "reconstruct": per image {"image": uint8 [H, W, 3]} (encode then decode)
"""
from __future__ import annotations

import io

import mlflow.pyfunc
import numpy as np


class ATokenPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from atoken.model import AToken

        self.model = AToken.from_pretrained(context.artifacts["export"]).eval()

    def _images(self, model_input) -> list[np.ndarray]:
        from PIL import Image

        items = model_input
        if hasattr(model_input, "columns"):
            items = list(model_input["image"])
        elif isinstance(model_input, np.ndarray) and model_input.ndim == 3:
            items = [model_input]
        out = []
        for x in items:
            if isinstance(x, (bytes, bytearray)):
                x = np.asarray(Image.open(io.BytesIO(x)).convert("RGB"))
            out.append(np.asarray(x, dtype=np.uint8))
        return out

    def predict(self, context, model_input, params: dict | None = None):
        import torch

        mode = (params or {}).get("mode", "encode")
        if isinstance(model_input, dict):
            mode = model_input.get("mode", mode)
            model_input = model_input["image"]
        if mode not in ("encode", "reconstruct"):
            raise ValueError(f"mode={mode!r}: choose encode or reconstruct")
        results = []
        for img in self._images(model_input):
            x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1)
            codes = self.model.quantizer is not None
            tokens, batch = self.model.encode([("image", x)], codes=codes)
            if mode == "encode":
                results.append({"tokens": tokens.numpy(), "coords": batch.coords.numpy(), "discrete": codes})
            else:
                rec = self.model.decode(tokens, batch)[0][0]
                results.append({"image": ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()})
        return results
