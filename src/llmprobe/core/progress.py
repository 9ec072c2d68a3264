"""Progress bars with ETA on stderr, silenced by ``--quiet`` (or when stderr is not a terminal
and LLMPROBE_PROGRESS is unset, so logs in CI stay clean)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_state = {"quiet": False}


def __getattr__(name: str):
    # rich is imported on the first bar or status line, not at start-up (--help, --version).
    if name == "stderr_console":
        return _stderr_console()
    raise AttributeError(name)


def _stderr_console():
    if "console" not in _state:
        from rich.console import Console

        _state["console"] = Console(stderr=True)
    return _state["console"]


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def silence_libraries() -> None:
    """transformers and huggingface_hub print their own tqdm bars and warnings; silence them
    when ours are off (quiet, or output not a terminal). A library not imported yet is silenced
    through the environment variables it reads when it is imported: importing transformers just
    to silence it would cost a weight command ~2 s, and most never import it."""
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except Exception:  # pragma: no cover - always importable once imported
            pass
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except Exception:  # pragma: no cover - always importable once imported
            pass
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"


def is_quiet() -> bool:
    if _state["quiet"]:
        return True
    forced = os.environ.get("LLMPROBE_PROGRESS")
    if forced is not None:
        return forced == "0"
    return not sys.stderr.isatty()


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar (count, elapsed, ETA) unless quiet."""
    if is_quiet():
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=_stderr_console(), transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


def info(message: str) -> None:
    """A status line on stderr, unless quiet (or stderr is not a terminal)."""
    if not is_quiet():
        _stderr_console().print(message, highlight=False)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (the CLI runs in-process in tests and
    notebooks, where stderr is swapped between runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level_name: str, quiet: bool) -> None:
    """``--log-level`` for llmprobe's own loggers (one stderr handler, installed once).
    ``--quiet`` raises the level to at least WARNING, like it silences progress bars."""
    level = getattr(logging, level_name.upper())
    if quiet:
        level = max(level, logging.WARNING)
    root = logging.getLogger("llmprobe")
    root.setLevel(level)
    if not any(isinstance(handler, _CurrentStderrHandler) for handler in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
