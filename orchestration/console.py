"""The console: what an operator reads while the workflow runs, and where the full logs go."""
from __future__ import annotations

import logging
import sys


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = self.formatTime(record, "%H:%M:%S")
        name = record.name.split(".", 1)[-1]
        lvl = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"{t} [{name}] {lvl}{record.getMessage()}"


def setup_logging(verbose: bool = False) -> None:
    """The project's loggers ("atoken.*") at INFO on stderr in one short line each."""
    root = logging.getLogger("atoken")
    if any(getattr(h, "_atoken", False) for h in root.handlers):
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_Format())
    h._atoken = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
