"""``report diff A B``: two runs side by side (base vs pruned or quantized, or two models of one
family), matched per (layer, role).

For each metric both runs measured, every (layer, role) gets A, B, delta = B - A and the
relative change delta / |A|; rows are listed largest |relative change| first. A (layer, role)
present in only one run is listed as unmatched, never dropped. Perplexity is compared as a
headline, with a warning when the two evaluations did not use the same data and windows.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import __version__
from ..core.errors import LLMProbeError
from ..core.output import atomic_write_bytes, atomic_write_text
from .build import _model_name, manifest_facts
from .findings import alpha_precisions
from .render import render
from .results import ResultFolder, discover, numeric
from .views import FigureView, Finding, TableView, format_number, slug, table_view

FIGURES_DIR = "diff_figures"
TOP_CHANGES = 20


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    command: str
    table: str
    column: str  # a regex when it starts with '^' (first matching column shared by both runs)
    what: str
    only_2d: bool = False  # weight tables: keep 2-D tensors (matrices) only


METRICS: tuple[Metric, ...] = (
    Metric("alpha", "Alpha-Hill", "weights alpha-hill", "precision_alpha_hill_results",
           r"^alpha_(?!weighted|hill)[a-z0-9_]+$",
           "Alpha-Hill exponent of each weight matrix's spectrum, at the first precision both runs share."),
    Metric("weight_kurtosis", "Weight kurtosis", "weights stats", "weight_stats", "kurtosis",
           "Excess kurtosis of each weight matrix's elements.", only_2d=True),
    Metric("stable_rank", "Stable rank", "weights spectrum", "weight_spectrum", "stable_rank",
           "Stable rank sum(s^2)/s1^2 of each weight matrix."),
    Metric("kurtosis", "Activation kurtosis", "activations kurtosis", "kurtosis_modules", "kurtosis_pooled",
           "Pooled excess kurtosis of each linear module's input activations."),
    Metric("abs_max", "Activation max|x|", "activations magnitude", "magnitude_modules", "abs_max",
           "Largest absolute input activation of each linear module."),
    Metric("max_median", "Activation max/median", "activations max-median", "max_median_modules", "ratio",
           "Largest over median token scale of each linear module's input."),
    Metric("quant_error", "Activation quantization error", "activations quant-error", "quant_error", "rel_mse",
           "Relative MSE of fake-quantizing each linear module's input."),
    Metric("fisher", "Fisher sensitivity", "activations fisher", "fisher", "fisher_mean",
           "Mean Fisher information of each linear module's input."),
    Metric("ablation", "Ablation sensitivity", "robustness ablation", "ablation", "delta_ppl",
           "Perplexity change when the target is ablated."),
)


@dataclass
class MetricView:
    id: str
    title: str
    what: str
    column: str
    matched: int
    unmatched: int
    figure: FigureView | None
    table: TableView | None
    unmatched_table: TableView | None
    note: str = ""


@dataclass
class DiffReport:
    title: str
    labels: tuple[str, str]
    paths: tuple[str, str]
    models: tuple[str, str]
    generated_at: str
    version: str
    headlines: list[Finding]
    perplexity: TableView | None
    perplexity_note: str
    largest: TableView | None
    metrics: list[MetricView]
    missing: list[str]
    facts: TableView | None
    figures_dir: str = FIGURES_DIR
    problems: list[str] = field(default_factory=list)


@dataclass
class BuiltDiff:
    html: Path
    markdown: Path
    figures: list[Path]
    report: DiffReport

    def summary(self) -> list[str]:
        """What a terminal should show after a diff: the largest changes, what was not compared."""
        lines = [f"{h.topic}: {h.headline}" for h in self.report.headlines]
        lines += [f"not compared: {m}" for m in self.report.missing]
        lines += [f"diff: {self.html}", f"markdown: {self.markdown}"]
        return lines


def default_diff_dir(a: str | Path, b: str | Path) -> Path:
    return Path("results") / f"diff--{slug(Path(a).resolve().name)}--vs--{slug(Path(b).resolve().name)}"


def diff_reports(a: str | Path, b: str | Path, out_dir: str | Path | None = None, *,
                 labels: tuple[str, str] | None = None, title: str | None = None) -> BuiltDiff:
    """Compare two report (or result) folders; write ``diff.html``, ``diff.md``, ``diff_figures/``."""
    runs = []
    for name in (a, b):
        folders = discover([name])
        if not folders:
            raise LLMProbeError(f"report diff: no llmprobe result folder (with manifest.json) under {name}")
        runs.append(folders)
    if labels is None:
        la, lb = Path(a).resolve().name or "A", Path(b).resolve().name or "B"
        labels = (f"A: {la}", f"B: {lb}") if la == lb else (la, lb)
    out = Path(out_dir) if out_dir is not None else default_diff_dir(a, b)
    if out.exists() and not out.is_dir():
        raise LLMProbeError(f"report diff: --out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    figures_dir = out / FIGURES_DIR
    if figures_dir.is_dir():
        shutil.rmtree(figures_dir)

    index_a, index_b = _index(runs[0]), _index(runs[1])
    metrics, missing, figures, all_rows = [], [], [], []
    for metric in METRICS:
        fa, fb = index_a.get(metric.command), index_b.get(metric.command)
        if fa is None and fb is None:
            continue
        if fa is None or fb is None:
            missing.append(f"{metric.title}: only {labels[0] if fb is None else labels[1]} has "
                           f"llmprobe {metric.command}")
            continue
        view, rows = _metric_view(metric, fa, fb, labels, out, figures)
        if view is not None:
            metrics.append(view)
            all_rows.extend(rows)
    ppl_table, ppl_note, headlines = _perplexity(index_a.get("eval perplexity"), index_b.get("eval perplexity"),
                                                 labels, missing)
    for view in metrics:
        if view.table is not None and view.table.rows:
            top = view.table.rows[0]
            cols = view.table.columns
            pct = top[cols.index("change_pct")]
            value = f"{float(pct.sort):+.1f}%" if pct.numeric and math.isfinite(float(pct.sort)) else pct.text
            headlines.append(Finding(
                view.title, f"Largest change of {view.title.lower()}: layer {top[0].text} {top[1].text}, "
                f"{top[cols.index('A')].text} -> {top[cols.index('B')].text} ({value}); "
                f"{view.matched} (layer, role) pairs matched, {view.unmatched} in one run only.",
                value, view.id))
    largest = None
    if all_rows:  # only pairs whose value changed
        frame = pd.DataFrame(all_rows)
        largest = table_view(frame, table_id="largest-changes", name="largest_changes",
                             caption="Largest changes across all metrics", source="",
                             sort_by="change_pct", by_abs=True,
                             note=f"Matched rows that changed, every metric, largest |relative change| first "
                                  f"(top {TOP_CHANGES}).")
        largest.rows = largest.rows[:TOP_CHANGES]
    model_a, model_b = _model_name(runs[0]), _model_name(runs[1])
    report = DiffReport(
        title=title or f"llmprobe diff: {labels[0]} vs {labels[1]}",
        labels=labels, paths=(str(a), str(b)), models=(model_a, model_b),
        generated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        version=__version__, headlines=headlines, perplexity=ppl_table, perplexity_note=ppl_note,
        largest=largest, metrics=metrics, missing=missing, facts=_facts(index_a, index_b, labels),
    )
    html, md = out / "diff.html", out / "diff.md"
    atomic_write_text(html, render("diff.html.j2", report=report))
    atomic_write_text(md, render("diff.md.j2", report=report))
    return BuiltDiff(html, md, figures, report)


def _index(folders: list[ResultFolder]) -> dict[str, ResultFolder]:
    """command -> folder; a complete run is preferred over an incomplete one of the same command."""
    index: dict[str, ResultFolder] = {}
    for folder in folders:
        if folder.command not in index or (folder.complete and not index[folder.command].complete):
            index[folder.command] = folder
    return index


def _value_column(metric: Metric, fa: pd.DataFrame, fb: pd.DataFrame) -> str | None:
    if not metric.column.startswith("^"):
        return metric.column if metric.column in fa.columns and metric.column in fb.columns else None
    if metric.key == "alpha":
        shared = [p for p in alpha_precisions(fa) if p in alpha_precisions(fb)]
        return f"alpha_{shared[0]}" if shared else None
    pattern = re.compile(metric.column)
    return next((c for c in fa.columns if pattern.match(c) and c in fb.columns), None)


def keyed(frame: pd.DataFrame, column: str, only_2d: bool = False) -> pd.DataFrame:
    """(layer, role) -> value. Several rows of one key (MoE experts, biases) keep the largest
    value; rows without a role cannot be matched and are left out."""
    layer_col = "layer" if "layer" in frame.columns else "layer_index" if "layer_index" in frame.columns else None
    if layer_col is None or "role" not in frame.columns:
        return pd.DataFrame(columns=["layer", "role", "value"])
    if only_2d and "ndim" in frame.columns:
        frame = frame[numeric(frame, "ndim") == 2]
    out = pd.DataFrame({
        "layer": numeric(frame, layer_col).astype("Int64"),
        "role": frame["role"].astype(str),
        "value": numeric(frame, column),
    })
    out = out[out["role"].ne("") & out["role"].ne("nan")]
    out["layer_key"] = out["layer"].astype("string").fillna("-")
    return out.groupby(["layer_key", "role"], as_index=False, sort=False).agg(
        layer=("layer", "first"), value=("value", "max"))


def _metric_view(metric: Metric, fa: ResultFolder, fb: ResultFolder, labels: tuple[str, str], out: Path,
                 figures: list[Path]) -> tuple[MetricView | None, list[dict]]:
    ta, tb = fa.table(metric.table), fb.table(metric.table)
    if ta is None or tb is None or ta.empty or tb.empty:
        return None, []
    column = _value_column(metric, ta, tb)
    if column is None:
        return None, []
    ka, kb = keyed(ta, column, metric.only_2d), keyed(tb, column, metric.only_2d)
    merged = ka.merge(kb, on=["layer_key", "role"], how="outer", suffixes=("_a", "_b"), indicator=True)
    merged["layer"] = merged["layer_a"].combine_first(merged["layer_b"])
    # an outer merge sorts the keys as text; put them back in model order (layer, then the order
    # roles first appear in the tables, which list modules as the model does)
    role_rank = {role: i for i, role in enumerate(dict.fromkeys([*ka["role"], *kb["role"]]))}
    merged = merged.assign(_layer=merged["layer"].astype("Float64").fillna(float("inf")),
                           _role=merged["role"].map(role_rank))
    merged = merged.sort_values(["_layer", "_role"], kind="stable").drop(columns=["_layer", "_role"])
    both = merged[merged["_merge"] == "both"].copy()
    both["delta"] = both["value_b"] - both["value_a"]
    both["change_pct"] = [(100.0 * d / abs(x)) if (x == x and x != 0) else math.nan
                          for d, x in zip(both["delta"], both["value_a"])]
    matched = pd.DataFrame({"layer": both["layer"], "role": both["role"], "A": both["value_a"],
                            "B": both["value_b"], "delta": both["delta"], "change_pct": both["change_pct"]})
    only = merged[merged["_merge"] != "both"]
    unmatched = pd.DataFrame({
        "layer": only["layer"], "role": only["role"],
        "present_in": [labels[0] if m == "left_only" else labels[1] for m in only["_merge"]],
        "value": only["value_a"].combine_first(only["value_b"]),
    })
    view_id = f"metric-{slug(metric.key)}"
    note = f"column {column} of {metric.table}.csv"
    if not (fa.complete and fb.complete):
        note += "; from an incomplete run"
    differing = _differing_facts(fa, fb)
    if differing:
        note += "; the two runs differ in " + "; ".join(differing)
    table = table_view(matched, table_id=view_id + "--table", name=metric.key, caption=f"{metric.title}: A vs B",
                       source="", sort_by="change_pct", by_abs=True,
                       note="Largest |relative change| first; delta = B - A, change_pct = 100 (B - A) / |A|.")
    unmatched_table = None
    if not unmatched.empty:
        unmatched_table = table_view(unmatched.sort_values(["present_in", "layer", "role"]),
                                     table_id=view_id + "--unmatched", name=metric.key + "_unmatched",
                                     caption=f"{metric.title}: (layer, role) in one run only", source="")
        unmatched_table.md_max_rows = None  # unmatched pairs are listed in full, never cut
    figure = _overlay_figure(metric, view_id, merged, column, labels, out, figures)
    view = MetricView(view_id, metric.title, metric.what, column, len(matched), len(unmatched), figure, table,
                      unmatched_table, note)
    rows = [{"metric": metric.title, "layer": r.layer, "role": r.role, "A": r.A, "B": r.B, "delta": r.delta,
             "change_pct": r.change_pct} for r in matched.itertuples() if r.delta != 0 and pd.notna(r.delta)]
    return view, rows


def _overlay_figure(metric: Metric, view_id: str, merged: pd.DataFrame, column: str, labels: tuple[str, str],
                    out: Path, figures: list[Path]) -> FigureView | None:
    import io

    from ..plots.report import overlay_by_layer

    rows = [{"layer": None if pd.isna(layer) else int(layer), "role": role,
             "a": None if pd.isna(a) else float(a), "b": None if pd.isna(b) else float(b)}
            for layer, role, a, b in zip(merged["layer"], merged["role"], merged["value_a"], merged["value_b"])]
    if not any(r["layer"] is not None for r in rows):
        return None
    fig = overlay_by_layer(rows, title=f"{metric.title} ({column}) per layer", ylabel=column, labels=labels)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    name = f"{view_id}.png"
    path = out / FIGURES_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    figures.append(path)
    return FigureView(f"{metric.title}: {labels[0]} (solid) vs {labels[1]} (dashed)", path, name)


_PPL_COLUMNS = ("ppl", "mean_nll", "bits_per_byte", "tokens", "windows", "seqlen")


def _perplexity(fa: ResultFolder | None, fb: ResultFolder | None, labels: tuple[str, str],
                missing: list[str]) -> tuple[TableView | None, str, list[Finding]]:
    if fa is None and fb is None:
        missing.append("Perplexity: neither run has llmprobe eval perplexity")
        return None, "", []
    if fa is None or fb is None:
        missing.append(f"Perplexity: only {labels[0] if fb is None else labels[1]} has llmprobe eval perplexity")
        return None, "", []
    ta, tb = fa.table("perplexity"), fb.table("perplexity")
    if ta is None or tb is None or ta.empty or tb.empty or "ppl" not in ta.columns or "ppl" not in tb.columns:
        missing.append("Perplexity: a perplexity table is missing or empty")
        return None, "", []
    ra, rb = ta.iloc[0], tb.iloc[0]
    rows = []
    for col in _PPL_COLUMNS:
        if col in ra.index and col in rb.index:
            a, b = pd.to_numeric(ra[col], errors="coerce"), pd.to_numeric(rb[col], errors="coerce")
            rows.append({"quantity": col, "A": a, "B": b, "delta": b - a,
                         "change_pct": 100 * (b - a) / abs(a) if a == a and a != 0 else math.nan})
    table = table_view(pd.DataFrame(rows), table_id="perplexity", name="perplexity", caption="Perplexity",
                       source="")
    differences = []
    da, db = fa.manifest.get("dataset"), fb.manifest.get("dataset")
    ha = da.get("sha256") if isinstance(da, dict) else da
    hb = db.get("sha256") if isinstance(db, dict) else db
    if ha != hb:
        differences.append("dataset")
    for col in ("seqlen", "stride", "windows", "tokens"):
        if col in ra.index and col in rb.index and not _same(ra[col], rb[col]):
            differences.append(col)
    note = ("not directly comparable: the runs differ in " + ", ".join(differences)) if differences else \
        "same dataset and windows in both runs"
    a, b = float(ra["ppl"]), float(rb["ppl"])
    change = f"{(b - a) / a * 100:+.2f}%" if a else "n/a"
    headline = Finding("Perplexity", f"Perplexity {format_number(a)} ({labels[0]}) -> {format_number(b)} "
                       f"({labels[1]}), {change}; {note}.", change, "perplexity")
    return table, note, [headline]


def _same(a, b) -> bool:
    """Equal as numbers when both are numbers (a row of an all-numeric table reads 64 as 64.0)."""
    na, nb = pd.to_numeric(pd.Series([a, b]), errors="coerce")
    if pd.notna(na) and pd.notna(nb):
        return bool(na == nb)
    return (pd.isna(a) and pd.isna(b)) or str(a) == str(b)


_SETUP_FACTS = ("model", "loaded", "dataset", "dataset sha256", "windows", "options", "options and counts")


def _differing_facts(fa: ResultFolder, fb: ResultFolder) -> list[str]:
    """The set-up facts (model, data, windows, options) on which two runs of one analysis differ:
    a change in the metric may come from them rather than from the model."""
    facts_a = {f.label: f.value for f in manifest_facts(fa.manifest)}
    facts_b = {f.label: f.value for f in manifest_facts(fb.manifest)}
    out = []
    for label in _SETUP_FACTS:
        a, b = facts_a.get(label, ""), facts_b.get(label, "")
        if a != b:
            if label.startswith("options"):
                pa, pb = set(a.split(", ")), set(b.split(", "))
                out.append(f"{label} ({', '.join(sorted(pa - pb)) or '-'} vs {', '.join(sorted(pb - pa)) or '-'})")
            else:
                out.append(label)
    return out


def _facts(index_a: dict[str, ResultFolder], index_b: dict[str, ResultFolder],
           labels: tuple[str, str]) -> TableView | None:
    """Manifest facts side by side, from the first analysis both runs have."""
    shared = [c for c in index_a if c in index_b]
    if not shared:
        return None
    fa, fb = index_a[shared[0]], index_b[shared[0]]
    facts_a = {f.label: f.value for f in manifest_facts(fa.manifest)}
    facts_b = {f.label: f.value for f in manifest_facts(fb.manifest)}
    labels_all = list(dict.fromkeys([*facts_a, *facts_b]))
    frame = pd.DataFrame({"fact": labels_all,
                          "same": ["yes" if facts_a.get(k) == facts_b.get(k) else "no" for k in labels_all],
                          labels[0]: [facts_a.get(k, "") for k in labels_all],
                          labels[1]: [facts_b.get(k, "") for k in labels_all]})
    return table_view(frame, table_id="facts", name="facts", caption=f"Run facts (from llmprobe {shared[0]})",
                      source="")
