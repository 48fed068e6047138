"""EMA of weights that works under ZeRO-3: each rank averages only its own partition of every
parameter (`ds_tensor`), so EMA memory is partitioned like the optimizer state. For export, the EMA
shards are swapped in, the full parameters gathered, and the training shards swapped back."""
from __future__ import annotations

import contextlib

import torch


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]
        self.updates = 0

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update: warmed up (early EMA tracks the weights closely) to `decay`."""
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step of every local partition; returns the decay it used."""
        self.updates += 1
        d = self.decay_at(self.updates)
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(_local(p).float(), alpha=1 - d)
        return d

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        for s, t in zip(self.shadow, state["shadow"]):
            if s.shape != t.shape:
                raise ValueError(f"EMA shard shape {tuple(t.shape)} != {tuple(s.shape)} (different world size?)")
            s.copy_(t)
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily replaces each local partition with its EMA value."""
        saved = []
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                loc = _local(p)
                saved.append(loc.clone())
                loc.copy_(s.to(loc.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for t, p in zip(saved, self.params):
                    _local(p).copy_(t)
