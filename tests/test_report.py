"""``report build`` / ``report diff``: findings against planted numbers, partial and incomplete
results, escaping, a self-contained page, Markdown whose figures exist, and a real headless
Chromium that opens the page, sorts a table and sees every image decode."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from llmprobe.core.errors import LLMProbeError
from llmprobe.report import build_report, diff_reports
from llmprobe.report.findings import add_delta_alpha
from llmprobe.report.views import format_number, md_text, table_view

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
LAYERS = 4


# -- fixtures: result folders written the way llmprobe writes them -----------------------

def write_result(root: Path, folder: str, command: str, tables: dict[str, pd.DataFrame], *,
                 figures: tuple[str, ...] = (), status: str = "complete", **manifest) -> Path:
    out = root / folder
    out.mkdir(parents=True)
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    for stem in figures:
        fig = Figure(figsize=(3, 2))
        fig.add_subplot().plot([0, 1, 2], [1, 3, 2])
        (out / "plots").mkdir(exist_ok=True)
        fig.savefig(out / "plots" / f"{stem}.png", dpi=40)
    doc = {"llmprobe_version": "0.1.0", "command": command, "status": status,
           "command_line": f"llmprobe {command} --out {out}", "started_at": "2026-01-01T00:00:00+00:00",
           "finished_at": None if status != "complete" else "2026-01-01T00:01:00+00:00",
           "libraries": {"torch": "2.x", "python": "3.11"},
           "model": {"model": "tiny-llama", "source": "local", "sha256": "ab" * 32, "dtype": "float32"},
           "files": [f"{n}.csv" for n in tables], **manifest}
    (out / "manifest.json").write_text(json.dumps(doc))
    return out


def module_frame(column: str, planted: dict[tuple[int, str], float], base: float = 1.0,
                 layers: int = LAYERS, **extra) -> pd.DataFrame:
    rows = []
    for layer in range(layers):
        for i, role in enumerate(ROLES):
            group = f"model.layers.{layer}.attn_in" if role in ("attn.q", "attn.k", "attn.v") else \
                f"model.layers.{layer}.mlp_in" if role in ("mlp.gate", "mlp.up") else f"model.layers.{layer}.{role}"
            rows.append({"module": f"model.layers.{layer}.{role}", "layer": layer, "role": role, "input_group": group,
                         column: planted.get((layer, role), base + 0.01 * (layer * 7 + i)), **extra})
    return pd.DataFrame(rows)


def alpha_frame(planted_delta: dict[str, float], layers: int = LAYERS) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(layers):
        for role in ROLES:
            name = f"model.layers.{layer}.{role}.weight"
            alpha = 3 + rng.random()
            small = 1e-4 * rng.standard_normal(2)
            rows.append({"layer_name": name, "layer_index": layer, "role": role, "alpha_fp32": alpha,
                         "alpha_fp16": alpha + small[0], "alpha_bf16": alpha + small[1] + planted_delta.get(name, 0.0),
                         "alpha_weighted_fp32": 10.0, "status": "ok"})
    return pd.DataFrame(rows)


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return make_synthetic(tmp_path / "run")


def make_synthetic(root: Path) -> Path:
    """A report folder with planted extremes, one folder per analysis."""
    write_result(root, "eval-perplexity", "eval perplexity", {"perplexity": pd.DataFrame([{
        "model": "tiny-llama", "dataset": "wiki.test.raw", "protocol": "non-overlapping", "seqlen": 64,
        "windows": 4, "tokens": 252, "nll_sum": 252 * math.log(12.5), "mean_nll": math.log(12.5), "ppl": 12.5,
        "bytes": 1000, "bits_per_byte": 1.1}])},
        dataset={"name": "/data/wiki.test.raw", "sha256": "cd" * 32, "tokens": 9999}, seqlen=64, max_windows=4)
    write_result(root, "activations-kurtosis", "activations kurtosis", {
        "kurtosis_modules": module_frame("kurtosis_pooled", {(2, "mlp.down"): 5000.0, (1, "mlp.down"): 800.0},
                                         kurtosis_window_mean=1.0),
    }, figures=("kurtosis_role_layers", "kurtosis_per_layer"), dataset={"name": "wiki", "sha256": "cd" * 32},
        nsamples=8, seqlen=64, seed=0)
    write_result(root, "activations-max-median", "activations max-median", {
        "max_median_layers": pd.DataFrame({"layer": range(LAYERS), "inputs": 4,
                                           "ratio": [3.0, 300.0, 5.0, float("inf")][:LAYERS]}),
    })
    write_result(root, "activations-magnitude", "activations magnitude", {
        "magnitude_modules": module_frame("abs_max", {(3, "mlp.down"): 4321.0}),
        "magnitude_tokens": pd.DataFrame({"scope": ["all", "all"], "rank": [1, 2], "token_id": [7, 9],
                                          "token_text": ["<b>bold</b>", " |pipe|"], "occurrences": [1, 2],
                                          "mean_max_abs": [10.0, 5.0], "max_max_abs": [4321.0, 99.0]}),
    }, figures=("magnitude_role_layers",))
    write_result(root, "activations-quant-error", "activations quant-error", {
        "quant_error": module_frame("rel_mse", {(1, "mlp.down"): 0.5}, base=0.01, format="int4",
                                    granularity="per-token", sqnr_db=3.0),
    })
    write_result(root, "weights-alpha-hill", "weights alpha-hill", {
        "precision_alpha_hill_results": alpha_frame({"model.layers.3.attn.v.weight": 0.3}),
    }, figures=("alpha_distribution_by_precision",), precisions=["fp32", "fp16", "bf16"])
    # the robustness and quant tables as those analyses write them
    write_result(root, "robustness-super-weights", "robustness super-weights", {
        "super_weights": pd.DataFrame({"iteration": [1, 1], "layer": [1, 2],
                                       "module": ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"],
                                       "weight_row": [5, 17], "weight_col": [11, 3], "value": [-2.5, 0.9],
                                       "ppl": [900.0, 13.0], "delta_ppl": [887.5, 0.5], "kl": [3.0, 0.01]}),
        "super_weight_checks": pd.DataFrame({"condition": ["all super weights zeroed",
                                                           "other outliers zeroed, super weights kept"],
                                             "weights_zeroed": [2, 40], "ppl": [950.0, 12.7],
                                             "delta_ppl": [937.5, 0.2]}),
    })
    write_result(root, "robustness-ablation", "robustness ablation", {
        "ablation": pd.DataFrame({"rank": range(1, LAYERS + 1), "target": [f"model.layers.{i}" for i in range(LAYERS)],
                                  "layer": range(LAYERS), "role": "block", "granularity": "block",
                                  "delta_ppl": [50.0, 1.0, 2.0, 3.0], "kl": 0.1}),
        "block_similarity": pd.DataFrame({"layer": range(LAYERS), "block_influence": [0.9, 0.1, 0.2, 0.3],
                                          "span": 1, "angular_distance": 0.2}),
        "similarity_agreement": pd.DataFrame({"metric": ["block_influence"], "span": [1], "blocks": [LAYERS],
                                              "spearman_delta_ppl": [0.8], "spearman_kl": [0.5]}),
    })
    return root


def add_quant(root: Path) -> None:
    write_result(root, "quant-plan", "quant plan", {
        "quant_plan": pd.DataFrame({"module": ["a", "b", "c"], "layer": [0, 0, 1], "role": ["attn.q", "mlp.down",
                                                                                         "attn.q"],
                                    "params": 100, "format": ["int2", "int4", "int8"], "sensitivity": [1.0, 2.0, 3.0]}),
        "quant_plan_summary": pd.DataFrame([{"metric": "output_error", "modules": 3, "budget_avg_bits": 4.75,
                                             "plan_avg_bits": 4.667, "formats": "int2:1;int4:1;int8:1"}]),
    })
    write_result(root, "quant-eval", "quant eval", {
        "quant_eval": pd.DataFrame({"label": ["plan", "uniform int4", "random 0", "random 1"],
                                    "kind": ["plan", "uniform", "random", "random"],
                                    "avg_bits": [4.0, 4.0, 4.01, 3.99], "ppl": [20.0, 25.0, 31.0, 29.0]}),
    })


# -- HTML helpers ---------------------------------------------------------------------------

class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.imgs, self.scripts_src, self.links = set(), [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        if tag == "script" and "src" in attrs:
            self.scripts_src.append(attrs["src"])
        if tag == "link":
            self.links.append(attrs.get("href", ""))


def parse_html(path: Path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector


def markdown_images_and_links(md_path: Path) -> tuple[list[str], list[str]]:
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(md_path.read_text(encoding="utf-8"))
    images, links = [], []

    def walk(items):
        for tok in items:
            if tok.type == "image":
                images.append(tok.attrGet("src"))
            if tok.type == "link_open":
                links.append(tok.attrGet("href"))
            if tok.children:
                walk(tok.children)

    walk(tokens)
    return images, links


def assert_markdown_complete(md_path: Path) -> list[str]:
    """The Markdown parses; every image and relative link it names exists; every #anchor too."""
    from urllib.parse import unquote

    images, links = markdown_images_and_links(md_path)
    text = md_path.read_text(encoding="utf-8")
    for src in images:
        assert not src.startswith(("http:", "https:", "data:")), src
        assert (md_path.parent / unquote(src)).is_file(), f"figure {src} named in {md_path.name} is missing"
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for href in links:
        if href.startswith("#"):
            assert href[1:] in anchors, f"link {href} has no anchor"
        else:
            assert (md_path.parent / unquote(href)).exists(), f"link {href} points nowhere"
    return images


# -- pure helpers ---------------------------------------------------------------------------

def test_format_number():
    assert format_number(12.5) == "12.5"
    assert format_number(171701.2) == "171,701"
    assert format_number(2.5e-5) == "2.500e-05"
    assert format_number(3e12) == "3.000e+12"
    assert format_number(float("nan")) == ""
    assert format_number(float("inf")) == "inf"
    assert format_number(4.0, integral=True) == "4"
    assert format_number(None) == ""


def test_table_view_sorts_and_keeps_numbers():
    frame = pd.DataFrame({"name": ["a", "b", "c", "d"], "v": [1.0, -7.0, float("nan"), 3.0]})
    by_value = table_view(frame, table_id="t", name="t", caption="t", source="", sort_by="v")
    assert [row[0].text for row in by_value.rows] == ["d", "a", "b", "c"]  # NaN last
    by_abs = table_view(frame, table_id="t", name="t", caption="t", source="", sort_by="v", by_abs=True)
    assert [row[0].text for row in by_abs.rows] == ["b", "d", "a", "c"]
    assert by_abs.rows[0][1].sort == repr(-7.0) and by_abs.rows[0][1].numeric
    assert by_abs.numeric_columns == [False, True]


def test_add_delta_alpha_matches_plain_loop():
    frame = alpha_frame({"model.layers.2.mlp.up.weight": -0.25})
    out = add_delta_alpha(frame)
    for _, row in out.iterrows():
        expected = max(abs(row["alpha_fp16"] - row["alpha_fp32"]), abs(row["alpha_bf16"] - row["alpha_fp32"]))
        assert row["max_abs_delta_alpha"] == pytest.approx(expected, abs=0)
        which = "fp16" if abs(row["alpha_fp16"] - row["alpha_fp32"]) >= abs(row["alpha_bf16"] - row["alpha_fp32"]) \
            else "bf16"
        assert row["delta_alpha_precision"] == which


def test_md_text_escapes_markup():
    assert md_text("a|b") == "a\\|b"
    assert md_text("<script>") == "\\<script\\>"
    assert md_text("x\ny") == "x\\\\ny"  # a line break is shown, not obeyed (the backslash escaped too)
    assert md_text("**bold**") == "\\*\\*bold\\*\\*"


def test_manifest_facts_name_model_data_windows_and_command():
    from llmprobe.report.build import manifest_facts

    facts = {f.label: f.value for f in manifest_facts({
        "command": "activations kurtosis", "status": "complete", "command_line": "llmprobe activations kurtosis",
        "llmprobe_version": "0.1.0", "libraries": {"torch": "2.13", "python": "3.11"},
        "model": {"model": "m", "weights_sha256": "aa", "source": "local", "dtype": "float32"},
        "dataset": {"name": "wiki", "sha256": "bb", "tokens": 123456}, "nsamples": 8, "seqlen": 128,
        "windows_sha256": "cc", "options": {"nsamples": 8, "roles": None, "model": "m", "rotate": "none"},
        "modules": 210, "analysis": "activations.kurtosis"})}
    assert facts["model"] == "m" and facts["model weights_sha256"] == "aa"
    assert facts["dataset"] == "wiki, 123,456 tokens" and facts["dataset sha256"] == "bb"
    assert facts["windows"] == "nsamples 8, seqlen 128" and facts["windows sha256"] == "cc"
    assert facts["options"] == "nsamples 8, rotate none"  # unset options and the model left out
    assert facts["run facts"] == "modules 210"
    assert facts["versions"] == "llmprobe 0.1.0, torch 2.13, python 3.11"
    assert facts["command line"] == "llmprobe activations kurtosis"


# -- report build ---------------------------------------------------------------------------

def test_findings_name_the_planted_extremes(synthetic, tmp_path):
    built = build_report([synthetic], tmp_path / "out")
    findings = {(f.topic, f.value): f for f in built.report.findings}
    text = "\n".join(f.headline + " " + " ".join(f.details) for f in built.report.findings)
    assert ("Perplexity", "12.5") in findings
    assert ("Activation outliers", "5000") in findings
    assert "layer 2 mlp.down" in findings[("Activation outliers", "5000")].headline
    assert ("Activation outliers", "inf\u00d7") in findings  # a zero median is an infinite ratio, shown
    assert ("Activation outliers", "4321") in findings and "layer 3 mlp.down" in text
    assert ("Super weights", "2") in findings
    assert "model.layers.1.mlp.down_proj[5, 11]" in findings[("Super weights", "2")].headline
    assert "887.5" in findings[("Super weights", "2")].headline
    assert "all super weights zeroed: ppl 950" in findings[("Super weights", "2")].details
    assert ("Sensitive layers", "50") in findings and "model.layers.0" in text
    influence = findings[("Sensitive layers", "0.9")]
    assert "layer 0" in influence.headline and "Spearman" in " ".join(influence.details)
    alpha = next(f for f in built.report.findings if "spectrum" in f.headline)
    assert "model.layers.3.attn.v.weight" in alpha.headline and "(bf16 vs fp32)" in alpha.headline
    assert float(alpha.value) == pytest.approx(0.3, abs=1e-3)  # planted 0.3 on top of ~1e-4 noise
    assert ("Precision-sensitive matrices", "0.5") in findings
    assert "layer 1 mlp.down" in findings[("Precision-sensitive matrices", "0.5")].headline
    assert built.report.not_measured == [] and built.report.missing == [
        m for m in built.report.missing if m.command in ("weights spectrum", "weights stats")]
    # every finding links to a section that exists in the page
    page = parse_html(built.html)
    for finding in built.report.findings:
        assert finding.anchor in page.ids
        assert f"#{finding.anchor}" in page.hrefs


def test_quant_plan_section_only_when_present(synthetic, tmp_path):
    without = build_report([synthetic], tmp_path / "without")
    assert not [f for f in without.report.findings if f.topic == "Quantization plan"]
    assert "Quantization plan" not in {n.topic for n in without.report.not_measured}
    add_quant(synthetic)
    built = build_report([synthetic], tmp_path / "with")
    plan = [f for f in built.report.findings if f.topic == "Quantization plan"]
    assert [f.value for f in plan] == ["4.667", "20"]
    assert "int2 x 1, int4 x 1, int8 x 1" in plan[0].headline and "budget 4.75" in plan[0].headline
    assert "uniform 25" in plan[1].headline and "random 29 (best)" in plan[1].headline
    assert {"quant plan", "quant eval"} <= {s.command for s in built.report.sections}


def test_html_is_self_contained_and_escaped(synthetic, tmp_path):
    built = build_report([synthetic], tmp_path / "out")
    html = built.html.read_text(encoding="utf-8")
    page = parse_html(built.html)
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert not page.scripts_src and not page.links
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "default-src 'none'" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    md = built.markdown.read_text(encoding="utf-8")
    assert "<b>bold</b>" not in md
    # a pipe inside a cell does not split the Markdown row: every row of the token table has the
    # header's cell count
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    texts = [t.content for t in tokens if t.type == "inline"]
    assert any("|pipe|" in t for t in texts)


def test_markdown_parses_and_every_figure_exists(synthetic, tmp_path):
    built = build_report([synthetic], tmp_path / "out")
    images = assert_markdown_complete(built.markdown)
    assert len(images) == len(built.figures) >= 4
    assert all(p.parent.name == "report_figures" for p in built.figures)


def test_missing_analysis_is_named_and_build_still_works(synthetic, tmp_path):
    shutil.rmtree(synthetic / "activations-kurtosis")
    shutil.rmtree(synthetic / "robustness-super-weights")
    built = build_report([synthetic], tmp_path / "out")
    commands = [s.command for s in built.report.sections]
    assert "activations kurtosis" not in commands
    missing = {m.command for m in built.report.missing}
    assert {"activations kurtosis", "robustness super-weights"} <= missing
    assert [n.topic for n in built.report.not_measured] == ["Super weights"]
    summary = built.summary()
    assert "Super weights: not measured: run llmprobe robustness super-weights" in summary
    assert any(line.startswith("not in this report: ") and "activations kurtosis" in line for line in summary)
    assert summary[-2:] == [f"report: {built.html}", f"markdown: {built.markdown}"]
    html = built.html.read_text(encoding="utf-8")
    assert "Activation kurtosis (missing)" in html and "llmprobe robustness super-weights" in html
    assert_markdown_complete(built.markdown)


def test_incomplete_and_unreadable_runs_are_shown_not_fatal(synthetic, tmp_path):
    write_result(synthetic, "activations-fisher", "activations fisher", {}, status="incomplete",
                 error="KeyboardInterrupt")
    broken = synthetic / "weights-stats"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    (synthetic / "activations-magnitude" / "magnitude_tokens.csv").write_bytes(b"\x00\xff\xfe broken \"")
    built = build_report([synthetic], tmp_path / "out")
    by_command = {s.command: s for s in built.report.sections}
    fisher = by_command["activations fisher"]
    assert fisher.status == "incomplete" and fisher.error == "KeyboardInterrupt"
    assert any("stopped before writing" in n for n in fisher.notes)
    assert "unknown" in by_command and by_command["unknown"].status == "unreadable"
    html = built.html.read_text(encoding="utf-8")
    assert "This run is incomplete: KeyboardInterrupt" in html
    assert [s.command for s in built.report.incomplete] == ["activations fisher", "unknown"]


def test_report_folder_of_report_run_and_errors(synthetic, tmp_path):
    # a manifest of a report command marks the report folder, whose subfolders are the results
    (synthetic / "manifest.json").write_text(json.dumps({"command": "report run", "status": "complete"}))
    built = build_report([synthetic])  # default output: the folder itself
    assert built.html == synthetic / "report.html" and len(built.report.sections) == 8
    rebuilt = build_report([synthetic])  # building again does not read its own output
    assert len(rebuilt.report.sections) == 8
    # one result folder on its own; building twice does not take the report's copies for figures
    single = synthetic / "activations-kurtosis"
    first = build_report([single])
    again = build_report([single])
    assert len(again.report.sections) == 1 and len(again.figures) == len(first.figures) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMProbeError, match="no llmprobe result folder"):
        build_report([empty])
    with pytest.raises(LLMProbeError, match="not a folder"):
        build_report([tmp_path / "nope"])
    with pytest.raises(LLMProbeError, match="at least one"):
        build_report([])


# -- report diff ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("diff")
    base = make_synthetic(tmp_path / "run")
    other = tmp_path / "other"
    write_result(other, "eval-perplexity", "eval perplexity", {"perplexity": pd.DataFrame([{
        "seqlen": 64, "windows": 4, "tokens": 252, "mean_nll": math.log(15.0), "ppl": 15.0, "bits_per_byte": 1.2}])},
        dataset={"name": "/data/wiki.test.raw", "sha256": "cd" * 32})
    kurt = module_frame("kurtosis_pooled", {(2, "mlp.down"): 50.0, (1, "mlp.down"): 800.0}, kurtosis_window_mean=1.0,
                        layers=LAYERS + 1)  # one more layer: unmatched, not dropped
    write_result(other, "activations-kurtosis", "activations kurtosis", {"kurtosis_modules": kurt})
    write_result(other, "activations-quant-error", "activations quant-error", {
        "quant_error": module_frame("rel_mse", {(1, "mlp.down"): 0.5, (0, "attn.o"): 0.02}, base=0.01)})
    return base, other, diff_reports(base, other, tmp_path / "diff")


def test_diff_matches_a_plain_merge(two_runs):
    base, other, built = two_runs
    report = built.report
    metrics = {m.title: m for m in report.metrics}
    kurt = metrics["Activation kurtosis"]
    assert kurt.matched == LAYERS * len(ROLES) and kurt.unmatched == len(ROLES)
    # the base run recorded its dataset and windows, the other did not: the note says so
    assert "the two runs differ in dataset; dataset sha256; windows" in kurt.note
    # the reference: a plain loop over both tables
    a = pd.read_csv(base / "activations-kurtosis" / "kurtosis_modules.csv")
    b = pd.read_csv(other / "activations-kurtosis" / "kurtosis_modules.csv")
    expected = {}
    for _, ra in a.iterrows():
        rb = b[(b["layer"] == ra["layer"]) & (b["role"] == ra["role"])].iloc[0]
        expected[(int(ra["layer"]), ra["role"])] = (rb["kurtosis_pooled"] - ra["kurtosis_pooled"]) / abs(
            ra["kurtosis_pooled"])
    cols = kurt.table.columns
    got = {(int(r[0].text), r[1].text): float(r[cols.index("change_pct")].sort) / 100 for r in kurt.table.rows}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12)
    # largest |relative change| first: layer 2 mlp.down fell from 5000 to 50
    first = kurt.table.rows[0]
    assert (first[0].text, first[1].text) == ("2", "mlp.down")
    assert [float(r[cols.index("change_pct")].sort) / 100 for r in kurt.table.rows] == sorted(
        got.values(), key=lambda v: -abs(v))
    unmatched = [(r[0].text, r[1].text, r[2].text) for r in kurt.unmatched_table.rows]
    assert sorted(unmatched) == sorted((str(LAYERS), role, "other") for role in ROLES)
    # perplexity headline, and the analyses only one side has are named
    assert report.headlines[0].topic == "Perplexity" and report.headlines[0].value == "+20.00%"
    assert "same dataset and windows" in report.headlines[0].headline
    assert report.headlines[1].value == "-99.0%" and "layer 2 mlp.down, 5000 -> 50" in report.headlines[1].headline
    assert any("Activation max|x|: only run has" in m for m in report.missing)
    assert report.largest is not None and report.largest.rows[0][0].text == "Activation kurtosis"
    assert built.summary()[0].startswith("Perplexity: Perplexity 12.5 (run) -> 15 (other), +20.00%")
    assert len(report.largest.rows) == 2  # only rows that changed
    # quant error: only (0, attn.o) changed among the matched pairs with a real change
    qe = metrics["Activation quantization error"]
    assert (qe.table.rows[0][0].text, qe.table.rows[0][1].text) == ("0", "attn.o")


def test_diff_outputs_parse_and_are_self_contained(two_runs):
    built = two_runs[2]
    page = parse_html(built.html)
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    images = assert_markdown_complete(built.markdown)
    assert len(images) == len(built.figures) == 2  # kurtosis and quant error, overlaid
    md = built.markdown.read_text(encoding="utf-8")
    # unmatched pairs are listed in full in the Markdown too
    assert sum(line.startswith(f"| {LAYERS} | ") for line in md.splitlines()) == len(ROLES)


def test_diff_of_runs_sharing_nothing(tmp_path, synthetic):
    lonely = tmp_path / "lonely"
    write_result(lonely, "weights-stats", "weights stats", {"weight_stats": pd.DataFrame(
        {"name": ["w"], "layer_index": [0], "role": ["attn.q"], "ndim": [2], "kurtosis": [3.0]})})
    shutil.rmtree(synthetic / "eval-perplexity")
    built = diff_reports(synthetic, lonely, tmp_path / "d")
    assert built.report.metrics == [] and built.report.headlines == []
    assert any("neither run" in m for m in built.report.missing)
    assert "share no metric" in built.html.read_text(encoding="utf-8")


# -- on real result folders written by the CLI (tiny model) ---------------------------------

@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A real report folder: the current CLI on a tiny llama and a slice of WikiText."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import WIKITEXT, run_cli
    from tiny import save_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny_report")
    model = save_tiny_model_dir("llama", root / "model")
    text = root / "small.txt"
    text.write_text("".join(WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)[:80]))
    run = root / "run"
    data = ["--dataset", str(text), "--seqlen", "32"]
    calib = [*data, "--nsamples", "2"]  # figures for two analyses only: drawing is the slow part
    commands = [
        ("eval", "perplexity", *data, "--max-windows", "2"),
        ("weights", "alpha-hill", "--precisions", "fp32,bf16", "--no-plot"),
        ("weights", "stats"),
        ("activations", "magnitude", *calib),
        ("activations", "kurtosis", *calib, "--plot"),
        ("activations", "max-median", *calib),
        ("activations", "quant-error", *calib, "--plot"),
    ]
    for group, command, *args in commands:
        result = run_cli(group, command, "--model", str(model), *args, "--out", str(run / f"{group}-{command}"),
                         "--quiet")
        assert result.code == 0, (command, result)
    return run


def test_build_on_tiny_cli_results(tiny_report, tmp_path):
    built = build_report([tiny_report], tmp_path / "out")
    topics = {f.topic for f in built.report.findings}
    assert {"Perplexity", "Activation outliers", "Precision-sensitive matrices"} <= topics
    assert all(s.complete for s in built.report.sections) and len(built.report.sections) == 7
    assert_markdown_complete(built.markdown)
    # the headline perplexity is the table's number
    ppl = pd.read_csv(tiny_report / "eval-perplexity" / "perplexity.csv")["ppl"].iloc[0]
    assert built.report.findings[0].value == format_number(ppl)


# -- in a real browser ----------------------------------------------------------------------

def _browser():
    """A headless Chromium driven by selenium, or a skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; it is in the dev extra)")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                   if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("no headless browser found: install Debian's chromium and chromium-driver "
                    "(make install does so where apt is available)")
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--force-prefers-reduced-motion"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as exc:  # a browser that is present but cannot start is a failure, not a skip
        pytest.fail(f"chromium at {binary} with {driver_path} did not start: {exc}")


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    extra = os.environ.get("LLMPROBE_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(extra) / name)
    return path


def _check_page(driver, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
    images = driver.find_elements(By.TAG_NAME, "img")
    assert images
    for img in images:
        driver.execute_script("arguments[0].scrollIntoView({behavior: 'instant'})", img)
        ok = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
        assert ok, img.get_attribute("alt")
    assert driver.find_elements(By.CSS_SELECTOR, "ol.findings > li.finding")


def _sort_check(driver, table_id: str, column: str) -> None:
    from selenium.webdriver.common.by import By

    table = driver.find_element(By.ID, table_id)
    headers = table.find_elements(By.CSS_SELECTOR, "thead th")
    col = [h.text for h in headers].index(column)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})", headers[col])

    def values():
        script = ("return Array.from(arguments[0].tBodies[0].rows).map(r => r.cells[arguments[1]].dataset.v)"
                  ".filter(v => v !== undefined && v !== '').map(Number)")
        return driver.execute_script(script, table, col)

    headers[col].click()
    first = values()
    assert first == sorted(first, reverse=True) and len(first) > 2
    headers[col].click()
    second = values()
    assert second == sorted(second)
    assert headers[col].get_attribute("aria-sort") == "ascending"


def test_report_in_headless_chromium(tiny_report, synthetic, tmp_path):
    for name in ("eval-perplexity", "weights-alpha-hill", "activations-magnitude", "activations-kurtosis",
                 "activations-max-median", "activations-quant-error"):
        shutil.rmtree(synthetic / name)  # the tiny CLI runs replace them; super weights/ablation stay
    built = build_report([tiny_report, synthetic], tmp_path / "out")
    driver = _browser()
    try:
        _check_page(driver, built.html.resolve().as_uri())
        from selenium.webdriver.common.by import By

        assert len(driver.find_elements(By.CSS_SELECTOR, "li.finding")) == len(built.report.findings) >= 5
        _sort_check(driver, "activations-kurtosis--kurtosis-modules", "kurtosis_pooled")
        # the filter box hides rows that do not match
        box = driver.find_element(By.CSS_SELECTOR, 'input[data-table="activations-kurtosis--kurtosis-modules"]')
        box.send_keys("mlp.down")
        shown = driver.execute_script(
            "return Array.from(document.getElementById('activations-kurtosis--kurtosis-modules').tBodies[0].rows)"
            ".filter(r => !r.hidden).map(r => r.textContent)")
        assert shown and all("mlp.down" in row for row in shown)
        driver.execute_script("window.scrollTo(0, 0)")
        _screenshot(driver, tmp_path, "report.png")
    finally:
        driver.quit()


def test_diff_in_headless_chromium(two_runs, tmp_path):
    built = two_runs[2]
    driver = _browser()
    try:
        _check_page(driver, built.html.resolve().as_uri())
        _sort_check(driver, "metric-kurtosis--table", "A")
        driver.execute_script("window.scrollTo(0, 0)")
        _screenshot(driver, tmp_path, "diff.png")
    finally:
        driver.quit()


@pytest.mark.slow
def test_embedded_model_report_in_headless_chromium(wikitext_path, tmp_path):
    """The issue's check on the embedded SmolLM2-135M: a few quick analyses through the CLI, the
    page built and opened; the findings name its real outliers."""
    import llmprobe

    run = tmp_path / "smollm2"
    # one session: the model is loaded once; a slice of WikiText keeps tokenization short
    text = tmp_path / "wiki-slice.txt"
    text.write_text("".join(wikitext_path.read_text(encoding="utf-8").splitlines(keepends=True)[:400]))
    data = {"dataset": str(text), "seqlen": 64}
    with llmprobe.Session(None) as session:
        for name, options in [("eval.perplexity", {**data, "max_windows": 2}), ("weights.stats", {}),
                              ("activations.kurtosis", {**data, "nsamples": 2, "plot": True}),
                              ("activations.max-median", {**data, "nsamples": 2})]:
            session.run(name, out=run / name.replace(".", "-"), **options)
    built = build_report([run])
    topics = [f.topic for f in built.report.findings]
    assert topics[0] == "Perplexity" and topics.count("Activation outliers") == 2
    # SmolLM2's massive activations sit in MLP down projections
    assert "mlp.down" in next(f for f in built.report.findings if "kurtosis" in f.headline).headline
    assert_markdown_complete(built.markdown)
    driver = _browser()
    try:
        _check_page(driver, built.html.resolve().as_uri())
        _sort_check(driver, "activations-kurtosis--kurtosis-modules", "kurtosis_pooled")
        driver.execute_script("window.scrollTo(0, 0)")
        _screenshot(driver, tmp_path, "report-embedded.png")
    finally:
        driver.quit()
