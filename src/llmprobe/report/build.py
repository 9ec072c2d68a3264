"""``report build``: result folders -> one self-contained HTML page and the same content as
Markdown with its figures beside it.

    build_report(["results/smollm2"], out_dir="results/smollm2")
    -> results/smollm2/report.html, report.md, report_figures/*.png
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.errors import LLMProbeError
from ..core.output import atomic_write_text
from . import findings as _findings
from .catalog import EXPECTED, SectionSpec, TableSpec, figure_matches, group_rank, spec_for, title_for
from .render import render
from .results import ResultFolder, discover
from .views import Fact, FigureView, Finding, NotMeasured, Section, TableView, format_number, slug, table_view

FIGURES_DIR = "report_figures"


@dataclass
class Missing:
    command: str
    title: str
    hint: str


@dataclass
class Report:
    title: str
    model: str
    generated_at: str
    version: str
    sources: list[str]
    findings: list[Finding]
    not_measured: list[NotMeasured]
    missing: list[Missing]
    sections: list[Section]
    problems: list[str] = field(default_factory=list)
    figures_dir: str = FIGURES_DIR

    @property
    def incomplete(self) -> list[Section]:
        return [s for s in self.sections if not s.complete]


@dataclass
class BuiltReport:
    html: Path
    markdown: Path
    figures: list[Path]
    report: Report

    def summary(self) -> list[str]:
        """What a terminal should show after a build: the findings, the gaps, the files."""
        r = self.report
        lines = [f"{f.topic}: {f.headline}" for f in r.findings]
        lines += [f"{n.topic}: {n.reason}" for n in r.not_measured]
        if r.missing:
            lines.append("not in this report: " + ", ".join(m.command for m in r.missing))
        if r.incomplete:
            lines.append("incomplete runs: " + ", ".join(f"{s.folder} ({s.status})" for s in r.incomplete))
        lines += [f"report: {self.html}", f"markdown: {self.markdown}"]
        return lines


def build_report(dirs: list[str | Path], out_dir: str | Path | None = None, *, title: str | None = None,
                 max_extra_figures: int | None = None) -> BuiltReport:
    """Build ``report.html`` and ``report.md`` (+ ``report_figures/``) from result folders.

    ``dirs``: report folders (whose subfolders are result folders) or result folders.
    ``out_dir``: where the files go; default the first folder given.
    """
    folders = discover(dirs)
    if not folders:
        raise LLMProbeError("report build: no llmprobe result folder (a folder with manifest.json) under "
                            + ", ".join(str(d) for d in dirs))
    out = Path(out_dir) if out_dir is not None else Path(dirs[0])
    if out.exists() and not out.is_dir():
        raise LLMProbeError(f"report build: --out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    report = assemble(folders, out, title=title, max_extra_figures=max_extra_figures,
                      sources=[str(d) for d in dirs])
    return write(report, out, "report")


def assemble(folders: list[ResultFolder], out: Path, *, title: str | None = None,
             max_extra_figures: int | None = None, sources: list[str] | None = None) -> Report:
    folders = sorted(folders, key=lambda f: (group_rank(f.command), str(f.path)))
    used_ids: set[str] = set()
    sections: list[Section] = []
    by_command: dict[str, list[tuple[ResultFolder, str]]] = defaultdict(list)
    for folder in folders:
        section = build_section(folder, out, used_ids, max_extra_figures)
        sections.append(section)
        by_command[folder.command].append((folder, section.id))
    found, not_measured = _findings.compute(by_command)
    # problems met while computing findings belong to their sections
    for section, folder in zip(sections, folders):
        for problem in folder.problems:
            if problem not in section.notes:
                section.notes.append(problem)
    missing = [Missing(cmd, title_for(cmd), hint) for cmd, hint in EXPECTED if cmd not in by_command]
    model = _model_name(folders)
    return Report(
        title=title or f"llmprobe report: {model}",
        model=model,
        generated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        version=__version__,
        sources=sources if sources is not None else sorted({_shown(f.path.parent, out) for f in folders}),
        findings=found, not_measured=not_measured, missing=missing, sections=sections,
    )


def write(report: Report, out: Path, stem: str) -> BuiltReport:
    """Render both files; copy the Markdown's figures beside it (stale ones removed first)."""
    figures_dir = out / report.figures_dir
    if figures_dir.is_dir():
        shutil.rmtree(figures_dir)
    copied = []
    for section in report.sections:
        for figure in section.figures + section.extra_figures:
            target = figures_dir / figure.md_name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(figure.path, target)
            copied.append(target)
    html_path, md_path = out / f"{stem}.html", out / f"{stem}.md"
    atomic_write_text(html_path, render(f"{stem}.html.j2", report=report))
    atomic_write_text(md_path, render(f"{stem}.md.j2", report=report))
    return BuiltReport(html_path, md_path, copied, report)


# -- one section per result folder --------------------------------------------------------

def build_section(folder: ResultFolder, out: Path, used_ids: set[str], max_extra: int | None = None) -> Section:
    spec = spec_for(folder.command)
    base = slug(folder.path.name if folder.path.name not in ("", ".") else folder.command)
    section_id, n = base, 2
    while section_id in used_ids:
        section_id, n = f"{base}-{n}", n + 1
    used_ids.add(section_id)
    title = spec.title
    if folder.command == "unknown":
        title = f"Unreadable result folder {folder.path.name}"
    section = Section(id=section_id, title=title, command=folder.command, folder=_shown(folder.path, out),
                      status=folder.status, what=spec.what, error=str(folder.manifest.get("error") or ""))
    section.notes.extend(folder.problems)
    _add_figures(section, folder, spec, max_extra)
    _add_tables(section, folder, spec, out)
    section.facts = manifest_facts(folder.manifest)
    if not section.tables and not section.figures:
        section.notes.append("This run left no tables or figures." if folder.complete
                             else "This run stopped before writing any table or figure.")
    return section


def _add_figures(section: Section, folder: ResultFolder, spec: SectionSpec, max_extra: int | None) -> None:
    figures = folder.figures()
    by_stem = {}
    for path in figures:
        by_stem.setdefault(path.stem, path)
    key: list[Path] = []
    for pattern in spec.figures:
        for path in figures:
            if figure_matches(pattern, path.stem) and path not in key:
                key.append(path)
                if not pattern.endswith("*"):
                    break
    if not spec.figures:
        key = figures[:2]
    key, rest = key[:3], key[3:] + [p for p in figures if p not in key]
    limit = spec.max_extra_figures if max_extra is None else max_extra
    extra, left = rest[:limit], rest[limit:]

    def view(path: Path) -> FigureView:
        rel = path.relative_to(folder.path)
        caption = " / ".join(rel.with_suffix("").parts).replace("_", " ")
        # one flat, link-safe file name per figure (Markdown links break on spaces and parentheses)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{section.id}--{'--'.join(rel.parts)}")
        return FigureView(caption, path, name)

    section.figures = [view(p) for p in key]
    section.extra_figures = [view(p) for p in extra]
    section.unembedded_figures = [str(p.relative_to(folder.path)) for p in left + folder.other_figure_files()]


def _add_tables(section: Section, folder: ResultFolder, spec: SectionSpec, out: Path) -> None:
    names = folder.table_names()
    specs: list[TableSpec] = [t for t in spec.tables if t.name in names]
    if not spec.tables:
        specs = [TableSpec(n, n.replace("_", " ").capitalize()) for n in names]
    for table_spec in specs:
        frame = folder.table(table_spec.name)
        if frame is None:
            continue
        if table_spec.name == "precision_alpha_hill_results":
            frame = _findings.add_delta_alpha(frame)
        columns = _expand_columns(table_spec.columns, list(frame.columns))
        section.tables.append(table_view(
            frame, table_id=f"{section.id}--{slug(table_spec.name)}", name=table_spec.name,
            caption=table_spec.caption, source=_rel(folder.path / f"{table_spec.name}.csv", out),
            columns=columns, sort_by=table_spec.sort_by, descending=table_spec.descending, by_abs=table_spec.by_abs,
            note=_sort_note(table_spec)))
    shown = {t.name for t in specs}
    section.other_tables = [f"{n}.csv" for n in names if n not in shown]
    expected = [t.name for t in spec.tables if t.name not in names]
    if expected and folder.complete and not section.tables:
        section.notes.append("expected table(s) not found: " + ", ".join(f"{n}.csv" for n in expected))


def _sort_note(spec: TableSpec) -> str:
    if not spec.sort_by:
        return ""
    order = "largest |value| first" if spec.by_abs else ("largest first" if spec.descending else "smallest first")
    return f"Sorted by {spec.sort_by}, {order}; click a header to sort, type to filter."


def _expand_columns(wanted: tuple[str, ...], present: list[str]) -> list[str] | None:
    if not wanted:
        return None
    columns: list[str] = []
    for name in wanted:
        if name.startswith("*"):
            columns.extend(c for c in present if c.startswith(name[1:]) and c not in columns
                           and not c.startswith(("alpha_weighted", "alpha_hill")))
        elif name in present and name not in columns:
            columns.append(name)
    return columns or None


# -- manifest facts -----------------------------------------------------------------------

_WINDOW_KEYS = ("nsamples", "max_windows", "windows", "seqlen", "stride", "seed", "batch_size")
_SKIP_KEYS = {"llmprobe_version", "command", "command_line", "status", "started_at", "finished_at", "libraries",
              "files", "model", "dataset", "error", "options", "analysis", "windows_sha256", *_WINDOW_KEYS}


def manifest_facts(manifest: dict[str, Any]) -> list[Fact]:
    facts: list[Fact] = []
    model = manifest.get("model")
    if isinstance(model, dict):
        name = model.get("model") or model.get("id") or model.get("location") or model.get("name")
        if name:
            facts.append(Fact("model", str(name)))
        for key, value in model.items():
            if value and any(word in key for word in ("sha", "hash", "revision")):
                facts.append(Fact(f"model {key}", str(value)))
        how = ", ".join(f"{k} {model[k]}" for k in ("source", "dtype", "device") if model.get(k))
        if how:
            facts.append(Fact("loaded", how))
    elif model:
        facts.append(Fact("model", str(model)))
    dataset = manifest.get("dataset")
    if isinstance(dataset, dict):
        parts = [str(dataset.get("name", ""))]
        if dataset.get("split"):
            parts.append(f"split {dataset['split']}")
        if dataset.get("tokens"):
            parts.append(f"{format_number(dataset['tokens'])} tokens")
        facts.append(Fact("dataset", ", ".join(p for p in parts if p)))
        if dataset.get("sha256"):
            facts.append(Fact("dataset sha256", str(dataset["sha256"])))
    elif dataset:
        facts.append(Fact("dataset", str(dataset)))
    windows = ", ".join(f"{k} {manifest[k]}" for k in _WINDOW_KEYS if manifest.get(k) is not None)
    if windows:
        facts.append(Fact("windows", windows))
    if manifest.get("windows_sha256"):
        facts.append(Fact("windows sha256", str(manifest["windows_sha256"])))
    options = manifest.get("options")
    if isinstance(options, dict):  # every option value, as the registry records them
        shown = ", ".join(f"{k} {_short(v)}" for k, v in options.items()
                          if k != "model" and v not in (None, "", [], {}))
        if shown:
            facts.append(Fact("options", shown))
    others = ", ".join(f"{k} {_short(v)}" for k, v in manifest.items()
                       if k not in _SKIP_KEYS and v not in (None, "", [], {}))
    if others:
        facts.append(Fact("options and counts" if not isinstance(options, dict) else "run facts", others))
    status = str(manifest.get("status", "unknown"))
    timing = f"{manifest.get('started_at') or '?'} to {manifest.get('finished_at') or 'not finished'}"
    facts.append(Fact("status", f"{status} ({timing})"))
    libs = manifest.get("libraries") if isinstance(manifest.get("libraries"), dict) else {}
    versions = [f"llmprobe {manifest.get('llmprobe_version', '?')}"]
    versions += [f"{k} {libs[k]}" for k in ("torch", "transformers", "python") if k in libs]
    facts.append(Fact("versions", ", ".join(versions)))
    if manifest.get("command_line"):
        facts.append(Fact("command line", str(manifest["command_line"])))
    return facts


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def _model_name(folders: list[ResultFolder]) -> str:
    names = []
    for folder in folders:
        model = folder.manifest.get("model")
        name = (model.get("model") or model.get("id") or model.get("location")) if isinstance(model, dict) else model
        if name and str(name) not in names:
            names.append(str(name))
    return " + ".join(names) if names else "unknown model"


def _shown(path: Path, out: Path) -> str:
    """A result folder as the reader should see it: relative when under the report's folder."""
    path, out = Path(path).resolve(), Path(out).resolve()
    return path.relative_to(out).as_posix() if path.is_relative_to(out) else path.as_posix()


def _rel(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


__all__ = ["build_report", "assemble", "write", "manifest_facts", "Report", "BuiltReport", "TableView"]
