"""Reading llmprobe result folders back: manifest, tables and figures.

A result folder is any directory holding a ``manifest.json`` written by an llmprobe command
(``RunOutput``): one CSV (and JSON) per table and figures beside them or under ``plots/``.
A report folder is a directory whose subfolders are result folders. ``discover`` accepts either
and never fails on what it cannot read: an unreadable manifest or table is recorded as a
problem of that folder, so the report can say so instead of crashing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.errors import LLMProbeError

#: Figure formats a browser can show inline (PDF figures are listed, not embedded).
FIGURE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")
#: Folders the report itself writes; never read back as results.
REPORT_OUTPUT_DIRS = ("report_figures", "diff_figures")
#: How deep below a given folder result folders are looked for.
MAX_DEPTH = 3


def normalize_command(command: str) -> str:
    """'activations.max_median' / 'activations max-median' -> 'activations max-median'."""
    return " ".join(command.replace(".", " ").replace("_", "-").split()).lower()


@dataclass
class ResultFolder:
    """One command's result folder, read lazily."""

    path: Path
    manifest: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    _tables: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)

    @property
    def command(self) -> str:
        return normalize_command(str(self.manifest.get("command") or "unknown"))

    @property
    def status(self) -> str:
        return str(self.manifest.get("status") or "unknown")

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def table_names(self) -> list[str]:
        """Tables in the folder: every ``*.csv`` at its top level, manifest order first."""
        listed = [Path(f).stem for f in self.manifest.get("files", []) if str(f).endswith(".csv")]
        present = sorted(p.stem for p in self.path.glob("*.csv"))
        return [n for n in listed if n in present] + [n for n in present if n not in listed]

    def has_table(self, name: str) -> bool:
        return (self.path / f"{name}.csv").is_file()

    def table(self, name: str) -> pd.DataFrame | None:
        """The table as a DataFrame, or None when absent or unreadable (recorded in problems)."""
        if name not in self._tables:
            path = self.path / f"{name}.csv"
            frame = None
            if path.is_file():
                try:
                    # only an empty field is missing: a token whose text is "NA" or "null" stays text
                    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
                except pd.errors.EmptyDataError:
                    frame = pd.DataFrame()
                except Exception as exc:  # a damaged file must not stop the report
                    self.problems.append(f"{name}.csv could not be read: {type(exc).__name__}: {exc}")
            self._tables[name] = frame
        return self._tables[name]

    def figures(self) -> list[Path]:
        """Figure files under the folder (any depth), shallow ones first, then by name."""
        found = [p for p in self.path.rglob("*") if p.suffix.lower() in FIGURE_SUFFIXES and p.is_file()
                 and not _in_report_output(p.relative_to(self.path))]
        return sorted(found, key=lambda p: (len(p.relative_to(self.path).parts), str(p.relative_to(self.path))))

    def other_figure_files(self) -> list[Path]:
        """Figures a browser cannot show inline (PDF)."""
        return sorted(p for p in self.path.rglob("*.pdf")
                      if p.is_file() and not _in_report_output(p.relative_to(self.path)))


def _in_report_output(relative: Path) -> bool:
    """A report built into a result folder puts its copies there; they are not the run's figures."""
    return any(part in REPORT_OUTPUT_DIRS for part in relative.parts[:-1])


def _read_manifest(path: Path) -> tuple[dict[str, Any], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"command": "unknown", "status": "unreadable"}, [f"manifest.json could not be read: {exc}"]
    if not isinstance(data, dict):
        return {"command": "unknown", "status": "unreadable"}, ["manifest.json is not a JSON object"]
    return data, []


def _is_report_manifest(manifest: dict[str, Any]) -> bool:
    return normalize_command(str(manifest.get("command") or "")).startswith("report")


def discover(dirs: list[str | Path] | tuple[str | Path, ...]) -> list[ResultFolder]:
    """Every result folder at or below the given folders (up to ``MAX_DEPTH`` levels).

    A folder given directly may itself be a result folder. Manifests of report commands mark a
    report folder, not a result: their subfolders are searched instead.
    """
    if not dirs:
        raise LLMProbeError("report: give at least one result folder")
    found: list[ResultFolder] = []
    seen: set[Path] = set()
    for given in dirs:
        root = Path(given)
        if not root.is_dir():
            raise LLMProbeError(f"report: {root} is not a folder")
        _walk(root, 0, found, seen)
    return found


def _walk(folder: Path, depth: int, found: list[ResultFolder], seen: set[Path]) -> None:
    resolved = folder.resolve()
    if resolved in seen:
        return
    seen.add(resolved)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest, problems = _read_manifest(manifest_path)
        if not _is_report_manifest(manifest):
            found.append(ResultFolder(folder, manifest, problems))
            return
    if depth >= MAX_DEPTH:
        return
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if child.name in REPORT_OUTPUT_DIRS or child.name.startswith("."):
            continue
        _walk(child, depth + 1, found, seen)


# -- small helpers shared by findings, sections and diff ---------------------------------

def finite(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def first_column(frame: pd.DataFrame, *candidates: str) -> str | None:
    """The first of the candidate column names the frame has."""
    for name in candidates:
        if name in frame.columns:
            return name
    return None


def numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce")
