"""The findings at the top of a report: numbers computed from the result tables, each naming
where it comes from.

Every finding function takes one result folder (and the id of its section) and returns the
findings it can support, or raises nothing when a table or column is missing: an analysis
whose tables do not hold what a finding needs simply contributes no finding, and a topic with
no source at all is listed as not measured.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .results import ResultFolder, first_column, numeric
from .views import Finding, NotMeasured, format_number

TOP = 3  # further entries named in a finding's details


def _layer(value) -> str:
    try:
        if value is None or pd.isna(value):
            return "outside the blocks"
        return f"layer {int(float(value))}"
    except (TypeError, ValueError):
        return f"layer {value}"


def _where(row: pd.Series, module_col: str | None = None) -> str:
    """'layer 3 mlp.down' from a row with layer/role (and a module name as a fallback)."""
    layer_col = next((c for c in ("layer", "layer_index") if c in row.index), None)
    parts = []
    if layer_col is not None:
        parts.append(_layer(row[layer_col]))
    if "role" in row.index and isinstance(row["role"], str) and row["role"]:
        parts.append(row["role"])
    if not parts and module_col and module_col in row.index:
        parts.append(str(row[module_col]))
    return " ".join(parts) or "?"


def _top(frame: pd.DataFrame, column: str, n: int = TOP + 1, by_abs: bool = False) -> pd.DataFrame:
    key = numeric(frame, column)
    if by_abs:
        key = key.abs()
    frame = frame.assign(_key=key).dropna(subset=["_key"])
    return frame.sort_values("_key", ascending=False, kind="stable").head(n)


def _suffix(folder: ResultFolder) -> str:
    return "" if folder.complete else " (from an incomplete run)"


def _data_name(folder: ResultFolder) -> str:
    dataset = folder.manifest.get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else dataset
    return Path(str(name)).name if name else "the evaluation text"


# -- one function per analysis ------------------------------------------------------------

def perplexity(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("perplexity")
    if frame is None or frame.empty or "ppl" not in frame.columns:
        return []
    row = frame.iloc[0]
    bits = f"; {format_number(row['bits_per_byte'])} bits per byte" if "bits_per_byte" in row.index else ""
    scored = f", {format_number(int(row['tokens']))} scored tokens" if "tokens" in row.index else ""
    windows = ""
    if "windows" in row.index and "seqlen" in row.index:
        windows = f" ({format_number(row['windows'], True)} windows of {format_number(row['seqlen'], True)} tokens"
        windows += scored + bits + ")"
    ppl = format_number(row["ppl"])
    return [Finding("Perplexity", f"Perplexity {ppl} on {_data_name(folder)}{windows}{_suffix(folder)}.",
                    ppl, anchor)]


def kurtosis(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("kurtosis_modules")
    col = frame is not None and first_column(frame, "kurtosis_pooled", "kurtosis_window_mean")
    if not col or frame.empty:
        return []
    # one row per layer: its most extreme module
    frame = frame.assign(_k=numeric(frame, col)).dropna(subset=["_k"])
    if frame.empty:
        return []
    per_layer = frame.sort_values("_k", ascending=False, kind="stable").drop_duplicates("layer")
    top = per_layer.head(TOP + 1)
    first = top.iloc[0]
    median = float(frame["_k"].median())
    value = format_number(first["_k"])
    details = [f"{_where(r)}: {format_number(r['_k'])}" for _, r in top.iloc[1:].iterrows()]
    details.append(f"median over all {len(frame)} modules: {format_number(median)}")
    return [Finding("Activation outliers",
                    f"Most extreme activation kurtosis: {_where(first, 'module')} input, excess kurtosis "
                    f"{value} ({'pooled' if col == 'kurtosis_pooled' else 'window mean'}; a Gaussian scores 0)"
                    f"{_suffix(folder)}.", value, anchor, details)]


def max_median(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("max_median_layers")
    if frame is None or frame.empty or "ratio" not in frame.columns:
        frame = folder.table("max_median_modules")
    if frame is None or frame.empty or "ratio" not in frame.columns:
        return []
    top = _top(frame, "ratio")
    if top.empty:
        return []
    first = top.iloc[0]
    value = format_number(first["_key"]) + "\u00d7"
    details = [f"{_where(r)}: {format_number(r['_key'])}\u00d7" for _, r in top.iloc[1:].iterrows()]
    return [Finding("Activation outliers",
                    f"Largest token-scale spike: at {_where(first, 'module')} the largest token max|x| is "
                    f"{value} the median token's{_suffix(folder)}.", value, anchor, details)]


def magnitude(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("magnitude_modules")
    if frame is None or frame.empty or "abs_max" not in frame.columns:
        return []
    top = _top(frame, "abs_max")
    if top.empty:
        return []
    first = top.iloc[0]
    value = format_number(first["_key"])
    details = []
    tokens = folder.table("magnitude_tokens")
    if tokens is not None and not tokens.empty and {"scope", "token_text", "max_max_abs"} <= set(tokens.columns):
        scoped = tokens[tokens["scope"] == "all"]
        if not scoped.empty:
            best = _top(scoped, "max_max_abs", 3)
            names = ", ".join(f"{r['token_text']!r} ({format_number(r['_key'])})" for _, r in best.iterrows())
            details.append(f"tokens with the largest spikes: {names}")
    return [Finding("Activation outliers",
                    f"Largest activation entering a linear module: max|x| = {value} at {_where(first, 'module')}"
                    f"{_suffix(folder)}.", value, anchor, details)]


def super_weights(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("super_weights")
    if frame is None:
        return []
    if frame.empty:
        return [Finding("Super weights", f"No super weights found{_suffix(folder)}.", "0", anchor)]
    effect = first_column(frame, "delta_ppl", "ppl_delta", "ppl_ratio", "kl", "mean_kl", "ppl")
    value_col = first_column(frame, "value", "weight", "weight_value")
    row_col = first_column(frame, "weight_row", "row", "out_channel", "output_channel")
    col_col = first_column(frame, "weight_col", "col", "column", "in_channel", "input_channel")
    ranked = _top(frame, effect) if effect else frame.assign(_key=float("nan"))
    first = ranked.iloc[0] if not ranked.empty else frame.iloc[0]
    coords = f"[{format_number(first[row_col], True)}, {format_number(first[col_col], True)}]" \
        if row_col and col_col else ""
    module = first_column(frame, "module", "name")
    where = f"{first[module]}{coords}" if module else f"{_where(first)} {coords}"
    weight = f" (value {format_number(first[value_col])})" if value_col else ""
    what = ""
    if effect:
        what = f"; zeroing it alone gives {effect} = {format_number(first[effect])}"
        if effect != "ppl" and "ppl" in frame.columns:
            what += f" (perplexity {format_number(first['ppl'])}{_reference_ppl(folder)})"
    details = []
    for _, r in ranked.iloc[1:TOP + 1].iterrows():
        c = f"[{format_number(r[row_col], True)}, {format_number(r[col_col], True)}]" if row_col and col_col else ""
        e = f": {effect} {format_number(r[effect])}" if effect else ""
        details.append(f"{r[module] if module else _where(r)}{c}{e}")
    checks = folder.table("super_weight_checks")
    if checks is not None and not checks.empty and "condition" in checks.columns:
        check_effect = first_column(checks, "ppl", "delta_ppl", "kl")
        if check_effect:
            for _, r in checks.iterrows():
                details.append(f"{r['condition']}: {check_effect} {format_number(r[check_effect])}")
    count = len(frame)
    return [Finding("Super weights",
                    f"{count} super weight{'s' if count != 1 else ''} found; the strongest is {where}{weight}{what}"
                    f"{_suffix(folder)}.", str(count), anchor, details)]


def _reference_ppl(folder: ResultFolder) -> str:
    """' vs 507.7 unmodified' from a robustness run's reference table, when it has one."""
    reference = folder.table("reference")
    if reference is None or reference.empty or "ppl" not in reference.columns:
        return ""
    return f" vs {format_number(reference.iloc[0]['ppl'])} unmodified"


def prune(folder: ResultFolder, anchor: str) -> list[Finding]:
    summary = folder.table("prune_summary")
    if summary is None or summary.empty or "achieved_sparsity" not in summary.columns:
        return []
    row = summary.iloc[0]
    how = " ".join(str(row[c]) for c in ("method", "pattern") if c in row.index and isinstance(row[c], str))
    value = f"{100 * float(row['achieved_sparsity']):.1f}%"
    ppl = ""
    if {"ppl_dense", "ppl_pruned"} <= set(row.index) and pd.notna(row["ppl_dense"]) and pd.notna(row["ppl_pruned"]):
        ppl = f"; perplexity {format_number(row['ppl_dense'])} -> {format_number(row['ppl_pruned'])}"
    error = ""
    if "mean_reconstruction_error" in row.index and pd.notna(row["mean_reconstruction_error"]):
        error = f"; mean relative reconstruction error {format_number(row['mean_reconstruction_error'])}"
    return [Finding("Pruning", f"Pruned{' (' + how + ')' if how else ''} to {value} sparsity{ppl}{error}"
                    f"{_suffix(folder)}.", value, anchor)]


def ablation(folder: ResultFolder, anchor: str) -> list[Finding]:
    found = []
    frame = folder.table("ablation")
    effect = frame is not None and first_column(frame, "delta_ppl", "ppl_delta", "kl", "mean_kl")
    if effect and not frame.empty:
        top = _top(frame, effect)
        if not top.empty:
            target = first_column(frame, "target", "name", "module")
            first = top.iloc[0]
            label = str(first[target]) if target else _where(first)
            value = format_number(first["_key"])
            details = [f"{r[target] if target else _where(r)}: {format_number(r['_key'])}"
                       for _, r in top.iloc[1:].iterrows()]
            ppl = f" (perplexity {format_number(first['ppl'])}{_reference_ppl(folder)})" if "ppl" in first.index else ""
            found.append(Finding("Sensitive layers",
                                 f"Most sensitive target under ablation: {label}, {effect} = {value}{ppl}"
                                 f"{_suffix(folder)}.", value, anchor, details))
    influence = folder.table("block_similarity")
    if influence is None:
        influence = folder.table("block_influence")
    col = influence is not None and first_column(influence, "block_influence", "influence")
    if col and not influence.empty:
        top = _top(influence, col)
        if not top.empty:
            first = top.iloc[0]
            value = format_number(first["_key"])
            details = [f"{_where(r)}: {format_number(r['_key'])}" for _, r in top.iloc[1:].iterrows()]
            agreement = folder.table("similarity_agreement")
            if agreement is not None and {"metric", "spearman_delta_ppl"} <= set(agreement.columns):
                for _, r in agreement[agreement["metric"] == col].iterrows():
                    details.append(f"Spearman with the measured block-ablation delta_ppl: "
                                   f"{format_number(r['spearman_delta_ppl'])} over {r.get('blocks', '?')} blocks")
            found.append(Finding("Sensitive layers",
                                 f"Highest block influence (1 - cos(input, output)): {_where(first)}, {value}"
                                 f"{_suffix(folder)}.", value, anchor, details))
    return found


def fisher(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("fisher_summary")
    if frame is not None and not frame.empty and "scope" in frame.columns and "fisher_mean" in frame.columns:
        frame = frame[frame["scope"] == "layer"]
    else:
        frame = folder.table("fisher")
    if frame is None or frame.empty or "fisher_mean" not in frame.columns:
        return []
    top = _top(frame, "fisher_mean")
    if top.empty:
        return []
    first = top.iloc[0]
    value = format_number(first["_key"])
    details = [f"{_where(r)}: {format_number(r['_key'])}" for _, r in top.iloc[1:].iterrows()]
    return [Finding("Sensitive layers",
                    f"Largest Fisher information (loss sensitivity of the inputs): {_where(first, 'module')}, "
                    f"{value}{_suffix(folder)}.", value, anchor, details)]


def alpha_precisions(frame: pd.DataFrame) -> list[str]:
    """Precisions of an alpha-hill table, in column order (the first is the reference)."""
    return [m.group(1) for c in frame.columns if (m := re.fullmatch(r"alpha_([a-z0-9_]+)", c))
            and not c.startswith(("alpha_weighted", "alpha_hill"))]


def add_delta_alpha(frame: pd.DataFrame) -> pd.DataFrame:
    """Add max_abs_delta_alpha (over the non-reference precisions) and the precision reaching it."""
    precisions = alpha_precisions(frame)
    if len(precisions) < 2:
        return frame
    ref = numeric(frame, f"alpha_{precisions[0]}")
    deltas = pd.DataFrame({p: (numeric(frame, f"alpha_{p}") - ref).abs() for p in precisions[1:]})
    valid = deltas.notna().any(axis=1)
    frame = frame.assign(max_abs_delta_alpha=deltas.max(axis=1, skipna=True).where(valid))
    frame["delta_alpha_precision"] = deltas.fillna(-1.0).idxmax(axis=1).where(valid)
    return frame


def alpha_hill(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("precision_alpha_hill_results")
    if frame is None or frame.empty:
        return []
    precisions = alpha_precisions(frame)
    if len(precisions) < 2:
        return []
    frame = add_delta_alpha(frame)
    top = _top(frame, "max_abs_delta_alpha")
    if top.empty:
        return []
    name = first_column(frame, "layer_name", "name")
    first = top.iloc[0]
    value = format_number(first["_key"])
    median = format_number(float(numeric(frame, "max_abs_delta_alpha").median()))
    details = [f"{r[name]}: {format_number(r['_key'])} ({r['delta_alpha_precision']})"
               for _, r in top.iloc[1:].iterrows()]
    details.append(f"median over {int(numeric(frame, 'max_abs_delta_alpha').notna().sum())} matrices: {median}")
    return [Finding("Precision-sensitive matrices",
                    f"Most precision-sensitive weight spectrum: {first[name]}, |delta alpha| = {value} "
                    f"({first['delta_alpha_precision']} vs {precisions[0]}){_suffix(folder)}.", value, anchor, details)]


def quant_error(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("quant_error")
    if frame is None or frame.empty or "rel_mse" not in frame.columns:
        return []
    # q/k/v (gate/up) read one input and carry the same numbers: count each input once
    if "input_group" in frame.columns and "role" in frame.columns:
        roles = frame.groupby("input_group", sort=False)["role"].agg(lambda r: "+".join(dict.fromkeys(map(str, r))))
        frame = frame.drop_duplicates("input_group").assign(role=lambda f: f["input_group"].map(roles))
    top = _top(frame, "rel_mse")
    if top.empty:
        return []
    first = top.iloc[0]
    value = format_number(first["_key"])
    fmt = " ".join(str(first[c]) for c in ("format", "granularity") if c in first.index and isinstance(first[c], str))
    sqnr = f", SQNR {format_number(first['sqnr_db'])} dB" if "sqnr_db" in first.index else ""
    details = [f"{_where(r)}: {format_number(r['_key'])}" for _, r in top.iloc[1:].iterrows()]
    summary = folder.table("quant_error_summary")
    if summary is not None and {"scope", "rel_mse_pooled"} <= set(summary.columns):
        model = summary[summary["scope"] == "model"]
        if not model.empty:
            details.append(f"whole model: relative MSE {format_number(model.iloc[0]['rel_mse_pooled'])}")
    return [Finding("Precision-sensitive matrices",
                    f"Highest activation quantization error{' (' + fmt + ')' if fmt else ''}: "
                    f"{_where(first, 'module')} input, relative MSE {value}{sqnr}{_suffix(folder)}.",
                    value, anchor, details)]


def weight_stats(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("weight_stats")
    if frame is None or frame.empty or "kurtosis" not in frame.columns:
        return []
    if "ndim" in frame.columns:  # matrices: norm vectors are not what a quantizer stores in low bits
        frame = frame[numeric(frame, "ndim") == 2]
    top = _top(frame, "kurtosis")
    if top.empty:
        return []
    first = top.iloc[0]
    value = format_number(first["_key"])
    absmax = f", abs-max {format_number(first['abs_max'])}" if "abs_max" in first.index else ""
    details = [f"{r['name']}: {format_number(r['_key'])}" for _, r in top.iloc[1:].iterrows()]
    return [Finding("Weights", f"Heaviest-tailed weight matrix: {first['name']}, excess kurtosis {value}{absmax}"
                    f"{_suffix(folder)}.", value, anchor, details)]


def quant_plan(folder: ResultFolder, anchor: str) -> list[Finding]:
    summary = folder.table("quant_plan_summary")
    if summary is not None and not summary.empty and "plan_avg_bits" in summary.columns:
        row = summary.iloc[0]
        value = format_number(row["plan_avg_bits"])
        formats = str(row["formats"]).replace(";", ", ").replace(":", " x ") if "formats" in row.index else ""
        budget = f" (budget {format_number(row['budget_avg_bits'])})" if "budget_avg_bits" in row.index else ""
        metric = f", minimising {row['metric']}" if "metric" in row.index else ""
        modules = f" for {format_number(row['modules'], True)} modules" if "modules" in row.index else ""
        return [Finding("Quantization plan", f"Quantization plan at {value} average bits{budget}{modules}{metric}: "
                        f"{formats}{_suffix(folder)}.", value, anchor)]
    frame = folder.table("quant_plan")
    if frame is None or frame.empty:
        return []
    fmt = first_column(frame, "format", "bits", "w_bits")
    counts = frame[fmt].astype(str).value_counts() if fmt else pd.Series(dtype=int)
    spread = ", ".join(f"{f} x {n}" for f, n in counts.items())
    return [Finding("Quantization plan", f"Quantization plan for {len(frame)} modules: {spread}{_suffix(folder)}.",
                    str(len(frame)), anchor)]


def quant_eval(folder: ResultFolder, anchor: str) -> list[Finding]:
    frame = folder.table("quant_eval")
    if frame is None or frame.empty:
        frame = folder.table("quant_sweep")
    if frame is None or frame.empty or not {"kind", "ppl", "avg_bits"} <= set(frame.columns):
        return []
    plans = frame[frame["kind"] == "plan"]
    if plans.empty:
        return []
    found = []
    for _, plan in plans.iterrows():
        bits = float(plan["avg_bits"])
        others = frame[(frame["kind"].isin(["uniform", "random"])) & ((numeric(frame, "avg_bits") - bits).abs() < 0.05)]
        compare = "; ".join(f"{k} {format_number(numeric(g, 'ppl').min())}" + (" (best)" if len(g) > 1 else "")
                            for k, g in others.groupby("kind"))
        found.append(Finding("Quantization plan",
                             f"Perplexity under the plan at {format_number(bits)} average bits: "
                             f"{format_number(plan['ppl'])}" + (f" (vs {compare} at the same size)" if compare else "")
                             + f"{_suffix(folder)}.", format_number(plan["ppl"]), anchor))
    return found[:3]


#: command -> finding function, in the order findings are listed.
FINDERS: list[tuple[str, Callable[[ResultFolder, str], list[Finding]]]] = [
    ("eval perplexity", perplexity),
    ("activations kurtosis", kurtosis),
    ("activations max-median", max_median),
    ("activations magnitude", magnitude),
    ("robustness super-weights", super_weights),
    ("robustness ablation", ablation),
    ("activations fisher", fisher),
    ("weights alpha-hill", alpha_hill),
    ("activations quant-error", quant_error),
    ("weights stats", weight_stats),
    ("prune run", prune),
    ("quant plan", quant_plan),
    ("quant eval", quant_eval),
]

#: Topics the report always answers; each lists the analyses that can support it.
TOPICS: list[tuple[str, tuple[str, ...]]] = [
    ("Perplexity", ("eval perplexity",)),
    ("Activation outliers", ("activations kurtosis", "activations max-median", "activations magnitude")),
    ("Super weights", ("robustness super-weights",)),
    ("Sensitive layers", ("robustness ablation", "activations fisher")),
    ("Precision-sensitive matrices", ("weights alpha-hill", "activations quant-error")),
]


def compute(sources: dict[str, list[tuple[ResultFolder, str]]]) -> tuple[list[Finding], list[NotMeasured]]:
    """Findings from the result folders (command -> [(folder, section id)]), and the topics
    without any source. The first complete folder of a command is used."""
    findings: list[Finding] = []
    for command, finder in FINDERS:
        candidates = sources.get(command, [])
        if not candidates:
            continue
        folder, anchor = next(((f, a) for f, a in candidates if f.complete), candidates[0])
        try:
            findings.extend(finder(folder, anchor))
        except (KeyError, ValueError, TypeError, IndexError) as exc:  # odd tables: say so, keep going
            folder.problems.append(f"finding from {command} failed: {type(exc).__name__}: {exc}")
    covered = {f.topic for f in findings}
    missing = []
    for topic, commands in TOPICS:
        if topic in covered:
            continue
        present = [c for c in commands if sources.get(c)]
        if present:
            reason = "the " + " / ".join(present) + " results hold no usable rows"
        else:
            reason = "not measured: run " + " or ".join(f"llmprobe {c}" for c in commands)
        missing.append(NotMeasured(topic, reason))
    # group findings by topic, in topic order, keeping the finder order inside a topic
    order = {t: i for i, (t, _) in enumerate(TOPICS)}
    findings.sort(key=lambda f: order.get(f.topic, len(order)))
    return findings, missing
