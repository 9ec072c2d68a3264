"""`weights alpha-hill` (seed 001): every alpha against an independent numpy reference, the fp64
semantics, the power-law columns, the summary table, the seed's file/column/plot names, and bad
input through the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error
from safetensors.torch import load_file, save_file
from tiny import save_tiny_model_dir, tiny_model

from llmprobe.analyses.alpha_hill import alpha_hill_analysis
from llmprobe.core import spectral
from llmprobe.core.weightsource import WeightSource

PRECISIONS = ("fp32", "fp16", "bf16", "fp64", "int8")
SEED_RESULT_LEAD = ["layer_name", "category", "out_features", "in_features", "numel"]
SEED_PER_PRECISION = ["alpha", "k_used", "n_eigs", "method"]
SEED_SUMMARY_COLUMNS = ["precision", "count", "mean", "std", "min", "median", "max", "q25", "q75"]
LLAMA_CATEGORIES = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"]


# --------------------------------------------------------------------------- the reference


def reference_cast(weight: np.ndarray, precision: str, channel_axis: int = 1) -> np.ndarray:
    """The weight put through a precision, written independently of llmprobe.core.quant (float64 out).
    int8: symmetric, one scale per output channel (``channel_axis`` is the axis reduced over)."""
    w32 = weight.astype(np.float32)
    if precision in ("fp32", "fp64"):
        return w32.astype(np.float64)
    if precision == "fp16":
        return w32.astype(np.float16).astype(np.float64)
    if precision == "bf16":
        return torch.from_numpy(w32).to(torch.bfloat16).to(torch.float64).numpy()
    if precision == "int8":
        scale = np.abs(w32).max(axis=channel_axis, keepdims=True) / np.float32(127)
        codes = np.clip(np.round(w32 / scale), -127, 127)
        return (codes * scale).astype(np.float32).astype(np.float64)
    raise AssertionError(precision)


def reference_eigenvalues(matrix: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.svd(matrix.astype(np.float64), compute_uv=False) ** 2)[::-1]


def reference_hill(lam: np.ndarray, k_frac: float = 0.1) -> tuple[float, int]:
    """Alpha-Hill with a plain Python loop: k = max(10, floor(k_frac·n)) capped at n-1."""
    lam = sorted((float(v) for v in lam), reverse=True)
    n = len(lam)
    k = min(max(10, math.floor(k_frac * n)), n - 1)
    total = 0.0
    for i in range(k):
        total += math.log(lam[i] / lam[k])
    return 1.0 + k / total, k


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("alpha_llama") / "model")


@pytest.fixture(scope="module")
def llama_tensors(llama_dir):
    return {name: tensor.numpy() for name, tensor in load_file(str(llama_dir / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def cli_run(llama_dir, tmp_path_factory):
    """One full CLI run (5 precisions, plots on, 4 matrices per combined plot) shared by the
    table, column and plot checks."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("alpha_cli") / "run"
    result = run_cli("weights", "alpha-hill", "--model", llama_dir, "--precisions", ",".join(PRECISIONS),
                     "--output-dir", out, "--max-layers-per-plot", "4", "--device", "cpu", "--individual-plots", "--quiet")
    assert result.code == 0, result
    return out


# --------------------------------------------------------------------------- correctness


def test_alpha_matches_independent_numpy_reference(llama_dir, llama_tensors):
    rows, _ = alpha_hill_analysis(WeightSource.open(str(llama_dir)), PRECISIONS, k_frac=0.1)
    assert [row.layer_name for row in rows][:7] == [
        f"model.layers.0.{part}.weight" for part in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert len(rows) == 14  # 2 layers x 7 linears; embeddings are not analysed by default
    for row in rows:
        weight = llama_tensors[row.layer_name]
        for precision in PRECISIONS:
            lam = reference_eigenvalues(reference_cast(weight, precision))
            alpha, k = reference_hill(lam)
            assert getattr(row, f"alpha_{precision}") == pytest.approx(alpha, rel=1e-9), (row.layer_name, precision)
            assert getattr(row, f"k_used_{precision}") == k
            assert getattr(row, f"n_eigs_{precision}") == min(weight.shape)
            assert getattr(row, f"method_{precision}") == "gram-fp64"
            assert getattr(row, f"log_spectral_norm_{precision}") == pytest.approx(math.log10(lam[0]), rel=1e-9)
            assert getattr(row, f"log_norm_{precision}") == pytest.approx(math.log10(lam.sum()), rel=1e-9)
            assert getattr(row, f"stable_rank_{precision}") == pytest.approx(lam.sum() / lam[0], rel=1e-9)
            assert getattr(row, f"alpha_weighted_{precision}") == pytest.approx(alpha * math.log10(lam[0]), rel=1e-9)
        assert row.status == "ok" and row.note == ""
        assert row.category == row.role.replace(".", "_")
        assert row.numel == weight.size
    # the precisions really differ from each other (the columns are not copies)
    q = rows[0]
    assert q.alpha_fp32 == q.alpha_fp64
    assert len({q.alpha_fp32, q.alpha_fp16, q.alpha_bf16, q.alpha_int8}) == 4


def _ill_conditioned_model():
    """A tiny llama whose layer-0 q_proj has singular values 10^(-0.45 i): the 11th largest
    eigenvalue (the Hill reference for n = 32, k = 10) is ~1e-10·λ_max, far below the ~1e-7·λ_max
    noise of fp32 arithmetic but well inside fp64's reach."""
    model = tiny_model("llama")
    generator = np.random.default_rng(0)
    left, _ = np.linalg.qr(generator.standard_normal((32, 32)))
    right, _ = np.linalg.qr(generator.standard_normal((32, 32)))
    sigma = 10.0 ** (-0.45 * np.arange(32))
    matrix = (left * sigma) @ right.T
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.copy_(torch.from_numpy(matrix))
    return model


def test_fp64_means_fp64_arithmetic():
    model = _ill_conditioned_model()
    stored = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()  # the fp32 values
    reference, _ = reference_hill(reference_eigenvalues(stored))
    regex = r"layers\.0\.self_attn\.q_proj"

    # fp32 arithmetic on purpose (--spectrum-dtype fp32): the fp32 column is then measurably
    # wrong on this matrix while fp64 is still computed in fp64 and gets the right answer.
    rows, _ = alpha_hill_analysis(model, ("fp32", "fp64"), regex=regex, spectrum_dtype="fp32")
    (row,) = rows
    assert row.method_fp64 == "gram-fp64" and row.method_fp32 == "gram-fp32"
    assert row.alpha_fp64 == pytest.approx(reference, rel=1e-5)
    assert row.alpha_fp32 != pytest.approx(reference, rel=1e-2)

    # default ("auto"): a comparison of precisions runs every spectrum in fp64, so fp32 (the
    # same values) agrees as well
    (row,), _ = alpha_hill_analysis(model, ("fp32", "fp64"), regex=regex)
    assert row.method_fp32 == "gram-fp64"
    assert row.alpha_fp32 == pytest.approx(reference, rel=1e-5)
    assert row.alpha_fp64 == pytest.approx(reference, rel=1e-5)


def test_auto_arithmetic_is_fp32_for_a_single_hill_precision(llama_dir, llama_tensors):
    regex = r"layers\.0\.self_attn\.o_proj"
    (single,), _ = alpha_hill_analysis(str(llama_dir), ("bf16",), regex=regex)
    (forced,), _ = alpha_hill_analysis(str(llama_dir), ("bf16",), regex=regex, spectrum_dtype="fp64")
    (law,), _ = alpha_hill_analysis(str(llama_dir), ("bf16",), regex=regex, fit="powerlaw")
    assert (single.method_bf16, forced.method_bf16, law.method_bf16) == ("gram-fp32", "gram-fp64", "gram-fp64")
    lam = reference_eigenvalues(reference_cast(llama_tensors[single.layer_name], "bf16"))
    reference = reference_hill(lam)[0]
    assert forced.alpha_bf16 == pytest.approx(reference, rel=1e-9)
    assert single.alpha_bf16 == pytest.approx(reference, rel=1e-4)  # fp32 arithmetic: close, not exact


def test_powerlaw_fit_columns_match_spectral_powerlaw_fit(llama_dir, llama_tensors):
    rows, summary = alpha_hill_analysis(str(llama_dir), ("fp32", "bf16"), regex=r"layers\.1\.", fit="powerlaw")
    assert len(rows) == 7
    for row in rows:
        data = row.row()
        for precision in ("fp32", "bf16"):
            for column in ("alpha", "alpha_hill", "xmin", "D_ks", "sigma", "k_used"):
                assert f"{column}_{precision}" in data
            lam = reference_eigenvalues(reference_cast(llama_tensors[row.layer_name], precision))
            fit = spectral.powerlaw_fit(lam)
            assert data[f"alpha_{precision}"] == pytest.approx(fit.alpha, rel=1e-9)
            assert data[f"xmin_{precision}"] == pytest.approx(fit.xmin, rel=1e-9)
            assert data[f"D_ks_{precision}"] == pytest.approx(fit.D_ks, rel=1e-6, abs=1e-12)
            assert data[f"sigma_{precision}"] == pytest.approx(fit.sigma, rel=1e-9)
            assert data[f"k_used_{precision}"] == fit.n_tail
            assert data[f"alpha_hill_{precision}"] == pytest.approx(reference_hill(lam)[0], rel=1e-9)
    assert [s.precision for s in summary] == ["fp32", "bf16"]
    assert summary[0].mean == pytest.approx(np.mean([row.alpha_fp32 for row in rows]))


def test_conv1d_weights_use_module_shapes_and_output_channels(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]: features come from the module map and int8 scales
    run per *output* channel, i.e. along the stored columns."""
    model_dir = save_tiny_model_dir("gpt2", tmp_path / "gpt2")
    tensors = load_file(str(model_dir / "model.safetensors"))
    rows, _ = alpha_hill_analysis(str(model_dir), ("int8",), regex=r"h\.0\.attn\.c_attn", spectrum_dtype="fp64")
    (row,) = rows
    stored = tensors[row.layer_name].numpy()
    assert stored.shape == (32, 96)
    assert (row.out_features, row.in_features) == (96, 32)
    per_output = reference_hill(reference_eigenvalues(reference_cast(stored, "int8", channel_axis=0)))[0]
    per_stored_row = reference_hill(reference_eigenvalues(reference_cast(stored, "int8", channel_axis=1)))[0]
    assert row.alpha_int8 == pytest.approx(per_output, rel=1e-9)
    assert per_output != pytest.approx(per_stored_row, rel=1e-9)


def test_summary_statistics_match_pandas_describe(cli_run):
    results = pd.read_csv(cli_run / "precision_alpha_hill_results.csv")
    summary = pd.read_csv(cli_run / "precision_summary_statistics.csv")
    assert list(summary["precision"]) == list(PRECISIONS)
    for _, stats in summary.iterrows():
        described = results[f"alpha_{stats['precision']}"].describe()
        assert stats["count"] == described["count"]
        for ours, theirs in (("mean", "mean"), ("std", "std"), ("min", "min"), ("median", "50%"),
                             ("max", "max"), ("q25", "25%"), ("q75", "75%")):
            assert stats[ours] == pytest.approx(described[theirs], rel=1e-12), ours


# --------------------------------------------------------------------------- seed-001 outputs


def test_csv_columns_are_seed_001s(cli_run):
    results = pd.read_csv(cli_run / "precision_alpha_hill_results.csv")
    seed_columns = SEED_RESULT_LEAD + [f"{field}_{p}" for p in PRECISIONS for field in SEED_PER_PRECISION]
    assert list(results.columns[: len(seed_columns)]) == seed_columns
    for extra in ("layer_index", "role", "status", "note", "alpha_weighted_fp32", "log_spectral_norm_fp16",
                  "log_norm_bf16", "stable_rank_int8"):
        assert extra in results.columns
    assert list(pd.read_csv(cli_run / "precision_summary_statistics.csv").columns) == SEED_SUMMARY_COLUMNS
    assert list(results["category"].unique()) == LLAMA_CATEGORIES
    assert (cli_run / "precision_alpha_hill_results.json").is_file()
    rows = json.loads((cli_run / "precision_alpha_hill_results.json").read_text())
    assert len(rows) == len(results) == 14
    manifest = json.loads((cli_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["precisions"] == list(PRECISIONS)


def test_plots_are_written_with_seed_names(cli_run):
    plots = cli_run / "plots"
    assert (plots / "alpha_distribution_by_precision.png").is_file()
    for category in LLAMA_CATEGORIES:
        assert (plots / f"category_{category}.png").is_file()
        assert (plots / f"alpha_vs_depth_{category}.png").is_file()
    # 14 matrices, 4 per combined figure -> 4 batches, numbered from 1
    assert sorted(p.name for p in plots.glob("combined_batch_*")) == [f"combined_batch_{i}.png" for i in range(1, 5)]
    individual = sorted(p.name for p in (plots / "individual_layers").iterdir())
    assert len(individual) == 14
    assert individual[0] == "layer_001_model_layers_0_self_attn_q_proj.png"
    assert individual[-1] == "layer_014_model_layers_1_mlp_down_proj.png"


def test_max_layers_per_plot_zero_puts_all_in_one_and_plots_can_be_skipped(cli, llama_dir, tmp_path):
    out = tmp_path / "all"
    result = cli("weights", "alpha-hill", "--model", llama_dir, "--precisions", "fp32", "--out", out,
                 "--max-layers-per-plot", "0", "--plot-format", "svg", "--filter-layers", r"layers\.0\.",
                 "--individual-plots", "--quiet")
    assert result.code == 0, result
    assert [p.name for p in (out / "plots").glob("combined_batch_*")] == ["combined_batch_1.svg"]
    assert len(list((out / "plots" / "individual_layers").glob("*.svg"))) == 7

    skipped = tmp_path / "noplot"
    result = cli("weights", "alpha-hill", "--model", llama_dir, "--precisions", "fp32", "--out", skipped,
                 "--no-plot", "--filter-layers", r"layers\.0\.self_attn\.q", "--quiet", "--json")
    assert result.code == 0, result
    assert not (skipped / "plots").exists()
    (row,) = json.loads(result.stdout)
    assert row["layer_name"] == "model.layers.0.self_attn.q_proj.weight" and row["status"] == "ok"


def test_regex_can_select_the_embedding(llama_dir):
    rows, _ = alpha_hill_analysis(str(llama_dir), ("fp32",), regex=r"embed_tokens")
    (row,) = rows
    assert (row.category, row.role, row.layer_index) == ("embed", "embed", None)
    assert (row.out_features, row.in_features) == (512, 32)


def test_log_level_debug_logs_every_matrix(cli, llama_dir, tmp_path):
    result = cli("weights", "alpha-hill", "--model", llama_dir, "--precisions", "fp32", "--out", tmp_path / "o",
                 "--no-plot", "--filter-layers", r"layers\.1\.mlp", "--log-level", "debug")
    assert result.code == 0, result
    assert "INFO llmprobe.analyses.alpha_hill: alpha-hill: 3 matrices" in result.stderr
    assert re.search(r"DEBUG .*layers\.1\.mlp\.down_proj\.weight .*fp32=\d", result.stderr)


# --------------------------------------------------------------------------- non-finite weights


def test_nan_weight_is_flagged_and_the_run_continues(cli, tmp_path):
    model_dir = save_tiny_model_dir("llama", tmp_path / "nan_model")
    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    broken = "model.layers.1.self_attn.v_proj.weight"
    tensors[broken][3, 5] = float("nan")
    tensors[broken][0, 0] = float("inf")
    save_file(tensors, str(file), metadata={"format": "pt"})

    out = tmp_path / "out"
    result = cli("weights", "alpha-hill", "--model", model_dir, "--out", out, "--no-plot", "--quiet")
    assert result.code == 0, result
    results = pd.read_csv(out / "precision_alpha_hill_results.csv").set_index("layer_name")
    assert results.loc[broken, "status"] == "non_finite"
    assert "1 NaN and 1 Inf" in results.loc[broken, "note"]
    for precision in ("fp32", "fp16", "bf16"):
        assert math.isnan(results.loc[broken, f"alpha_{precision}"])
        assert results.loc[broken, f"method_{precision}"] == "non-finite"
    healthy = results.drop(index=broken)
    assert (healthy["status"] == "ok").all() and healthy["alpha_fp32"].notna().all()
    summary = pd.read_csv(out / "precision_summary_statistics.csv")
    assert (summary["count"] == 13).all()
    assert json.loads((out / "manifest.json").read_text())["flagged_matrices"] == {"non_finite": 1}


def test_fp16_overflow_is_reported_not_fatal():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6  # beyond fp16's 65504
    (row,), summary = alpha_hill_analysis(model, ("fp32", "fp16"), regex=r"layers\.0\.mlp\.up_proj")
    assert row.status == "nan_alpha" and "fp16" in row.note
    assert math.isfinite(row.alpha_fp32) and math.isnan(row.alpha_fp16)
    assert row.method_fp16 == "non-finite"
    assert [s.count for s in summary] == [1, 0]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--k-frac", "0"], ["--k-frac", "(0, 1)"]),
        (["--k-frac", "1.5"], ["--k-frac", "(0, 1)"]),
        (["--precisions", "fp32,fp12"], ["unknown precision 'fp12'", "bf16", "nf4"]),
        (["--precisions", ","], ["no precisions"]),
        (["--filter-layers", "layers.(0"], ["bad regex"]),
        (["--filter-layers", "no_such_weight"], ["no 2-d weight matches", "model.layers.0"]),
        (["--load-dtype", "int8"], ["--load-dtype", "fp32, fp16, bf16"]),
        (["--spectrum-dtype", "fp16"], ["--spectrum-dtype"]),
        (["--fit", "lognormal"], ["--fit", "hill, powerlaw"]),
        (["--plot-format", "jpg"], ["--plot-format"]),
        (["--max-layers-per-plot", "-1"], ["--max-layers-per-plot"]),
        (["--log-level", "LOUD"], ["--log-level", "DEBUG"]),
        (["--device", "tpu"], ["device"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(cli, llama_dir, tmp_path, args, needles):
    out = tmp_path / "never"
    result = cli("weights", "alpha-hill", "--model", llama_dir, "--out", out, *args)
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_library_rejects_bad_options(llama_dir):
    from llmprobe.core.errors import LLMProbeError

    with pytest.raises(LLMProbeError, match="k-frac"):
        alpha_hill_analysis(str(llama_dir), k_frac=float("nan"))
    with pytest.raises(LLMProbeError, match="unknown precision"):
        alpha_hill_analysis(str(llama_dir), precisions=("int1",))


# --------------------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(cli, tmp_path):
    out = tmp_path / "embedded"
    result = cli("weights", "alpha-hill", "--filter-layers", r"layers\.(0|1)\.", "--out", out, "--device", "cpu",
                 "--quiet")
    assert result.code == 0, result
    results = pd.read_csv(out / "precision_alpha_hill_results.csv")
    assert len(results) == 14
    assert list(results["category"][:7]) == LLAMA_CATEGORIES
    q = results.iloc[0]
    assert (q["layer_name"], q["out_features"], q["in_features"]) == ("model.layers.0.self_attn.q_proj.weight", 576, 576)
    assert (results["status"] == "ok").all()
    assert results[["alpha_fp32", "alpha_fp16", "alpha_bf16"]].notna().all().all()
    # the first row against the numpy reference on the same stored weight
    weight = WeightSource.open(None).get(q["layer_name"]).numpy()
    assert q["alpha_fp32"] == pytest.approx(reference_hill(reference_eigenvalues(weight))[0], rel=1e-9)
    assert not (out / "plots" / "individual_layers").exists()  # seed 001's per-matrix bars: --individual-plots
    assert len(list((out / "plots").glob("combined_batch_*.png"))) == 2


# --------------------------------------------------------------------------- the torch-free CPU path


def _both_paths(monkeypatch, source, precisions, **kwargs):
    """The same analysis through numpy arrays (the CPU default where it applies) and through
    torch tensors."""
    from llmprobe.analyses import alpha_hill

    arrays = alpha_hill_analysis(source, precisions, **kwargs)
    monkeypatch.setattr(alpha_hill, "_reads_arrays", lambda *args, **kw: False)
    tensors = alpha_hill_analysis(source, precisions, **kwargs)
    monkeypatch.undo()
    return arrays, tensors


@pytest.mark.parametrize("precisions", [("fp32",), ("fp32", "fp16", "fp64"), ("fp16",)])
def test_the_array_path_gives_the_torch_paths_bits(monkeypatch, tmp_path, precisions):
    """fp32 and fp64 spectra, fp16 rounding with an overflow, a NaN matrix, the embedding: every
    column of every row is the same number either way."""
    model_dir = save_tiny_model_dir("llama", tmp_path / "model")
    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # beyond fp16's 65504
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    ws = WeightSource.open(str(model_dir))
    from llmprobe.analyses.alpha_hill import _reads_arrays, select_matrices

    assert _reads_arrays(ws, select_matrices(ws, "weight"), "cpu", "fp32", precisions, "hill")
    (rows, summary), (torch_rows, torch_summary) = _both_paths(monkeypatch, ws, precisions, regex="weight",
                                                               device="cpu")
    assert len(rows) == 16 and any(row.status != "ok" for row in rows)
    assert [row.model_dump() for row in rows] == [row.model_dump() for row in torch_rows]
    assert [s.model_dump() for s in summary] == [s.model_dump() for s in torch_summary]


def test_the_array_path_is_taken_only_where_it_gives_the_same_numbers(llama_dir):
    from llmprobe.analyses.alpha_hill import _reads_arrays, select_matrices
    from llmprobe.core import devices

    ws = WeightSource.open(str(llama_dir))
    plans = select_matrices(ws)
    assert _reads_arrays(ws, plans, "cpu", "fp32", ["fp32", "fp16", "fp64"], "hill")
    assert not _reads_arrays(ws, plans, "cpu", "fp32", ["fp32", "bf16"], "hill")  # bf16 rounds in torch
    assert not _reads_arrays(ws, plans, "cpu", "fp32", ["int8"], "hill")
    assert not _reads_arrays(ws, plans, "cpu", "fp16", ["fp32"], "hill")  # a load cast
    assert not _reads_arrays(ws, plans, "cpu", "fp32", ["fp32"], "powerlaw")  # the svdvals guard
    assert not _reads_arrays(ws, plans, "cuda", "fp32", ["fp32"], "hill")
    auto = _reads_arrays(ws, plans, "auto", "fp32", ["fp32"], "hill")
    assert auto == (not devices.gpu_driver_present())


def test_a_bf16_checkpoint_takes_the_torch_path(tmp_path):
    model_dir = save_tiny_model_dir("llama", tmp_path / "bf16")
    file = model_dir / "model.safetensors"
    save_file({name: t.to(torch.bfloat16) for name, t in load_file(str(file)).items()}, str(file),
              metadata={"format": "pt"})
    ws = WeightSource.open(str(model_dir))
    from llmprobe.analyses.alpha_hill import _reads_arrays, select_matrices

    assert ws.stored_dtype("model.layers.0.mlp.up_proj.weight") == "BF16"
    assert not _reads_arrays(ws, select_matrices(ws), "cpu", "fp32", ["fp32"], "hill")
    rows, _ = alpha_hill_analysis(ws, ["fp32"], device="cpu")
    assert all(math.isfinite(row.alpha_fp32) for row in rows)


def test_a_cpu_weight_command_does_not_import_torch(llama_dir, tmp_path):
    """The second run on a checkpoint (the first keeps where its weights sit in the model) reads
    arrays and never imports torch: ~2-3 s of every such command."""
    script = ("import sys\n"
              "from llmprobe.cli.app import main\n"
              "try:\n    main(sys.argv[1:])\n"  # with argv: SystemExit, not the console's os._exit
              "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
              "print('torch imported:', 'torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for run in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", script, "weights", "alpha-hill", "--model", str(llama_dir),
                               "--precisions", "fp32,fp16", "--device", "cpu", "--out", str(tmp_path / run),
                               "--quiet"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("torch imported: False"), done.stdout
    first, second = (pd.read_csv(tmp_path / run / "precision_alpha_hill_results.csv") for run in ("first", "second"))
    pd.testing.assert_frame_equal(first, second)
