"""The console: what an operator reads while the workflow runs, and where the full logs go.

On the console: one line per workflow step start and finish, a progress display per training stage, gate
results, the summary. Everything else goes to `<work_dir>/logs/atoken.log` (the project's loggers at
DEBUG, Ray's and MLflow's at INFO) and to Ray's session logs (workers, the Train controller, Ray Data),
whose folder the summary names. `verbose=true` puts it all back on the console.

Quieted at the cause: Ray workers' output is not forwarded to the driver (`log_to_driver`), training's
Ray Data streams run without progress bars (trainers.stage), MLflow's artifact progress bars are off,
models are logged from code (no pickle warning), Fréchet distance regularises its covariances (no
singular-matrix warning). Filtered, since the cause is outside the project: Ray / Ray Data / MLflow INFO
lines, transformers' weight-loading progress bar.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3", "sentence_transformers",
                 "transformers", "deepspeed", "torch.distributed", "filelock", "fsspec", "botocore", "s3fs")


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = self.formatTime(record, "%H:%M:%S")
        name = record.name.split(".", 1)[-1] if record.name.startswith("atoken.") else record.name
        lvl = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"{t} [{name}] {lvl}{record.getMessage()}"


def _handler(h: logging.Handler, level: int) -> logging.Handler:
    h.setFormatter(_Format())
    h.setLevel(level)
    h._atoken = True  # type: ignore[attr-defined]
    return h


def setup_logging(verbose: bool = False, log_dir: str | Path | None = None) -> Path | None:
    """Console handler for the project's loggers ("atoken.*"), INFO; with `log_dir`, a file handler for
    them and for the libraries'. Idempotent. Returns the log file."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "0" if verbose else os.environ.get("TQDM_DISABLE", "0"))
    root = logging.getLogger("atoken")
    root.setLevel(logging.DEBUG)
    root.propagate = False
    if not any(getattr(h, "_atoken", False) and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        root.addHandler(_handler(logging.StreamHandler(sys.stderr), logging.DEBUG if verbose else logging.INFO))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if log_dir is None:
        return None
    path = Path(log_dir) / "atoken.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        fh = _handler(logging.FileHandler(path), logging.DEBUG)
        root.addHandler(fh)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).addHandler(fh)
    return path


def _duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StageProgress:
    """Progress of one training stage from its metric reports: step/total, losses, tokens/s, ETA. On a
    terminal one line redrawn in place; otherwise (`ray job logs`, a file) a plain line every ~10% of the
    stage."""

    def __init__(self, stage: int, steps: int, stream=None):
        self.stage, self.steps = stage, steps
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, steps // 10)
        self.last_printed = 0
        self.t0 = time.time()
        self.first: tuple[float, int] | None = None

    def line(self, m: dict) -> str:
        step = int(m.get("step", 0))
        now = time.time()
        if self.first is None:
            self.first = (now, step)
        t, s0 = self.first
        rate = (step - s0) / (now - t) if now > t and step > s0 else 0.0
        eta = f", ETA {_duration((self.steps - step) / rate)}" if rate > 0 and step < self.steps else ""
        losses = [f"{k.split('/')[1]} {v:.4f}" for k, v in sorted(m.items()) if k.startswith("loss/") and k.endswith("/total")]
        return (f"stage {self.stage} train: step {step}/{self.steps} ({100 * step // max(self.steps, 1)}%)  "
                f"{m.get('tokens_per_s', 0):,.0f} tok/s{eta}  loss " + ", ".join(losses))

    def __call__(self, m: dict) -> None:
        step = int(m.get("step", 0))
        text = self.line(m)
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if step >= self.steps else ""))
            self.stream.flush()
        elif step - self.last_printed >= self.every or step >= self.steps:
            logging.getLogger("atoken.progress").info(text)
            self.last_printed = step
