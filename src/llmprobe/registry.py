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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import LLMProbeError

if TYPE_CHECKING:  # pydantic is imported by the catalog modules, not by the registry itself
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
    many_figures: bool = False                  # figures described as data, many: workers start with the command
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
_loaded: dict[str, Any] = {"catalog": False}


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

    for info in _catalog_modules():
        importlib.import_module(f"{catalog.__name__}.{info.name}")
    _loaded["catalog"] = True


def load_group(name: str) -> None:
    """Import only the catalog module that declares group ``name`` (the CLI builds one group per
    run); if no module declares it under its own name, every module is imported."""
    if _loaded["catalog"] or name in _loaded.get("groups", set()):
        return
    module = next((g.module for g in declared_groups() if g.name == name), None)
    if module is None:
        _load_catalog()
        return
    importlib.import_module(module)
    _loaded.setdefault("groups", set()).add(name)
    if name not in _GROUPS:  # declared elsewhere after all: fall back to everything
        _load_catalog()


@dataclass(frozen=True)
class DeclaredGroup:
    name: str
    help: str
    module: str | None          # the catalog module that declares it (None: only known by importing)


def declared_groups() -> list[DeclaredGroup]:
    """The command groups in --help order, read from the catalog modules' source text.

    ``llmprobe --help`` lists groups only; reading the literal ``register_group("name", "help")``
    calls with :mod:`ast` spares it importing pydantic and every options class (a third of the
    start-up). A module without such a literal call is imported and asked instead.
    """
    if _loaded["catalog"]:
        return [DeclaredGroup(g.name, g.help, None) for g in groups().values()]
    import ast

    from . import catalog

    found: list[DeclaredGroup] = []
    for info in _catalog_modules():
        module = f"{catalog.__name__}.{info.name}"
        path = Path(catalog.__path__[0]) / f"{info.name}.py"
        literal = []
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            tree = None
        for node in ast.walk(tree) if tree is not None else ():
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    == "register_group" and len(node.args) == 2
                    and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)):
                literal.append(DeclaredGroup(node.args[0].value, node.args[1].value, module))
        if tree is None or not literal:
            importlib.import_module(module)
            known = {g.name for g in found}
            literal = [DeclaredGroup(g.name, g.help, module) for g in _GROUPS.values() if g.name not in known]
        found.extend(literal)
    return found


def _catalog_modules() -> list:
    from . import catalog

    return sorted(pkgutil.iter_modules(catalog.__path__), key=lambda i: catalog.ORDER.index(i.name)
                  if i.name in catalog.ORDER else len(catalog.ORDER))


def analyses() -> dict[str, Analysis]:
    _load_catalog()
    return dict(_ANALYSES)


def groups() -> dict[str, Group]:
    _load_catalog()
    from . import catalog

    rank = {name: i for i, name in enumerate(catalog.ORDER)}
    return {g.name: g for g in sorted(_GROUPS.values(), key=lambda g: rank.get(g.name, len(rank)))}


def group_analyses(name: str) -> list[Analysis]:
    """The analyses of one group, importing only its catalog module (see :func:`load_group`)."""
    load_group(name)
    return [a for a in _ANALYSES.values() if a.group == name]


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
