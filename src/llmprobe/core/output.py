"""Run output: the one writer of tables, figures and the run manifest.

A run owns one directory. It refuses to reuse a non-empty directory unless ``overwrite`` is
set, writes every file atomically (temporary file in the same directory, then rename), and
keeps ``manifest.json`` at status ``incomplete`` until the run finishes without error, so a
crashed or interrupted run is never presented as complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .errors import LLMProbeError
from .files import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported: the writers live there)
from .records import Record

if TYPE_CHECKING:  # pandas is imported when a table is written (figure workers never need it)
    import pandas as pd

_LIBRARIES = ("torch", "transformers", "accelerate", "safetensors", "gguf", "numpy", "scipy", "pandas",
              "pydantic", "typer", "rich", "matplotlib", "scikit-learn")


def slugify(text: str) -> str:
    """A file-system-safe name for a model id or path."""
    base = text.rstrip("/").split("/")[-2:] if "/" in text else [text]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "--".join(base)).strip("-") or "model"


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity; write null so every consumer can parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def dumps_json(obj: Any) -> str:
    return json.dumps(_json_safe(obj), indent=2, allow_nan=False, default=str) + "\n"


def records_to_frame(records: Sequence[Record]) -> pd.DataFrame:
    import pandas as pd

    rows = [r.row() for r in records]
    if not rows:
        return pd.DataFrame()
    columns: list[str] = []
    for row in rows:  # union of columns, first-seen order (declared fields come first)
        columns.extend(c for c in row if c not in columns)
    # object dtype keeps optional int columns (layer index None outside blocks) as ints and
    # blanks instead of pandas' silent upcast to float.
    return pd.DataFrame(rows, columns=columns, dtype=object)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


class RunOutput:
    """One run's output directory, used as a context manager.

    >>> with RunOutput(out_dir, command="weights stats") as run:   # doctest: +SKIP
    ...     run.manifest.update(model=...)
    ...     run.write_table("weight_stats", records)
    """

    def __init__(self, out_dir: str | Path, *, command: str, overwrite: bool = False,
                 argv: Sequence[str] | None = None):
        self.dir = Path(out_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise LLMProbeError(f"--out {self.dir} exists and is not a directory")
        if self.dir.is_dir() and any(self.dir.iterdir()):
            if not overwrite:
                raise LLMProbeError(
                    f"output directory {self.dir} already holds results; pass --overwrite or choose another --out")
            # Overwrite means the new run replaces the old one whole: stale tables from a run
            # with other options must not sit beside the new ones.
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []
        self.manifest: dict[str, Any] = {
            "llmprobe_version": __version__,
            "command": command,
            "command_line": " ".join(["llmprobe", *(argv if argv is not None else sys.argv[1:])]),
            "status": "incomplete",
            "started_at": _now(),
            "finished_at": None,
            "libraries": library_versions(),
            "files": self.files,
        }

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> RunOutput:
        self._write_manifest()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.manifest["finished_at"] = _now()
        if exc_type is None:
            self.manifest["status"] = "complete"
        else:
            self.manifest["status"] = "incomplete"
            self.manifest["error"] = f"{exc_type.__name__}: {exc}" if exc is not None else exc_type.__name__
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(self.dir / "manifest.json", dumps_json(self.manifest))

    def update(self, **fields: Any) -> None:
        """Add facts to the manifest (model source, dtype, dataset hash, ...)."""
        self.manifest.update(fields)
        self._write_manifest()

    # -- writers ------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _register(self, path: Path) -> None:
        rel = str(path.relative_to(self.dir))
        if rel not in self.files:
            self.files.append(rel)

    def write_table(self, name: str, records: Sequence[Record], *, json_too: bool = True) -> Path:
        """Write ``name.csv`` (and ``name.json``) from records, atomically."""
        frame = records_to_frame(records)
        csv_path = self.path(f"{name}.csv")
        atomic_write_text(csv_path, frame.to_csv(index=False))
        self._register(csv_path)
        if json_too:
            json_path = self.path(f"{name}.json")
            atomic_write_text(json_path, dumps_json([r.row() for r in records]))
            self._register(json_path)
        return csv_path

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path(name if name.endswith(".json") else f"{name}.json")
        atomic_write_text(path, dumps_json(obj))
        self._register(path)
        return path

    def register(self, relative: str) -> None:
        """Record a file written into the run directory by someone else (a figure worker)."""
        self._register(self.dir / relative)

    def save_figure(self, fig, name: str, fmt: str = "png", dpi: int = 120, *, tight: bool | None = None,
                    close: bool = True) -> Path:
        """Save a matplotlib figure atomically as ``name.<fmt>``.

        ``tight=None`` crops to the tight bounding box only for figures without a layout engine
        (constrained layout already fits; the crop is a second full draw); ``close=False``
        keeps the figure open for reuse.
        """
        from .figures import save_figure_file

        path = self.path(f"{name}.{fmt}")
        save_figure_file(fig, self.dir, name, fmt, dpi=dpi, tight=tight, close=close)
        self._register(path)
        return path


def check_out_target(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an output folder before any work is done (the run itself checks again)."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise LLMProbeError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LLMProbeError(f"output directory {path} already holds results; pass --overwrite or choose another --out")


def default_out_dir(model_slug: str, group: str, command: str) -> Path:
    return Path("results") / model_slug / f"{group}-{command}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def tables_from(records: Iterable[Record]) -> list[dict]:
    return [r.row() for r in records]
