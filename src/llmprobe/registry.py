"""The registry of analyses: each is declared once, and the CLI, ``llmprobe.run`` and
``llmprobe schema`` are built from the declarations.

A declaration names its options (an :class:`~llmprobe.options.Options` model), what it needs
from the session, its compute function, its figures and its terminal summary. Functions are
named as ``"module:function"`` strings and imported only when the analysis runs, so listing
commands and printing ``--help`` import neither torch nor matplotlib.

Declarations live in :mod:`llmprobe.catalog`, one module per command group.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .core.errors import LLMProbeError
from .options import Options

# What an analysis may need; the session opens each once and shares it.
NEEDS = ("source", "weights", "model", "calibration", "evaluation")


@dataclass(frozen=True)
class Show:
    """One table printed on the terminal after a run (``--json`` prints the analysis's json_table)."""

    table: str
    title: str | Callable[[Any, Any], str]           # text, or f(options, result) -> text
    columns: tuple[str, ...] | None = None
    where: Callable[[Any], bool] | None = None        # which records to show
    limit: int = 40


@dataclass(frozen=True)
class Group:
    name: str
    help: str


@dataclass(frozen=True)
class Analysis:
    """One analysis (one CLI command), declared once."""

    name: str                                   # "group.command", e.g. "activations.kurtosis"
    help: str                                   # first line: the command's one-line help
    options: type[Options]
    compute: str                                # "module:function"(job) -> Result
    needs: tuple[str, ...] = ()
    prepare: str | None = None                  # "module:function"(job): checks needing data, before output
    figures: str | None = None                  # "module:function"(result, options) -> [(stem, figure), ...]
    summary: tuple[Show, ...] = ()
    printer: str | None = None                  # "module:function"(result, options, console): custom summary
    json_table: str | None = None               # table printed by --json (default: the first Show's)
    writes_by_default: bool = True              # False: writes only when --out is given (model info)
    shares_pass: bool = False                   # its collection pass can be folded with others (report run)
    notes: tuple[str, ...] = field(default=())  # extra lines for --help

    def __post_init__(self):
        bad = [n for n in self.needs if n not in NEEDS]
        if bad or "." not in self.name:
            raise ValueError(f"bad declaration {self.name}: needs {bad}")

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def command(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def printed_table(self) -> str | None:
        return self.json_table or (self.summary[0].table if self.summary else None)


_ANALYSES: dict[str, Analysis] = {}
_GROUPS: dict[str, Group] = {}
_loaded = {"catalog": False}


def register(analysis: Analysis) -> Analysis:
    if analysis.name in _ANALYSES:
        raise ValueError(f"analysis {analysis.name} is declared twice")
    _ANALYSES[analysis.name] = analysis
    return analysis


def register_group(name: str, help: str) -> Group:
    _GROUPS[name] = Group(name, help)
    return _GROUPS[name]


def _load_catalog() -> None:
    if _loaded["catalog"]:
        return
    from . import catalog

    for info in sorted(pkgutil.iter_modules(catalog.__path__), key=lambda i: catalog.ORDER.index(i.name)
                       if i.name in catalog.ORDER else len(catalog.ORDER)):
        importlib.import_module(f"{catalog.__name__}.{info.name}")
    _loaded["catalog"] = True


def analyses() -> dict[str, Analysis]:
    _load_catalog()
    return dict(_ANALYSES)


def groups() -> dict[str, Group]:
    _load_catalog()
    return dict(_GROUPS)


def get(name: str) -> Analysis:
    """An analysis by 'group.command' (or 'group command', or 'group-command')."""
    _load_catalog()
    key = name.strip().replace(" ", ".")
    if key not in _ANALYSES and "-" in key and "." not in key:
        group, _, command = key.partition("-")
        key = f"{group}.{command}"
    if key not in _ANALYSES:
        import difflib

        close = difflib.get_close_matches(key, list(_ANALYSES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_ANALYSES))}"
        raise LLMProbeError(f"unknown analysis '{name}'{hint}")
    return _ANALYSES[key]


def resolve(target: str) -> Callable:
    """'package.module:function' -> the function (imported now)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
