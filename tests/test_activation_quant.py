"""Activation quantization error, top-token error, Fisher and FGMP against independent references.

References are built here without llmprobe's collector or quantizer: activations come from plain
forward pre-hooks, gradients from autograd on each module's *output* times its weight
(∂L/∂x = ∂L/∂y · W), and quantization is a per-group numpy fp32 loop.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

from llmprobe.analyses import activation_quant as aq
from llmprobe.core.calibration import prepare
from llmprobe.core.errors import LLMProbeError
from llmprobe.core.loading import LoadedModel, ModelSource

ARCHS = ("llama", "gpt2")
N_WINDOWS, SEQLEN = 3, 16


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine's 2 cores are shared; two OpenMP threads spinning against other jobs make
    # every op ~10x slower, so these tests run single-threaded and restore the setting after.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_calibration(arch: str, **options):
    model = tiny_model(arch)
    lm = LoadedModel(model, tiny_tokenizer(), ModelSource("local", f"tiny-{arch}", f"tiny-{arch}"),
                     torch.float32, torch.device("cpu"))
    # Ids 4.. avoid the special tokens, so --exclude-bos drops exactly position 0.
    windows = torch.randint(4, 512, (N_WINDOWS, SEQLEN), generator=torch.Generator().manual_seed(1))
    windows[1, 5] = windows[0, 3]  # a repeated token, so some token ids have several occurrences
    windows[2, 9] = windows[0, 3]
    return prepare(lm, windows=windows, seqlen=SEQLEN, **options)


def linear_modules(model) -> dict[str, torch.nn.Module]:
    """Every linear inside the decoder (not the output head), found without llmprobe."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head}


def capture_inputs(model, windows: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """name -> per-window input [L, F] (fp32 numpy), one window per forward pass."""
    captured: dict[str, list[np.ndarray]] = {}
    handles = [module.register_forward_pre_hook(
        lambda mod, args, name=name: captured.setdefault(name, []).append(args[0][0].detach().float().numpy().copy()))
        for name, module in linear_modules(model).items()]
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def reference_gradients(model, windows: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """name -> per-window ∂L_w/∂x [L, F], L_w = mean shifted next-token loss of window w, from the
    gradient of each module's own output: ∂L/∂x = ∂L/∂y · W (Linear y = xWᵀ, Conv1D y = xW)."""
    from transformers.pytorch_utils import Conv1D

    modules = linear_modules(model)
    grads: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    for window in windows:
        outputs: dict[str, torch.Tensor] = {}

        def keep_output(module, args, out, name, store=outputs):
            out.retain_grad()
            store[name] = out

        handles = [module.register_forward_hook(lambda m, a, o, name=name: keep_output(m, a, o, name))
                   for name, module in modules.items()]
        try:
            logits = model(input_ids=window[None], use_cache=False).logits
            loss = F.cross_entropy(logits[0, :-1].float(), window[1:])
            model.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        for name, module in modules.items():
            grad_out = outputs[name].grad[0].double()
            weight = module.weight.detach().double()
            grad_in = grad_out @ (weight.t() if isinstance(module, Conv1D) else weight)
            grads[name].append(grad_in.numpy())
    model.zero_grad(set_to_none=True)
    return grads


def ref_quantize_group(values: np.ndarray, bits: int, symmetric: bool = True) -> np.ndarray:
    """Fake-quantize one group with numpy fp32 arithmetic (round half to even, like torch)."""
    values = values.astype(np.float32)
    if symmetric:
        qmax = np.float32(2 ** (bits - 1) - 1)
        scale = np.float32(np.abs(values).max() / qmax)
        if scale == 0:
            return values.copy()
        codes = np.clip(np.round(values / scale), -qmax, qmax)
        return (codes * scale).astype(np.float32)
    top = np.float32(2 ** bits - 1)
    low, high = values.min(), values.max()
    scale = np.float32((high - low) / top)
    if scale == 0:
        return values.copy()
    zero = np.round(-low / scale)
    codes = np.clip(np.round(values / scale) + zero, np.float32(0), top)
    return ((codes - zero) * scale).astype(np.float32)


def ref_quantize(matrix: np.ndarray, bits: int, granularity: str, group_size: int | None = None,
                 symmetric: bool = True) -> np.ndarray:
    """Quantize one window's kept rows [T, F] with a loop over the groups that share a scale."""
    out = np.empty_like(matrix, dtype=np.float32)
    if granularity == "per-tensor":
        return ref_quantize_group(matrix.reshape(-1), bits, symmetric).reshape(matrix.shape)
    for row in range(matrix.shape[0]):
        if granularity == "per-token":
            out[row] = ref_quantize_group(matrix[row], bits, symmetric)
        else:
            for start in range(0, matrix.shape[1], group_size):
                out[row, start:start + group_size] = ref_quantize_group(
                    matrix[row, start:start + group_size], bits, symmetric)
    return out


def kept_rows(calib) -> list[np.ndarray]:
    return [calib.token_filter.keep_mask(calib.windows[w:w + 1])[0].numpy() for w in range(len(calib.windows))]


# -- quantization error -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity, group_size, symmetric, exclude_bos", [
    ("per-token", None, True, False),
    ("per-tensor", None, True, True),
    ("per-group", 8, True, False),
    ("per-token", None, False, True),
])
def test_quant_error_matches_numpy_reference(arch, granularity, group_size, symmetric, exclude_bos):
    calib = tiny_calibration(arch, exclude_bos=exclude_bos)
    bits = 4
    result = aq.quant_error(calib, bits=bits, granularity=granularity, group_size=group_size,
                            symmetric=symmetric, batch_size=2)
    inputs = capture_inputs(calib.lm.model, calib.windows)
    keep = kept_rows(calib)
    rows = {row.module: row for row in result.modules}
    assert set(rows) == set(inputs)
    for name, per_window in inputs.items():
        sse, count = 0.0, 0
        for matrix, mask in zip(per_window, keep):
            matrix = matrix[mask]
            error = matrix.astype(np.float64) - ref_quantize(matrix, bits, granularity, group_size, symmetric)
            sse += float((error ** 2).sum())
            count += matrix.size
        assert rows[name].elements == count
        assert rows[name].mse == pytest.approx(sse / count, rel=1e-5), name


def test_quant_error_summary_aggregates_module_rows():
    result = aq.quant_error(tiny_calibration("llama"), granularity="per-token")
    frame = pd.DataFrame([row.row() for row in result.modules])
    by_scope = {(s.scope, s.layer, s.role): s for s in result.summary}
    model = by_scope[("model", None, None)]
    assert model.modules == len(frame)
    assert model.mse_mean == pytest.approx(frame.mse.mean(), rel=1e-12)
    assert model.mse_pooled == pytest.approx(frame.sse.sum() / frame.elements.sum(), rel=1e-12)
    for layer, group in frame.groupby("layer"):
        assert by_scope[("layer", layer, None)].mse_mean == pytest.approx(group.mse.mean(), rel=1e-12)
    for role, group in frame.groupby("role"):
        assert by_scope[("role", None, role)].mse_pooled == pytest.approx(
            group.sse.sum() / group.elements.sum(), rel=1e-12)
    # q/k/v share one input: identical rows.
    qkv = frame[frame.input_group == "model.layers.0.attn_in"]
    assert len(qkv) == 3 and qkv.mse.nunique() == 1


def test_quant_error_fp8_per_token_matches_scaled_cast():
    calib = tiny_calibration("llama")
    result = aq.quant_error(calib, fmt="fp8", granularity="per-token")
    inputs = capture_inputs(calib.lm.model, calib.windows)
    name = "model.layers.1.mlp.down_proj"
    matrix = torch.from_numpy(np.concatenate(inputs[name]))
    scale = matrix.abs().amax(dim=1, keepdim=True) / 448.0
    dequant = (matrix / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    expected = float((matrix.double() - dequant.double()).square().mean())
    row = next(r for r in result.modules if r.module == name)
    assert row.format == "fp8_e4m3"
    assert row.mse == pytest.approx(expected, rel=1e-5)


def test_quant_error_fp4_per_group_matches_grid_reference():
    calib = tiny_calibration("llama")
    result = aq.quant_error(calib, fmt="fp4", granularity="per-group", group_size=16)
    inputs = capture_inputs(calib.lm.model, calib.windows)
    name = "model.layers.0.mlp.down_proj"
    groups = np.concatenate(inputs[name]).astype(np.float64).reshape(-1, 16)
    scale = np.abs(groups).max(axis=1, keepdims=True) / 6.0
    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    scaled = np.abs(groups / scale)
    # nearest grid value (no exact ties occur in random activations)
    nearest = grid[np.abs(scaled[..., None] - grid).argmin(axis=-1)] * np.sign(groups)
    expected = float(np.square(groups - nearest * scale).mean())
    row = next(r for r in result.modules if r.module == name)
    assert row.format == "fp4_e2m1"
    assert row.mse == pytest.approx(expected, rel=1e-4)


def test_higher_bits_give_smaller_error():
    calib = tiny_calibration("gpt2")
    errors = [aq.quant_error(calib, bits=b).summary[-1].mse_pooled for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_quant_error_with_hadamard_rotation_matches_rotated_reference():
    from scipy.linalg import hadamard

    calib = tiny_calibration("llama", rotate="hadamard")
    result = aq.quant_error(calib, granularity="per-group", group_size=8)
    inputs = capture_inputs(calib.lm.model, calib.windows)
    rows = {row.module: row for row in result.modules}
    for name, per_window in inputs.items():
        features = per_window[0].shape[1]
        rotation = (hadamard(features) / np.sqrt(features)).astype(np.float64)
        sse, count = 0.0, 0
        for matrix in per_window:
            rotated = (matrix.astype(np.float64) @ rotation.T).astype(np.float32)
            error = rotated.astype(np.float64) - ref_quantize(rotated, 4, "per-group", 8)
            sse += float((error ** 2).sum())
            count += rotated.size
        assert rows[name].mse == pytest.approx(sse / count, rel=1e-4), name


# -- top-token error ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_top_token_error_matches_pandas_groupby(arch):
    calib = tiny_calibration(arch, exclude_bos=True)
    bits, granularity = 4, "per-tensor"
    result = aq.top_token_error(calib, bits=bits, granularity=granularity, top_k=5, batch_size=2)
    inputs = capture_inputs(calib.lm.model, calib.windows)
    keep = kept_rows(calib)
    observations = []
    for name, per_window in inputs.items():
        site = calib.mmap.site(name)
        for w, (matrix, mask) in enumerate(zip(per_window, keep)):
            matrix = matrix[mask]
            errors = ((matrix.astype(np.float64) - ref_quantize(matrix, bits, granularity)) ** 2).mean(axis=1)
            for token_id, error in zip(calib.windows[w][torch.from_numpy(mask)].tolist(), errors):
                observations.append((name, site.layer, site.role, token_id, error))
    frame = pd.DataFrame(observations, columns=["module", "layer", "role", "token_id", "error"])

    def check(rows, group):
        expected = group.groupby("token_id").error.agg(["mean", "count", "max", lambda e: e.std(ddof=0)])
        expected.columns = ["mean", "count", "max", "std"]
        assert len(rows) == len(expected) or len(rows) == 5
        for row in rows:
            ref = expected.loc[row.token_id]
            assert row.count == ref["count"]
            assert row.mean_mse == pytest.approx(ref["mean"], rel=1e-5)
            assert row.max_mse == pytest.approx(ref["max"], rel=1e-5)
            assert row.std_mse == pytest.approx(ref["std"], rel=1e-4, abs=1e-9)
        ranked = expected.sort_values("mean", ascending=False, kind="stable")
        assert [r.token_id for r in rows] == list(ranked.index[:len(rows)])

    check(result.tokens, frame)
    assert len(result.tokens) == frame.token_id.nunique()
    repeated = int(calib.windows[0, 3])
    assert next(r for r in result.tokens if r.token_id == repeated).occurrences == 3
    for layer, group in frame.groupby("layer"):
        check([r for r in result.top if r.scope == "layer" and r.layer == layer], group)
    for role, group in frame.groupby("role"):
        check([r for r in result.top if r.scope == "role" and r.role == role], group)
    top_model = [r for r in result.top if r.scope == "model"]
    assert [r.rank for r in top_model] == [1, 2, 3, 4, 5]
    assert top_model[0].token == calib.decode(top_model[0].token_id)


# -- Fisher information ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_fisher_matches_autograd(arch):
    calib = tiny_calibration(arch)
    result = aq.fisher(calib, batch_size=2)
    grads = reference_gradients(calib.lm.model, calib.windows)
    rows = {row.module: row for row in result.modules}
    assert set(rows) == set(grads)
    for name, per_window in grads.items():
        expected = np.array([float((g ** 2).sum()) for g in per_window])
        np.testing.assert_allclose(result.per_window[name].numpy(), expected, rtol=1e-5)
        assert rows[name].fisher_mean == pytest.approx(expected.mean(), rel=1e-5)
        assert rows[name].fisher_logsumexp == pytest.approx(math.log(expected.sum()), rel=1e-5, abs=1e-6)
        assert rows[name].fisher_std == pytest.approx(expected.std(), rel=1e-4)
    # Backward mode: q, k and v get their own gradients, so their Fisher differs.
    if arch == "llama":
        q, k = rows["model.layers.0.self_attn.q_proj"], rows["model.layers.0.self_attn.k_proj"]
        assert q.fisher_mean != pytest.approx(k.fisher_mean, rel=1e-3)
    model_row = next(s for s in result.summary if s.scope == "model")
    total = sum(np.array([float((g ** 2).sum()) for g in per_window]) for per_window in grads.values())
    assert model_row.fisher_mean == pytest.approx(total.mean(), rel=1e-5)
    assert model_row.fisher_logsumexp == pytest.approx(math.log(total.sum()), rel=1e-5)
    # No parameter gradient was formed, and requires_grad is restored.
    assert all(p.grad is None and p.requires_grad for p in calib.lm.model.parameters())


def test_fisher_logsumexp_is_stable_for_tiny_values():
    values = torch.tensor([1e-300, 1e-310, 0.0], dtype=torch.float64)
    assert aq._logsumexp_of_logs(values) == pytest.approx(math.log(1e-300 + 1e-310), rel=1e-12)
    assert aq._logsumexp_of_logs(torch.zeros(3, dtype=torch.float64)) is None


def test_fisher_is_invariant_under_hadamard_rotation():
    plain = aq.fisher(tiny_calibration("gpt2"))
    rotated = aq.fisher(tiny_calibration("gpt2", rotate="hadamard"))
    for a, b in zip(plain.modules, rotated.modules):
        assert a.module == b.module
        assert b.fisher_mean == pytest.approx(a.fisher_mean, rel=1e-5)


# -- FGMP -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_fgmp_matches_direct_computation(arch):
    calib = tiny_calibration(arch)
    block_size, keep_frac = 8, 0.25
    result = aq.fgmp(calib, block_size=block_size, low="int4", high="int8", keep_frac=keep_frac)
    inputs = capture_inputs(calib.lm.model, calib.windows)
    grads = reference_gradients(calib.lm.model, calib.windows)
    expected_blocks: dict[str, np.ndarray] = {}
    for name in inputs:
        total = 0.0
        for x, g in zip(inputs[name], grads[name]):
            low = ref_quantize(x, 4, "per-group", block_size)
            high = ref_quantize(x, 8, "per-group", block_size)
            weighted = g ** 2 * (low.astype(np.float64) - high) ** 2
            total = total + weighted.reshape(x.shape[0], -1, block_size).sum(axis=(0, 2))
        expected_blocks[name] = total
    rows = {row.module: row for row in result.modules}
    assert set(rows) == set(expected_blocks)
    got_blocks: dict[str, list[float]] = {}
    for block in result.blocks:
        got_blocks.setdefault(block.module, []).append(block.sensitivity)
    scale = max(float(v.max()) for v in expected_blocks.values())
    for name, expected in expected_blocks.items():
        np.testing.assert_allclose(got_blocks[name], expected, rtol=1e-5, atol=1e-9 * scale)
        assert rows[name].sensitivity == pytest.approx(expected.sum(), rel=1e-5)
        assert rows[name].blocks == len(expected)
    # The kept blocks are the model-wide top floor(keep_frac · blocks).
    flat = sorted(((b.sensitivity, b.module, b.block) for b in result.blocks), reverse=True)
    keep = math.floor(keep_frac * len(flat))
    assert {(m, b) for _, m, b in flat[:keep]} == {(b.module, b.block) for b in result.blocks if b.high}
    model = next(s for s in result.summary if s.scope == "model")
    assert model.blocks_high == keep
    assert model.high_share == pytest.approx(sum(s for s, _, _ in flat[:keep]) / sum(s for s, _, _ in flat))


# -- plots -----------------------------------------------------------------------------------------

def test_plots_stay_readable_at_many_layers():
    from llmprobe.plots import activation_quant as plots

    n_layers = 40
    modules = [aq.ActivationQuantError(
        module=f"layers.{layer}.{role}", layer=layer, role=role, input_group=f"layers.{layer}.{role}", site="input",
        format="int4", granularity="per-token", group_size=None, tokens=10, features=8, elements=80,
        sse=1.0 + layer, mse=(1.0 + layer) * (3.0 if role == "mlp.down" else 1.0), signal_power=1.0,
        rel_mse=0.1, sqnr_db=10.0)
        for layer in range(n_layers) for role in ("attn.q", "attn.k", "mlp.down")]
    fig = plots.quant_error_figure(modules)
    top = fig.axes[0]
    assert len(top.get_xticks()) <= 18
    labels = [text.get_text() for text in top.get_legend().get_texts()]
    # attn.q and attn.k have identical series: one line, one joint label.
    assert labels == ["attn.q = attn.k", "mlp.down"]
    blocks = [aq.FgmpBlockSensitivity(module="m", layer=0, role="mlp.down", block=i, first_feature=8 * i,
                                      sensitivity=10.0 ** (-i % 7), rank=i + 1, high=i < 3) for i in range(50)]
    fgmp_rows = [aq.FgmpSensitivity(
        module="m", layer=0, role="mlp.down", input_group="m", low_format="int4", high_format="int8", block_size=8,
        tokens=1, features=400, blocks=50, sensitivity=1.0, sensitivity_per_token=1.0, max_block_sensitivity=1.0,
        delta_mse=0.1, blocks_high=3, high_frac=0.06, high_share=0.5)]
    assert len(plots.fgmp_figure(fgmp_rows, blocks).axes) == 2
    token_rows = [aq.TokenQuantError(scope="model", layer=None, role=None, rank=1, token_id=5, token="$x\n",
                                     occurrences=2, count=4, mean_mse=0.5, std_mse=0.1, max_mse=1.0,
                                     format="int4", granularity="per-token")]
    fig = plots.top_token_error_figure(token_rows)
    fig.canvas.draw()  # '$' must not be parsed as mathtext
    assert plots.token_label("a\nb") == "'a\\nb'"


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=1), "--bits"),
    (dict(bits=17), "--bits"),
    (dict(fmt="int3x"), "--format"),
    (dict(fmt="fp6_e3m2"), "--format"),
    (dict(granularity="per-row"), "--granularity"),
    (dict(granularity="per-group"), "--group-size"),
    (dict(granularity="per-token", group_size=8), "--group-size"),
])
def test_quant_spec_rejects_bad_options(kwargs, needle):
    with pytest.raises(LLMProbeError, match=needle):
        aq.quant_spec(**kwargs)


def test_group_size_must_divide_every_module():
    calib = tiny_calibration("llama")
    expected = r"--group-size 12 does not divide the 32 input features of model\.layers\.0"
    with pytest.raises(LLMProbeError, match=expected):
        aq.quant_error(calib, granularity="per-group", group_size=12)
    with pytest.raises(LLMProbeError, match="--block-size 24"):
        aq.fgmp(calib, block_size=24)


def test_fp8_alias_and_explicit_int_width():
    assert aq.quant_spec(fmt="fp8").fmt == "fp8_e4m3"
    assert aq.quant_spec(bits=4, fmt="int8").fmt == "int8"
    assert aq.quant_spec(fmt="bf16").granularity == "none"
    assert aq.quant_spec(fmt="nf4").group_size == 64


@pytest.mark.parametrize("args, needles", [
    (["--bits", "1"], ["--bits"]),
    (["--quant-bits", "17"], ["--bits", "17"]),
    (["--format", "int33"], ["--format", "int33"]),
    (["--granularity", "per-row"], ["--granularity", "per-row"]),
])
def test_cli_rejects_bad_quant_options(cli, args, needles):
    from conftest import assert_one_line_error

    for command in ("quant-error", "top-token-error"):
        assert_one_line_error(cli("activations", command, *args, "--quiet"), *needles)


def test_cli_rejects_group_size_not_dividing_hidden(cli, tmp_path, wikitext_path):
    from conftest import assert_one_line_error

    model_dir = save_tiny_model_dir("llama", tmp_path / "tiny")
    result = cli("activations", "quant-error", "--model", model_dir, "--dataset", wikitext_path, "--nsamples", "2",
                 "--seqlen", "16", "--granularity", "per-group", "--group-size", "12", "--out", tmp_path / "out",
                 "--quiet")
    assert_one_line_error(result, "--group-size 12", "32", "q_proj")
    assert not (tmp_path / "out").exists()
    result = cli("activations", "fgmp", "--model", model_dir, "--dataset", wikitext_path, "--nsamples", "2",
                 "--seqlen", "16", "--block-size", "24", "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, "--block-size 24")
    assert_one_line_error(cli("activations", "fisher", "--site", "output", "--quiet"), "--site input")
    assert_one_line_error(cli("activations", "fgmp", "--low-format", "int99", "--quiet"), "--low-format")


# -- end to end on the embedded model ------------------------------------------------------------

def _read(out, name):
    return json.loads((out / f"{name}.json").read_text())


def _complete(out):
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["nsamples"] == 2 and manifest["seqlen"] == 64
    assert manifest["dataset"]["text_sha256"]
    return manifest


@pytest.mark.slow
def test_cli_quant_error_end_to_end(cli, tmp_path, wikitext_path, embedded):
    out = tmp_path / "qe"
    # LMAnalyser spellings of the options.
    result = cli("activations", "quant-error", "--calib-dataset", wikitext_path, "--calib-samples", "2",
                 "--seqlen", "64", "--quant-bits", "4", "--quant-granularity", "per-tensor", "--plot-results",
                 "--out", out, "--quiet")
    assert result.code == 0, result
    manifest = _complete(out)
    assert manifest["format"] == "int4" and manifest["granularity"] == "per-tensor"
    rows = _read(out, "quant_error")
    assert len(rows) == 30 * 7 and all(r["mse"] > 0 for r in rows)
    assert (out / "quant_error_per_layer.png").stat().st_size > 10_000
    assert "model" in result.stdout


@pytest.mark.slow
def test_cli_top_token_error_end_to_end(cli, tmp_path, wikitext_path, embedded):
    out = tmp_path / "tte"
    result = cli("activations", "top-token-error", "--dataset", wikitext_path, "--nsamples", "2", "--seqlen", "64",
                 "--top-k", "5", "--layers", "0-3", "--plot", "--out", out, "--quiet", "--json")
    assert result.code == 0, result
    _complete(out)
    printed = json.loads(result.stdout)
    assert [r["rank"] for r in printed] == [1, 2, 3, 4, 5]
    top = _read(out, "top_token_error")
    assert {r["layer"] for r in top if r["scope"] == "layer"} == {0, 1, 2, 3}
    assert (out / "top_token_error.png").is_file()


@pytest.mark.slow
def test_cli_fisher_end_to_end(cli, tmp_path, wikitext_path, embedded):
    out = tmp_path / "fisher"
    result = cli("activations", "fisher", "--dataset", wikitext_path, "--nsamples", "2", "--seqlen", "64",
                 "--batch-size", "2", "--plot", "--plot-format", "svg", "--out", out, "--quiet")
    assert result.code == 0, result
    _complete(out)
    rows = _read(out, "fisher")
    assert len(rows) == 30 * 7 and all(r["fisher_mean"] > 0 and r["windows"] == 2 for r in rows)
    assert (out / "fisher_per_layer.svg").is_file()


@pytest.mark.slow
def test_cli_fgmp_end_to_end(cli, tmp_path, wikitext_path, embedded):
    out = tmp_path / "fgmp"
    result = cli("activations", "fgmp", "--dataset", wikitext_path, "--nsamples", "2", "--seqlen", "64",
                 "--block-size", "32", "--high-format", "fp8_e4m3", "--keep-frac", "0.2", "--roles", "mlp.down",
                 "--plot", "--out", out, "--quiet")
    assert result.code == 0, result
    _complete(out)
    blocks = _read(out, "fgmp_blocks")
    assert len(blocks) == 30 * (1536 // 32)
    assert sum(b["high"] for b in blocks) == math.floor(0.2 * len(blocks))
    summary = _read(out, "fgmp_summary")
    assert summary[-1]["scope"] == "model" and 0 < summary[-1]["high_share"] <= 1
    assert (out / "fgmp_sensitivity.png").is_file()
    # the paper's own pairing: fp4 (E2M1) blocks against fp8 blocks
    fp4 = cli("activations", "fgmp", "--dataset", wikitext_path, "--nsamples", "2", "--seqlen", "64",
              "--low-format", "fp4", "--high-format", "fp8", "--block-size", "16", "--roles", "mlp.down",
              "--out", tmp_path / "fgmp4", "--quiet")
    assert fp4.code == 0, fp4
