"""Quantizer simulators against plain-Python references, hand-computed values and torch's casts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmprobe.core.errors import LLMProbeError
from llmprobe.core.quant import (
    ARRAY_FORMATS,
    FORMATS,
    cast_array,
    cast_to,
    fake_quant_fp8,
    fake_quant_int,
    fake_quant_nf4,
    nf4_levels,
    parse_format,
    quantize,
    symmetric_int_error_per_token,
)

# NF4 code values as published with QLoRA (arXiv 2305.14314, appendix) / bitsandbytes.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def reference_int_group(values, bits, symmetric):
    """One group, element by element, with numpy fp32 scalars so the arithmetic is fp32 like the library."""
    f32 = np.float32
    values = [f32(v) for v in values]
    out = []
    if symmetric:
        qmax = f32(2 ** (bits - 1) - 1)
        absmax = max(abs(v) for v in values)
        scale = absmax / qmax
        for v in values:
            if scale == 0:
                out.append(v)
                continue
            q = min(max(np.round(v / scale), -qmax), qmax)
            out.append(f32(q * scale))
    else:
        top = f32(2**bits - 1)
        low, high = min(values), max(values)
        scale = (high - low) / top
        for v in values:
            if scale == 0:
                out.append(v)
                continue
            zero = np.round(-low / scale)
            q = min(max(np.round(v / scale) + zero, f32(0)), top)
            out.append(f32((q - zero) * scale))
    return out


def reference_rows(matrix, bits, symmetric):
    return torch.tensor(
        [reference_int_group(row, bits, symmetric) for row in matrix.tolist()], dtype=torch.float32
    )


# ----------------------------------------------------------------------------- integer grids


def test_int4_symmetric_hand_computed():
    # qmax = 7 and absmax = 7, so scale = 1 exactly; rounding is half to even (-3.5 -> -4, 0.5 -> 0,
    # 2.5 -> 2). Halving every value halves the scale and the result.
    x = torch.tensor([[7.0, -3.5, 1.75, 0.5, 2.5, -6.2]])
    expected = torch.tensor([[7.0, -4.0, 2.0, 0.0, 2.0, -6.0]])
    assert torch.equal(fake_quant_int(x, 4), expected)
    assert torch.equal(fake_quant_int(x / 2, 4), expected / 2)
    # int2 symmetric has the three codes -1, 0, 1
    assert torch.equal(
        fake_quant_int(torch.tensor([-1.0, -0.4, 0.6, 1.0]), 2), torch.tensor([-1.0, 0.0, 1.0, 1.0])
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_per_channel_matches_python_loop(bits, symmetric):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 12, generator=generator)
    got = fake_quant_int(x, bits, symmetric=symmetric, granularity="per-channel")
    assert got.dtype == torch.float32
    assert torch.equal(got, reference_rows(x, bits, symmetric))


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_and_per_group_match_python_loop(symmetric):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, generator=generator)
    per_tensor = fake_quant_int(x, 4, symmetric=symmetric, granularity="per-tensor")
    assert torch.equal(per_tensor, reference_rows(x.reshape(1, -1), 4, symmetric).reshape(3, 8))
    per_group = fake_quant_int(x, 4, symmetric=symmetric, granularity="per-group", group_size=4)
    assert torch.equal(per_group, reference_rows(x.reshape(-1, 4), 4, symmetric).reshape(3, 8))


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize(
    "granularity,group_size", [("per-channel", None), ("per-tensor", None), ("per-group", 16)]
)
def test_symmetric_error_bound_half_scale(bits, granularity, group_size):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 64, generator=generator) * 3
    q = fake_quant_int(x, bits, granularity=granularity, group_size=group_size)
    groups = {"per-channel": x, "per-tensor": x.reshape(1, -1), "per-group": x.reshape(-1, 16)}[granularity]
    scale = groups.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
    error = (q.reshape(groups.shape) - groups).abs()
    # the bound plus fp32 round-off of the product q·scale (matters at 16 bits)
    assert torch.all(error <= scale / 2 + groups.abs() * 2.0**-22)
    # the absmax element lands exactly on the top code
    rows = torch.arange(groups.shape[0])
    top = groups.abs().argmax(dim=1)
    torch.testing.assert_close(q.reshape(groups.shape)[rows, top], groups[rows, top], rtol=1e-6, atol=0)


def test_asymmetric_bound_and_exact_endpoints():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 32, generator=generator)
    q = fake_quant_int(x, 4, symmetric=False)
    scale = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 15
    assert torch.all((q - x).abs() <= scale * (1 + 1e-5))
    # min == 0 makes the zero point 0, so both ends are on the grid and reproduced exactly
    nonneg = torch.tensor([[0.0, 0.4, 1.1, 3.0], [0.0, 0.2, 0.5, 1.5]])
    qn = fake_quant_int(nonneg, 4, symmetric=False)
    assert torch.equal(qn[:, 0], nonneg[:, 0])
    torch.testing.assert_close(qn[:, -1], nonneg[:, -1], rtol=1e-6, atol=0)
    # -min/scale integral (here 5 codes below zero): endpoints exact as well
    on_grid = torch.tensor([[-5.0, -1.0, 0.0, 2.5, 10.0]])
    torch.testing.assert_close(
        fake_quant_int(on_grid, 4, symmetric=False)[0, [0, -1]], torch.tensor([-5.0, 10.0])
    )
    # zero is always exactly representable
    mixed = torch.tensor([[-0.37, 0.0, 1.91, 0.0, 0.55]])
    assert fake_quant_int(mixed, 3, symmetric=False)[0, 1] == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_and_constant_groups_no_nan(symmetric):
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.25], [0.3, 0.3, 0.3, 0.3]])
    q = fake_quant_int(x, 4, symmetric=symmetric, granularity="per-group", group_size=4)
    assert torch.isfinite(q).all()
    assert torch.equal(q[0], x[0])
    if not symmetric:
        assert torch.equal(q[2], x[2])  # a constant group is represented exactly
    assert torch.isfinite(quantize(torch.zeros(3, 64), "nf4")).all()
    assert torch.equal(quantize(torch.zeros(2, 8), "fp8_e4m3"), torch.zeros(2, 8))


def test_per_group_shapes_axis_and_per_token():
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 8, generator=generator)
    grouped = fake_quant_int(x, 4, granularity="per-group", group_size=4)
    assert grouped.shape == x.shape
    assert torch.equal(grouped, fake_quant_int(x.reshape(-1, 4), 4).reshape(2, 3, 8))
    # per-token (activations) and per-channel (weights) are the same reduction over the last dim
    assert torch.equal(
        fake_quant_int(x, 4, granularity="per-token"), fake_quant_int(x, 4, granularity="per-channel")
    )
    # a Conv1D weight stored [in, out]: axis=0 gives one scale per output column
    w = torch.randn(12, 5, generator=generator)
    assert torch.equal(fake_quant_int(w, 4, axis=0), fake_quant_int(w.T.contiguous(), 4).T)
    assert torch.equal(
        fake_quant_int(w, 4, granularity="per-group", group_size=3, axis=0),
        fake_quant_int(w.T.contiguous(), 4, granularity="per-group", group_size=3).T,
    )
    # scalars, 1-D and empty tensors keep their shape
    assert fake_quant_int(torch.tensor(0.7), 8).shape == ()
    assert fake_quant_int(torch.randn(10), 8).shape == (10,)
    assert fake_quant_int(torch.zeros(0, 4), 8).shape == (0, 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_per_token_error_is_the_two_step_error_bit_for_bit(bits):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(400, 64, generator=generator) * torch.logspace(-6, 6, 400).unsqueeze(1)
    x[:, 0] = torch.where(torch.arange(400) % 2 == 0, -1.0, 1.0) * x.abs().amax(dim=1)  # ±absmax exactly
    x[3] = 0.0       # a zero row: fake_quant_int keeps it (error 0)
    x[5] = 1e-44     # a subnormal row whose scale absmax/qmax rounds to zero: kept as well
    x[7, 11] = -1e4  # an outlier that sets its row's scale
    x[9, 2] = math.inf
    x[10, 4] = math.nan
    expected = fake_quant_int(x, bits, granularity="per-token") - x
    out = torch.full_like(x, math.nan)
    got = symmetric_int_error_per_token(x, bits, x.abs().amax(dim=1), out=out)
    assert got is out
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_reduced_precision_input_gets_fp32_math():
    generator = torch.Generator().manual_seed(5)
    x_bf16 = (torch.randn(4, 64, generator=generator) * 2).to(torch.bfloat16)
    x_fp16 = x_bf16.to(torch.float16)
    for fmt, kwargs in [
        ("int4", {}),
        ("int8", {"granularity": "per-group", "group_size": 16}),
        ("int3", {"symmetric": False}),
        ("nf4", {}),
        ("fp8_e4m3", {"granularity": "per-token"}),
        ("fp8_e5m2", {"granularity": "none"}),
    ]:
        reference = quantize(x_bf16.float(), fmt, **kwargs)
        for low in (x_bf16, x_fp16):
            got = quantize(low, fmt, **kwargs)
            assert got.dtype == torch.float32
            assert torch.equal(got, reference), fmt
    # doing the division in bf16 would not give the same answer: the fp32 path is what is tested
    scale = x_bf16.abs().amax(1, keepdim=True) / 7
    in_bf16 = (torch.round(x_bf16 / scale).clamp(-7, 7) * scale).float()
    assert not torch.equal(in_bf16, quantize(x_bf16, "int4"))


# ----------------------------------------------------------------------------- float formats


def test_fp16_bf16_equal_torch_cast_and_fp64_stays_fp64():
    generator = torch.Generator().manual_seed(2)
    x64 = torch.randn(50, dtype=torch.float64, generator=generator) * 1e3
    x32 = x64.float()
    for fmt, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for x in (x32, x64):
            got = cast_to(x, fmt)
            assert got.dtype == torch.float32
            assert torch.equal(got, x.to(dtype).float())
            assert torch.equal(quantize(x, fmt), got)
    assert quantize(x64, "fp64").dtype == torch.float64
    assert torch.equal(quantize(x64, "fp64"), x64)
    assert quantize(x64, "fp32").dtype == torch.float32
    assert torch.equal(quantize(x64, "fp32"), x32)
    assert torch.equal(
        cast_to(torch.tensor([1e6]), "fp16"), torch.tensor([math.inf])
    )  # the real cast overflows


def test_fp8_saturates_instead_of_nan_or_inf():
    x = torch.tensor([1e6, -1e6, math.inf, -math.inf, 500.0, 1.0, math.nan])
    e4m3 = cast_to(x, "fp8_e4m3")
    assert e4m3[:5].tolist() == [448.0, -448.0, 448.0, -448.0, 448.0]
    assert e4m3[5] == 1.0 and math.isnan(e4m3[6])
    e5m2 = cast_to(x, "fp8_e5m2")
    assert e5m2[:4].tolist() == [57344.0, -57344.0, 57344.0, -57344.0]
    # in range, the cast is torch's own
    inside = torch.linspace(-400, 400, 997)
    assert torch.equal(cast_to(inside, "fp8_e4m3"), inside.to(torch.float8_e4m3fn).float())
    assert torch.equal(cast_to(inside, "fp8_e5m2"), inside.to(torch.float8_e5m2).float())
    assert torch.equal(quantize(inside, "fp8_e4m3", granularity="none"), cast_to(inside, "fp8_e4m3"))


def test_scaled_fp8_uses_the_format_range():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 32, generator=generator) * 0.001  # small values: subnormal or zero if cast directly
    scaled = fake_quant_fp8(x, "fp8_e4m3", granularity="per-token")
    absmax = x.abs().amax(1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; absmax maps to 448
    assert torch.all((scaled - x).abs() <= absmax * 2.0**-4)
    torch.testing.assert_close(scaled.abs().amax(1, keepdim=True), absmax, rtol=1e-6, atol=0)
    plain_error = (cast_to(x, "fp8_e4m3") - x).pow(2).mean()
    assert (scaled - x).pow(2).mean() < plain_error / 100
    manual = (x / (absmax / 448)).to(torch.float8_e4m3fn).float() * (absmax / 448)
    assert torch.equal(scaled, manual)
    assert torch.equal(quantize(x, "fp8_e4m3"), fake_quant_fp8(x, "fp8_e4m3", granularity="per-channel"))
    assert torch.equal(
        quantize(x, "fp8_e5m2", granularity="per-group", group_size=8),
        fake_quant_fp8(x.reshape(-1, 8), "fp8_e5m2", granularity="per-token").reshape(6, 32),
    )


# ----------------------------------------------------------------------------- nf4


def test_nf4_levels_match_published_values():
    levels = nf4_levels()
    assert levels.shape == (16,)
    assert torch.all(levels[1:] > levels[:-1])
    torch.testing.assert_close(levels, torch.tensor(PUBLISHED_NF4), rtol=0, atol=1e-4)
    assert levels[7] == 0.0 and levels[0] == -1.0 and levels[-1] == 1.0


def test_nf4_matches_nearest_level_loop_with_partial_block():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(3, 50, generator=generator)  # 150 elements: blocks of 64, 64, 22
    got = fake_quant_nf4(x, block_size=64)
    levels = [float(v) for v in nf4_levels()]
    flat = x.reshape(-1).tolist()
    expected = []
    for start in range(0, len(flat), 64):
        block = flat[start : start + 64]
        absmax = np.float32(max(abs(v) for v in block))
        for v in block:
            normalized = np.float32(v) / absmax
            nearest = min(levels, key=lambda level: abs(np.float32(level) - normalized))
            expected.append(np.float32(nearest) * absmax)
    torch.testing.assert_close(
        got.reshape(-1), torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-7
    )
    assert torch.equal(quantize(x, "nf4"), got)
    assert torch.equal(quantize(x, "nf4", group_size=25), fake_quant_nf4(x, 25))


# ----------------------------------------------------------------------------- names and errors


def test_parse_format_and_formats():
    assert parse_format(" INT8 ") == "int8"
    assert parse_format("nf4") == "nf4"
    assert {
        "fp64",
        "fp32",
        "fp16",
        "bf16",
        "fp8_e4m3",
        "fp8_e5m2",
        "int2",
        "int4",
        "int8",
        "int16",
        "nf4",
    } <= set(FORMATS)
    with pytest.raises(LLMProbeError, match="accepted"):
        parse_format("fp8")
    with pytest.raises(LLMProbeError, match="between 2 and 16"):
        parse_format("int17")
    with pytest.raises(LLMProbeError):
        parse_format("int1")


def test_bad_input_raises_llmprobe_error():
    x = torch.randn(4, 10)
    bad_calls = [
        lambda: fake_quant_int(x, 1),
        lambda: fake_quant_int(x, 17),
        lambda: fake_quant_int(x, 4.0),
        lambda: fake_quant_int(x, 4, granularity="per-row"),
        lambda: fake_quant_int(x, 4, granularity="per-group", group_size=3),  # 3 does not divide 10
        lambda: fake_quant_int(x, 4, granularity="per-group"),  # no group size
        lambda: fake_quant_int(x, 4, granularity="per-group", group_size=0),
        lambda: fake_quant_int(x, 4, axis=2),
        lambda: quantize(x, "int4", granularity="none"),
        lambda: fake_quant_fp8(x, "int8"),
        lambda: fake_quant_fp8(x, "fp8_e4m3", granularity="rows"),
        lambda: fake_quant_nf4(x, block_size=0),
        lambda: cast_to(x, "int8"),
        lambda: quantize(x, "float8"),
        lambda: quantize([1.0, 2.0], "int8"),
    ]
    for call in bad_calls:
        with pytest.raises(LLMProbeError):
            call()


# -- FP4 E2M1 -------------------------------------------------------------------------------------

def _e2m1_reference(value: float) -> float:
    """Plain-Python E2M1 rounding: nearest representable value, ties to the even mantissa."""
    import math

    if math.isnan(value):
        return value
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    even = {0.0, 1.0, 2.0, 4.0}  # mantissa bit 0
    magnitude = min(abs(value), 6.0)
    best = min(grid, key=lambda g: (abs(g - magnitude), g not in even))
    return math.copysign(best, value)


def test_fp4_e2m1_matches_plain_loop_including_ties_and_saturation():
    from llmprobe.core.quant import fake_quant_fp4

    values = [0.0, 0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 7.0, 100.0, -0.75, -2.5, -5.0,
              -9.0, float("inf"), float("-inf")]
    x = torch.tensor(values + list(torch.linspace(-7, 7, 301).tolist()))
    got = fake_quant_fp4(x)
    want = torch.tensor([_e2m1_reference(v) for v in x.tolist()])
    assert torch.equal(got, want)
    assert torch.isnan(fake_quant_fp4(torch.tensor([float("nan")]))).all()


def test_fp4_e2m1_per_group_scales_absmax_to_six():
    from llmprobe.core.quant import quantize

    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    got = quantize(x, "fp4_e2m1", granularity="per-group", group_size=16)
    assert got.dtype == torch.float32
    groups = x.float().reshape(-1, 16)
    scale = groups.abs().amax(dim=1, keepdim=True) / 6.0
    want = torch.tensor([[_e2m1_reference(v) for v in row] for row in (groups / scale).tolist()]) * scale
    assert torch.allclose(got.reshape(-1, 16), want, rtol=0, atol=1e-6)
    # every group's absmax survives exactly
    assert torch.allclose(got.reshape(-1, 16).abs().amax(dim=1), groups.abs().amax(dim=1))


@pytest.mark.parametrize("fmt", ARRAY_FORMATS)
def test_cast_array_is_cast_to_bit_for_bit(fmt):
    """numpy's casts for the torch-free weight path: round-to-nearest-even, subnormals, overflow
    to ±inf, NaN and signed zeros exactly as torch's."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4000, generator=generator) * torch.logspace(-9, 6, 4000)
    x[:6] = torch.tensor([65504.0, 65520.0, -1e6, float("nan"), -0.0, 6e-8])  # fp16 edges
    got = cast_array(x.numpy(), fmt)
    want = cast_to(x, fmt).numpy()
    assert got.dtype == want.dtype
    assert np.array_equal(got.view(np.uint64 if got.dtype == np.float64 else np.uint32),
                          want.view(np.uint64 if want.dtype == np.float64 else np.uint32))
    with pytest.raises(LLMProbeError, match="quantize"):
        cast_array(x.numpy(), "bf16")
