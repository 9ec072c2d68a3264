"""Speed work that must not change results: the lazy command tree lists every command, figures
drawn by worker processes equal those drawn in-process, and weight commands reading a GGUF
through its cached safetensors conversion see the very tensors of the GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import llmprobe
from llmprobe import registry
from llmprobe.core.output import RunOutput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ start-up


def test_root_help_lists_every_group_without_importing_the_catalog():
    declared = registry.declared_groups()
    assert [(g.name, g.help) for g in declared] == [(g.name, g.help) for g in registry.groups().values()]
    out = run_cli("--help").stdout
    for group in registry.groups():
        assert group in out


def test_every_group_help_lists_all_its_commands_and_every_command_has_help():
    for group in registry.groups():
        result = run_cli(group, "--help")
        assert result.code == 0, result
        commands = [a.command for a in registry.analyses().values() if a.group == group]
        assert commands, group
        for command in commands:
            assert command in result.stdout, (group, command)
            assert run_cli(group, command, "--help").code == 0, (group, command)


def test_a_command_builds_only_itself_and_version_imports_nothing_heavy():
    code = (
        "import sys\nfrom llmprobe.cli import app\n"
        "try:\n    app.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print('VERSION', sorted(m for m in ('pydantic', 'rich', 'pandas', 'torch', 'llmprobe.options') "
        "if m in sys.modules))\n"
        "try:\n    app.main(['weights', 'stats', '--help'])\nexcept SystemExit:\n    pass\n"
        "root = app._built['command']\n"
        "print('GROUPS', sorted(root.commands))\n"
        "print('BUILT', sorted(root.commands['weights'].commands))\n"
        "print('CATALOG', sorted(m for m in sys.modules if m.startswith('llmprobe.catalog.')))\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ", 1)[0].isupper())
    assert lines["VERSION"] == "[]"
    assert lines["GROUPS"] == "['schema', 'weights']"
    assert lines["BUILT"] == "['stats']"
    assert lines["CATALOG"] == "['llmprobe.catalog.weights']"
    assert lines["HEAVY"] == "[]"


def test_unknown_command_in_a_lazy_group_is_one_line_error():
    result = run_cli("weights", "alpha-hil")
    assert result.code == 2
    assert "alpha-hil" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ figures


def _alpha_rows(layers: int = 7) -> list[dict]:
    rows = []
    for layer in range(layers):
        for index, category in enumerate(("attn_q", "attn_k", "mlp_down")):
            alpha = 2.0 + 0.1 * layer + index
            rows.append({"layer_name": f"model.layers.{layer}.{category}.weight", "layer_index": layer,
                         "category": category, "status": "ok", "alpha_fp32": alpha,
                         "alpha_fp16": alpha + 1e-5 * (layer - 3)})
    rows.append({"layer_name": "model.embed_tokens.weight", "layer_index": None, "category": "embedding",
                 "status": "ok", "alpha_fp32": 3.0, "alpha_fp16": float("nan")})
    return rows


class _Row:
    def __init__(self, values: dict):
        self.values = values

    def row(self) -> dict:
        return dict(self.values)


def _alpha_figures():
    from llmprobe.plots.alpha_hill import alpha_hill_figures

    result = types.SimpleNamespace(tables={"precision_alpha_hill_results": [_Row(r) for r in _alpha_rows()]},
                                   manifest={"precisions": ["fp32", "fp16"]})
    options = types.SimpleNamespace(fit="hill", max_layers_per_plot=4, individual_plots=True)
    return alpha_hill_figures(result, options)


def _write(tmp_path: Path, name: str, workers: int, monkeypatch) -> RunOutput:
    from llmprobe.session import write_figures

    monkeypatch.setenv("LLMPROBE_FIGURE_WORKERS", str(workers))
    with RunOutput(tmp_path / name, command="test") as run:
        write_figures(run, _alpha_figures(), "png")
    return run


def test_parallel_figures_write_the_same_files_and_bytes_as_serial(tmp_path, monkeypatch):
    from llmprobe.core.figures import figure_workers

    serial = _write(tmp_path, "serial", 0, monkeypatch)
    parallel = _write(tmp_path, "parallel", 2, monkeypatch)
    assert figure_workers(10) == 2  # the parallel run really used workers
    pngs = [f for f in serial.files if f.endswith(".png")]
    # 1 distribution, 4 categories, ceil(22/4)=6 batches, 3 alpha-vs-depth, 22 per-matrix
    assert len(pngs) == 1 + 4 + 6 + 3 + 22
    assert serial.files == parallel.files  # same files, registered in the same order
    assert "plots/combined_batch_6.png" in pngs and "plots/alpha_vs_depth_mlp_down.png" in pngs
    assert "plots/individual_layers/layer_022_model_embed_tokens.png" in pngs
    from PIL import Image

    for rel in pngs:
        data = (serial.dir / rel).read_bytes()
        assert data.startswith(PNG_SIGNATURE), rel
        assert data == (parallel.dir / rel).read_bytes(), rel
        with Image.open(serial.dir / rel) as image:
            image.verify()
    manifest = json.loads((parallel.dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and set(pngs) <= set(manifest["files"])


def test_workers_started_with_the_command_draw_the_same_bytes(tmp_path, monkeypatch):
    """Workers started early (one interpreter warmed up by a throw-away figure, then forked)
    are the ones that draw, and their files equal the in-process ones; unused workers are
    stopped, not waited for."""
    from llmprobe.core import figures

    serial = _write(tmp_path, "serial", 0, monkeypatch)
    monkeypatch.setenv("LLMPROBE_FIGURE_WORKERS", "2")
    figures.start_workers(warm=("llmprobe.plots.alpha_hill",))
    pool = figures._STARTED["pool"]
    figures.start_workers()  # already started: no second pool
    assert figures._STARTED["pool"] is pool and len(pool.channels) == 2
    with RunOutput(tmp_path / "early", command="test") as run:
        figures.write_figures(run, _alpha_figures(), "png")
    assert pool.used and "pool" not in figures._STARTED
    assert pool.proc.poll() == 0  # the first worker exited after the one it forked
    assert run.files == serial.files
    for rel in run.files:
        if rel.endswith(".png"):
            assert (run.dir / rel).read_bytes() == (serial.dir / rel).read_bytes(), rel
    figures.start_workers()
    unused = figures._STARTED.pop("pool")
    unused.discard()
    assert unused.proc.poll() is not None


def test_figures_drawn_while_the_analysis_runs_are_not_drawn_again(tmp_path, monkeypatch):
    """alpha-hill hands the combined batches to the started workers as their rows arrive
    (FigureStreamer + Job.draw_early); the final figure set yields the same descriptions, which
    are then taken, not redrawn: the same files and bytes as a serial run."""
    from llmprobe.core import figures
    from llmprobe.plots.alpha_hill import FigureStreamer

    serial = _write(tmp_path, "serial", 0, monkeypatch)
    monkeypatch.setenv("LLMPROBE_FIGURE_WORKERS", "2")
    figures.start_workers(warm=("llmprobe.plots.alpha_hill",))
    rows = [types.SimpleNamespace(layer_name=r["layer_name"], row=(lambda r=r: dict(r))) for r in _alpha_rows()]
    options = types.SimpleNamespace(fit="hill", max_layers_per_plot=4, individual_plots=True)
    plans = [types.SimpleNamespace(name=r["layer_name"], layer_index=r["layer_index"], category=r["category"])
             for r in _alpha_rows()]
    streamer = FigureStreamer(plans, ["fp32", "fp16"], options)
    with RunOutput(tmp_path / "early", command="test") as run:
        early = []
        for start in range(0, len(rows), 5):  # chunks of 5 rows finish one after the other
            tasks = streamer.ready(rows[start:start + 5])
            early.extend(tasks)
            figures.draw_early(run.dir, "png", tasks)
        stream = figures._STARTED["stream"]
        figures.write_figures(run, _alpha_figures(), "png")
    assert len(early) == 2  # ceil(6 batches / 4 per call): both drawn before the set was asked for
    final = [item for item in _alpha_figures() if isinstance(item[1], (figures.Deferred, figures.DeferredSet))]
    assert len(stream.tasks) == len(final)  # each drawn once
    assert "stream" not in figures._STARTED and stream.pool.proc.poll() == 0
    assert run.files == serial.files
    for rel in run.files:
        if rel.endswith(".png"):
            assert (run.dir / rel).read_bytes() == (serial.dir / rel).read_bytes(), rel


def test_figures_drawn_early_for_a_run_that_fails_leave_no_files(tmp_path, monkeypatch):
    from llmprobe.core import figures
    from llmprobe.plots.alpha_hill import combined_batch_tasks, longest_label

    monkeypatch.setenv("LLMPROBE_FIGURE_WORKERS", "2")
    figures.start_workers()
    options = types.SimpleNamespace(fit="hill", max_layers_per_plot=4, individual_plots=False)
    rows = _alpha_rows()
    with pytest.raises(RuntimeError, match="analysis failed"):
        with RunOutput(tmp_path / "failed", command="test") as run:
            figures.draw_early(run.dir, "png", combined_batch_tasks(rows, len(rows), ["fp32", "fp16"], options,
                                                                  longest_label(rows)))
            try:
                raise RuntimeError("analysis failed")
            finally:
                figures.discard_early()  # what session.execute does on the way out
    assert "stream" not in figures._STARTED
    leftover = [p.name for p in (tmp_path / "failed").rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert leftover == []


def test_reused_bar_figures_equal_freshly_built_bars(tmp_path):
    """The frozen-layout figure updated in place shows the same bars as one built for the group."""
    from llmprobe.plots.alpha_hill import _bars_figure, reused_bar_figures

    rows = _alpha_rows()
    groups = [("a", rows[0:4], "first"), ("b", rows[4:8], "second")]
    for (stem, rows_shown, title), (_, figure, options) in zip(groups, reused_bar_figures(groups, ["fp32", "fp16"],
                                                                                           "alpha")):
        fresh = _bars_figure(rows_shown, ["fp32", "fp16"], "alpha", title)
        for got, want in zip(figure.axes, fresh.axes):
            heights = [[bar.get_height() for bar in c] for c in got.containers]
            assert heights == [[bar.get_height() for bar in c] for c in want.containers], stem
            assert [t.get_text() for t in got.get_xticklabels()] == [t.get_text() for t in want.get_xticklabels()]
        assert figure.axes[0].get_title() == title and options == {"tight": False, "close": False}


def test_a_failing_figure_in_a_worker_is_an_error_in_the_caller(tmp_path, monkeypatch):
    from llmprobe.core.figures import Deferred
    from llmprobe.session import write_figures

    monkeypatch.setenv("LLMPROBE_FIGURE_WORKERS", "2")
    figures = [(f"f{i}", Deferred("math:sqrt", (-1.0,))) for i in range(3)]
    with pytest.raises(RuntimeError, match="math domain error"):
        with RunOutput(tmp_path / "r", command="test") as run:
            write_figures(run, figures, "png")


def test_figure_workers_default():
    from llmprobe.core.figures import MIN_PARALLEL, figure_workers

    assert figure_workers(MIN_PARALLEL - 1) == 0  # a handful of figures: drawn in-process


# ------------------------------------------------------------------------------ GGUF weights


def test_weight_source_reads_the_gguf_through_its_cached_conversion_with_identical_tensors():
    from llmprobe.core.loading import resolve_source
    from llmprobe.core.weightsource import ConvertedGGUFSource, GGUFSource, WeightSource

    torch.set_num_threads(1)
    ws = WeightSource.open(None)
    assert isinstance(ws, ConvertedGGUFSource)
    gguf = GGUFSource(resolve_source(None))
    assert sorted(ws.names()) == sorted(gguf.names())
    for name in gguf.names():
        assert ws.shape(name) == gguf.shape(name), name
        assert ws.stored_dtype(name) == gguf.stored_dtype(name), name  # the GGUF's types (Q4_1, F32)
    assert ws.bytes_on_disk() == gguf.bytes_on_disk()
    # every role, the rotary-permuted q/k at both ends, embeddings and norms
    for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                 *(f"model.layers.{layer}.self_attn.{p}_proj.weight" for layer in (0, 29) for p in "qkvo"),
                 *(f"model.layers.15.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))]:
        assert torch.equal(ws.get(name), gguf.get(name)), name


def test_weight_source_builds_the_conversion_when_absent_and_falls_back_to_the_gguf(monkeypatch):
    from llmprobe.core import loading, weightsource
    from llmprobe.core.errors import LLMProbeError

    existing = weightsource._existing_conversion(loading.resolve_source(None))
    assert existing is not None
    calls = []

    def convert(gguf, name=None):
        calls.append((Path(gguf), name))
        return existing

    monkeypatch.setattr(weightsource, "_existing_conversion", lambda source: None)
    monkeypatch.setattr(loading, "converted_gguf_dir", convert)
    ws = weightsource.WeightSource.open(None)
    assert isinstance(ws, weightsource.ConvertedGGUFSource)
    assert calls == [(loading.embedded_gguf_path(), loading.EMBEDDED_NAME)]

    def cannot(gguf, name=None):
        raise LLMProbeError("cannot read GGUF file: unsupported architecture")

    monkeypatch.setattr(loading, "converted_gguf_dir", cannot)
    assert isinstance(weightsource.WeightSource.open(None), weightsource.GGUFSource)


# ------------------------------------------------------------------------------ tables


def test_tables_are_written_as_pandas_wrote_them():
    """records_csv writes the bytes pandas' object-dtype to_csv wrote before it replaced it."""
    import math
    import random

    import pandas as pd

    from llmprobe.core.output import records_csv

    class Row:
        def __init__(self, data):
            self.data = data

        def row(self):
            return self.data

    generator = random.Random(0)
    floats = [0.1, 1 / 3, 1e-20, 1e16, 123456789.123, -0.0, 2.5e-7, math.inf, -math.inf, math.nan,
              0.30000000000000004] + [generator.uniform(-1, 1) * 10 ** generator.randint(-12, 12) for _ in range(200)]
    values = floats + [None, 0, 7, -3, 2**63, True, False, "", "plain", "a,b", 'say "hi"', "two\nlines",
                       "cr\rhere", " padded ", [1, 2], {"k": 1.5}, "é ü"]
    tables = [[{"name": f"m{i}", "value": generator.choice(values), "other": generator.choice(values)}
               for i in range(300)],
              [{"a": 1, "b": None}, {"a": 2, "c": "late column"}, {"b": 3.5}],  # ragged rows
              []]
    for rows in tables:
        frame = pd.DataFrame(rows, columns=list(dict.fromkeys(c for r in rows for c in r)), dtype=object) \
            if rows else pd.DataFrame()
        assert records_csv([Row(r) for r in rows]) == frame.to_csv(index=False)


def test_reused_depth_figures_equal_freshly_built_ones():
    """The frozen-layout depth figure updated in place shows the same lines as one built for the
    category."""
    from llmprobe.plots.alpha_hill import _depth_categories, alpha_vs_depth_figure, reused_depth_figures

    categories = _depth_categories(_alpha_rows())
    groups = [(f"plots/alpha_vs_depth_{c}", members, c) for c, members in categories.items()]
    assert len(groups) >= 2
    checked = 0
    for (stem, figure, options), (_, members, category) in zip(reused_depth_figures(groups, ["fp32", "fp16"], "alpha"),
                                                                groups):
        fresh = alpha_vs_depth_figure(members, ["fp32", "fp16"], "alpha", category)
        for got, want in zip(figure.axes, fresh.axes):
            assert [list(map(list, line.get_xydata())) for line in got.get_lines()] == \
                [list(map(list, line.get_xydata())) for line in want.get_lines()], stem
            assert got.get_ylim() == pytest.approx(want.get_ylim()), stem
        assert figure.axes[0].get_title() == fresh.axes[0].get_title()
        assert options == {"tight": False, "close": False}
        checked += 1
    assert checked == len(groups)


def test_the_console_entry_point_skips_interpreter_teardown_but_not_atexit():
    """Called as the console script (no argv) main() ends the process with os._exit after the
    atexit handlers ran and the streams were flushed: the exit code, the output and the
    handlers are as with a normal exit (in-process callers with argv get SystemExit, above)."""
    import subprocess

    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('atexit handler ran'))\n"
            "sys.argv = ['llmprobe', *sys.argv[1:]]\n"
            "from llmprobe.cli.app import main\n"
            "main()\n"
            "print('not reached')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    ok = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.splitlines() == [f"llmprobe {llmprobe.__version__}", "atexit handler ran"]
    bad = subprocess.run([sys.executable, "-c", code, "weights", "stats", "--no-such-option"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and bad.stdout == "atexit handler ran\n"
    assert bad.stderr.strip().startswith("llmprobe: error:") and "no-such-option" in bad.stderr
