"""The MLflow pyfunc flavour of an exported AToken, logged as models-from-code: MLflow stores this file as
the model's code and runs it at load time (nothing is pickled); the weights load from the export's
safetensors. `mlflow.pyfunc.load_model("models:/atoken@champion")` then tokenizes images, videos and 3D.

predict(model_input, params={"mode": ...}):
  model_input  a DataFrame with an "image" column of encoded image bytes (PNG / JPEG): the logged
               signature. Called directly (the loaded model's `unwrap_python_model()`), it also takes
               a "video" column of uint8 arrays [T, H, W, 3], a "3d" column of dicts
               {"voxel_feats": [N, 768] in [0, 1], "voxels": [N, 3] int}, or a list of uint8 images.
  mode         "encode" (default): per sample {"tokens": latents [L, C] or FSQ codes [L, 8], "coords": [L, 5]}
               "reconstruct": per sample {"image" | "video": uint8 pixels} (encode, then decode)
"""
from __future__ import annotations

import io
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

MODES = ("encode", "reconstruct")


def _image(x) -> np.ndarray:
    if isinstance(x, (bytes, bytearray)):
        from PIL import Image

        x = np.asarray(Image.open(io.BytesIO(x)).convert("RGB"))
    return np.asarray(x, dtype=np.uint8)


def _samples(model_input) -> list[tuple[str, Any]]:
    """(modality, raw value) per sample, from any accepted input form."""
    if hasattr(model_input, "columns"):
        for mod in ("image", "video", "3d"):
            if mod in model_input.columns:
                return [(mod, v) for v in model_input[mod]]
        raise ValueError(f"model_input: a DataFrame with an 'image', 'video' or '3d' column, got {list(model_input.columns)}")
    if isinstance(model_input, np.ndarray) and model_input.ndim == 3:
        return [("image", model_input)]
    return [("image", v) for v in model_input]


class ATokenPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from atoken.model import AToken

        self.model = AToken.from_pretrained(context.artifacts["export"]).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list:
        import torch

        mode = (params or {}).get("mode", "encode")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose {' or '.join(MODES)}")
        discrete = self.model.quantizer is not None
        results = []
        for modality, value in _samples(model_input):
            if modality == "3d":
                x = (torch.as_tensor(np.asarray(value["voxel_feats"]), dtype=torch.float32),
                     torch.as_tensor(np.asarray(value["voxels"]), dtype=torch.long))
            else:
                arr = _image(value) if modality == "image" else np.asarray(value, dtype=np.uint8)
                x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1)
            tokens, batch = self.model.encode([(modality, x)], codes=discrete)
            if mode == "encode":
                results.append({"tokens": tokens.numpy(), "coords": batch.coords.numpy(), "discrete": discrete})
                continue
            rec = self.model.decode(tokens, batch)[0]
            if modality == "3d":
                results.append({"voxel_feats": ((rec.clamp(-1, 1) + 1) / 2).numpy()})
            else:
                px = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
                results.append({modality: px[0] if modality == "image" else px})
        return results


mlflow.models.set_model(ATokenPyfunc())
