"""Quantizer simulators: fake quantization of weights and activations.

Every simulator takes a tensor of any dtype and returns the de-quantized copy as **fp32**, with
all arithmetic (scales, division, rounding) done in fp32 — never in the model's bf16/fp16, whose
8-/11-bit mantissas would add their own rounding error on top of the one being measured. The one
exception is ``"fp64"``, which returns fp64 so that "fp64" always means fp64 arithmetic downstream.

Formats (:data:`FORMATS`, validated by :func:`parse_format`)
    ``fp64`` ``fp32``             identity in that precision.
    ``fp16`` ``bf16``             round-trip cast, exactly ``x.to(fp16/bf16).float()`` (overflow
                                  gives ±inf, as the real cast does).
    ``fp8_e4m3`` ``fp8_e5m2``     round-trip through ``torch.float8_e4m3fn`` / ``float8_e5m2``
                                  with *saturation*: values beyond the largest finite value
                                  (448 / 57344), ±inf included, are clamped to ±max before the
                                  cast, as fp8 hardware kernels do ("satfinite"); torch's own cast
                                  would give NaN (e4m3fn) or inf (e5m2) in some versions. NaN in,
                                  NaN out. Optionally scaled to the format's range (see below).
    ``int2`` … ``int16``          uniform integer grid (``int8``/``int4`` included), symmetric or
                                  asymmetric, per-tensor / per-channel / per-token / per-group.
    ``nf4``                       4-bit NormalFloat (QLoRA), absmax per block of 64.
    ``fp4_e2m1``                  the OCP 4-bit float (1 sign, 2 exponent, 1 mantissa bit): values
                                  0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6, round to nearest, ties to
                                  even, saturating at ±6. Scaled per group like fp8 (the element
                                  type of MXFP4/NVFP4; the block scale here is kept in fp32).

Integer grids (:func:`fake_quant_int`)
    symmetric:  ``scale = absmax / (2^(b-1) - 1)``, ``q = clamp(round(x/scale), -(2^(b-1)-1),
    2^(b-1)-1)``, ``x̂ = q·scale``. The clamp range is the *restricted* symmetric range: the code
    ``-2^(b-1)`` is never used, so the grid is symmetric about zero and ``absmax`` maps exactly to
    the top code (the usual choice for weights, e.g. LLM.int8()). Because ``|x/scale| <= qmax``
    the clamp only absorbs fp32 round-off, and ``|x - x̂| <= scale/2`` for every element.

    asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min/scale)`` (an integer, so
    0.0 is exactly representable), ``q = clamp(round(x/scale) + zero, 0, 2^b - 1)``,
    ``x̂ = (q - zero)·scale``. Interior values are within ``scale/2``; because the zero point is
    rounded, values near the ends of the range can be clamped and are within
    ``scale/2 + |zero + min/scale|·scale <= scale``. The endpoints are exact when ``-min/scale``
    is an integer (for instance ``min == 0``).

    A group whose scale would be zero (all zeros, or a constant group in asymmetric mode) is
    returned unchanged instead of dividing by zero: a constant is represented exactly by the
    zero point alone. ``torch.round`` rounds half to even.

Granularity (which elements share one scale); the reduction axis is ``axis`` (default: last)
    ``per-tensor``   one scale for the whole tensor.
    ``per-channel``  one scale per slice along ``axis``: for a weight ``[out, in]`` with
                     ``axis=-1`` that is one scale per output row (for GPT-2 ``Conv1D`` weights,
                     stored ``[in, out]``, pass ``axis=0``).
    ``per-token``    the same reduction as per-channel, named for activations ``[..., features]``:
                     one scale per token.
    ``per-group``    groups of ``group_size`` consecutive elements along ``axis``; ``group_size``
                     must divide that dimension.

fp8 with a scale (:func:`fake_quant_fp8`)
    With ``granularity="none"`` fp8 is the saturating cast. With any other granularity each group
    is first divided by ``scale = absmax / fp8_max`` so its largest element lands on the format's
    largest finite value, cast, and multiplied back — how fp8 activations and weights are
    deployed. In :func:`quantize`, fp8 follows the ``granularity`` argument: its default
    ``"per-channel"`` gives scaled fp8; pass ``granularity="none"`` for the plain cast.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from .errors import LLMProbeError

if TYPE_CHECKING:  # torch is imported where a function needs it
    import torch

INT_BITS_RANGE = range(2, 17)
FLOAT_FORMATS = ("fp64", "fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
FORMATS: tuple[str, ...] = (FLOAT_FORMATS + tuple(f"int{bits}" for bits in INT_BITS_RANGE)
                            + ("nf4", "fp4_e2m1"))
GRANULARITIES = ("per-tensor", "per-channel", "per-token", "per-group")
FP8_GRANULARITIES = ("none",) + GRANULARITIES
NF4_BLOCK_SIZE = 64

FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")
_INT_FORMAT = re.compile(r"int(\d+)")
_ACCEPTED_NAMES = "fp64, fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int2 … int16 (e.g. int8, int4), nf4, fp4_e2m1"
# Non-negative E2M1 values; the odd entries have mantissa bit 1 (ties round away from them).
_E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0


def parse_format(name: str) -> str:
    """Return the canonical (lower-case) format name, or raise LLMProbeError listing the accepted ones."""
    if not isinstance(name, str):
        raise LLMProbeError(
            f"format must be a string, got {type(name).__name__}; accepted: {_ACCEPTED_NAMES}"
        )
    canonical = name.strip().lower()
    if canonical in FORMATS:
        return canonical
    int_match = _INT_FORMAT.fullmatch(canonical)
    if int_match:
        raise LLMProbeError(
            f"unsupported integer width {name!r}: bits must be between {INT_BITS_RANGE.start} and "
            f"{INT_BITS_RANGE.stop - 1}"
        )
    raise LLMProbeError(f"unknown format {name!r}; accepted: {_ACCEPTED_NAMES}")


def _cast_dtype(fmt: str) -> torch.dtype:
    """The torch dtype a float format rounds through (fp16, bf16 and the fp8 formats)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
            "fp8_e5m2": torch.float8_e5m2}[fmt]


def _int_bits(fmt: str) -> int | None:
    match = _INT_FORMAT.fullmatch(fmt)
    return int(match.group(1)) if match else None


def _as_fp32(x: torch.Tensor) -> torch.Tensor:
    import torch
    if not isinstance(x, torch.Tensor):
        raise LLMProbeError(f"expected a torch.Tensor, got {type(x).__name__}")
    return x.to(torch.float32)


def fp8_max(fmt: str) -> float:
    """Largest finite value of an fp8 format (448 for e4m3, 57344 for e5m2)."""
    import torch
    fmt = parse_format(fmt)
    if fmt not in FP8_FORMATS:
        raise LLMProbeError(f"{fmt!r} is not an fp8 format; use fp8_e4m3 or fp8_e5m2")
    return float(torch.finfo(_cast_dtype(fmt)).max)


def _saturating_fp8_cast(x32: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 -> fp8 -> fp32 with out-of-range values (±inf included) clamped to ±max; NaN stays NaN."""
    import torch
    limit = fp8_max(fmt)
    # clamp() passes NaN through, so only finite overflow and ±inf are affected.
    return x32.clamp(-limit, limit).to(_cast_dtype(fmt)).to(torch.float32)


def cast_to(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round-trip ``x`` through a floating-point format; fp32 result (fp64 for ``"fp64"``).

    fp16/bf16 are plain casts from the input dtype (one rounding, exactly torch's cast). fp8
    saturates to the format's largest finite value instead of producing NaN/inf (module docstring).
    """
    import torch
    fmt = parse_format(fmt)
    if not isinstance(x, torch.Tensor):
        raise LLMProbeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if fmt == "fp64":
        return x.to(torch.float64)
    if fmt == "fp32":
        return x.to(torch.float32)
    if fmt in ("fp16", "bf16"):
        return x.to(_cast_dtype(fmt)).to(torch.float32)
    if fmt in FP8_FORMATS:
        return _saturating_fp8_cast(_as_fp32(x), fmt)
    raise LLMProbeError(
        f"cast_to handles floating formats only ({', '.join(FLOAT_FORMATS)}); use quantize() for {fmt!r}"
    )


# Float formats whose round trip numpy does exactly as torch does (IEEE round-to-nearest-even;
# fp16 overflow to ±inf): weight commands on the CPU convert plain arrays without torch.
ARRAY_FORMATS = ("fp64", "fp32", "fp16")


def cast_array(x: np.ndarray, fmt: str) -> np.ndarray:
    """:func:`cast_to` for a numpy array and a format of :data:`ARRAY_FORMATS`: the same values
    (tests compare the bits)."""
    fmt = parse_format(fmt)
    if fmt == "fp64":
        return x.astype(np.float64)
    if fmt == "fp32":
        return x.astype(np.float32, copy=False)
    if fmt == "fp16":
        with np.errstate(over="ignore"):  # overflow to ±inf is the cast's meaning, as in torch
            return x.astype(np.float16).astype(np.float32)
    raise LLMProbeError(f"cast_array handles {', '.join(ARRAY_FORMATS)}; use quantize() for {fmt!r}")


def _grouped(x32: torch.Tensor, granularity: str, group_size: int | None, axis: int):
    """View ``x32`` as ``[n_groups, group_len]`` (one row per shared scale) plus a function undoing it."""
    if granularity not in GRANULARITIES:
        raise LLMProbeError(f"unknown granularity {granularity!r}; accepted: {', '.join(GRANULARITIES)}")
    original_shape = x32.shape
    work = x32.reshape(1) if x32.ndim == 0 else x32
    if not -work.ndim <= axis < work.ndim:
        raise LLMProbeError(f"axis {axis} is out of range for a tensor with {work.ndim} dimension(s)")
    moved = work.movedim(axis, -1)
    moved_shape = moved.shape
    last = moved_shape[-1]
    if granularity == "per-tensor":
        groups = moved.reshape(1, -1)
    elif granularity in ("per-channel", "per-token"):
        groups = moved.reshape(-1, last)
    else:
        if (
            group_size is None
            or isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or group_size < 1
        ):
            raise LLMProbeError(
                f"per-group quantization needs a positive integer group_size, got {group_size!r}"
            )
        if last % group_size != 0:
            raise LLMProbeError(
                f"group_size {group_size} does not divide the quantized dimension of size {last}"
            )
        groups = moved.reshape(-1, group_size)

    def restore(grouped_values: torch.Tensor) -> torch.Tensor:
        return grouped_values.reshape(moved_shape).movedim(-1, axis).reshape(original_shape)

    return groups, restore


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in INT_BITS_RANGE:
        raise LLMProbeError(
            f"bits must be an integer between {INT_BITS_RANGE.start} and {INT_BITS_RANGE.stop - 1}, got {bits!r}"
        )
    return bits


def fake_quant_int(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    granularity: str = "per-channel",
    group_size: int | None = None,
    axis: int = -1,
) -> torch.Tensor:
    """Fake-quantize ``x`` onto a ``bits``-bit integer grid; fp32 result (definitions in the module docstring)."""
    import torch
    bits = _check_bits(bits)
    x32 = _as_fp32(x)
    groups, restore = _grouped(x32, granularity, group_size, axis)
    if x32.numel() == 0:
        return x32.clone()
    if symmetric:
        qmax = float(2 ** (bits - 1) - 1)
        scale = groups.abs().amax(dim=1, keepdim=True) / qmax
        degenerate = scale == 0
        safe_scale = torch.where(degenerate, torch.ones_like(scale), scale)
        codes = torch.clamp(torch.round(groups / safe_scale), -qmax, qmax)
        dequant = codes * safe_scale
    else:
        top_code = float(2**bits - 1)
        group_min = groups.amin(dim=1, keepdim=True)
        group_max = groups.amax(dim=1, keepdim=True)
        scale = (group_max - group_min) / top_code
        degenerate = scale == 0
        safe_scale = torch.where(degenerate, torch.ones_like(scale), scale)
        zero_point = torch.round(-group_min / safe_scale)
        codes = torch.clamp(torch.round(groups / safe_scale) + zero_point, 0.0, top_code)
        dequant = (codes - zero_point) * safe_scale
    # A zero-range group keeps its (constant) values: no division by zero, no NaN.
    dequant = torch.where(degenerate, groups, dequant)
    return restore(dequant)


def symmetric_int_error_per_token(x: torch.Tensor, bits: int, row_abs_max: torch.Tensor, *,
                                  out: torch.Tensor) -> torch.Tensor:
    """``Q(x) − x`` for symmetric ``bits``-bit RTN with one scale per row of ``x`` [T, F] fp32
    (per-token :func:`fake_quant_int`), given each row's max|x|, written into ``out`` [T, F].

    The same fp32 operations in the same order as :func:`fake_quant_int` but its clamp, so ``out``
    equals ``fake_quant_int(x, bits, granularity="per-token") - x`` bit for bit: the clamp cannot
    change a code here, since |x| <= absmax puts x/scale within a few ulps of ±qmax at most, which
    rounds to ±qmax (NaN and inf pass through both forms alike). But the caller supplies
    the absmax it already has and one reusable output, where the two-step form makes about eight
    fresh [T, F] temporaries (each costing page faults, see core.collect.Workspace). Made for
    error statistics over many activations (activations quant-error).
    """
    import torch
    bits = _check_bits(bits)
    qmax = float(2 ** (bits - 1) - 1)
    scale = (row_abs_max / qmax).unsqueeze(1)
    degenerate = scale == 0
    safe_scale = torch.where(degenerate, torch.ones_like(scale), scale)
    torch.div(x, safe_scale, out=out).round_().mul_(safe_scale).sub_(x)
    if bool(degenerate.any()):  # fake_quant_int returns such a row unchanged: error 0
        out.masked_fill_(degenerate, 0.0)
    return out


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 code values (ascending, fp32, in [-1, 1]) built from normal quantiles.

    QLoRA (arXiv 2305.14314, §3) builds an asymmetric 4-bit type so that zero is exact: 8 positive
    quantiles of N(0, 1) and 7 negative ones, equally spaced in probability from 0.5 to an outer
    probability ``p_out``, plus 0, normalized by the largest. ``p_out`` cannot be 1 (the quantile
    is infinite); the paper/bitsandbytes use the mean of the outermost bin-centre offsets for 16
    and 15 bins: ``p_out = 1 - (1/(2·16) + 1/(2·15)) / 2 ≈ 0.9677083``.
    """
    import torch
    outer_probability = 1.0 - 0.5 * (1.0 / 32.0 + 1.0 / 30.0)
    positive_probs = torch.linspace(outer_probability, 0.5, 9, dtype=torch.float64)[:-1]
    negative_probs = torch.linspace(outer_probability, 0.5, 8, dtype=torch.float64)[:-1]
    positive = torch.special.ndtri(positive_probs)
    negative = -torch.special.ndtri(negative_probs)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    values = torch.sort(values / positive.max()).values
    return values.to(torch.float32)


def fake_quant_nf4(x: torch.Tensor, block_size: int = NF4_BLOCK_SIZE) -> torch.Tensor:
    """Fake-quantize to NF4: per block of ``block_size`` consecutive elements (row-major flattening,
    as bitsandbytes does), scale by the block's absmax and snap to the nearest NF4 level.

    A trailing partial block is padded with zeros for the absmax (zeros never raise it) and the
    padding is dropped afterwards. An all-zero block stays zero. fp32 result.
    """
    import torch
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise LLMProbeError(f"nf4 block_size must be a positive integer, got {block_size!r}")
    x32 = _as_fp32(x)
    flat = x32.reshape(-1)
    count = flat.numel()
    if count == 0:
        return x32.clone()
    padding = (-count) % block_size
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    blocks = flat.reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    safe_absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    normalized = blocks / safe_absmax
    levels = nf4_levels().to(x32.device)
    # Nearest level = the bucket between consecutive midpoints of the sorted levels.
    midpoints = (levels[1:] + levels[:-1]) / 2
    nearest = levels[torch.bucketize(normalized, midpoints)]
    dequant = (nearest * safe_absmax).reshape(-1)[:count]
    return dequant.reshape(x32.shape)


def fake_quant_fp8(
    x: torch.Tensor,
    fmt: str = "fp8_e4m3",
    *,
    granularity: str = "none",
    group_size: int | None = None,
    axis: int = -1,
) -> torch.Tensor:
    """fp8 round trip; ``granularity="none"`` is the saturating cast, anything else first scales each
    group so its absmax maps to the format's largest finite value. fp32 result."""
    import torch
    fmt = parse_format(fmt)
    if fmt not in FP8_FORMATS:
        raise LLMProbeError(f"{fmt!r} is not an fp8 format; use fp8_e4m3 or fp8_e5m2")
    if granularity not in FP8_GRANULARITIES:
        raise LLMProbeError(
            f"unknown fp8 granularity {granularity!r}; accepted: {', '.join(FP8_GRANULARITIES)}"
        )
    x32 = _as_fp32(x)
    if granularity == "none":
        return _saturating_fp8_cast(x32, fmt)
    groups, restore = _grouped(x32, granularity, group_size, axis)
    if x32.numel() == 0:
        return x32.clone()
    scale = groups.abs().amax(dim=1, keepdim=True) / fp8_max(fmt)
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    dequant = _saturating_fp8_cast(groups / safe_scale, fmt) * safe_scale
    return restore(dequant)


def _round_to_e2m1(x32: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to even mantissa, |x| > 6 saturated to ±6; NaN stays NaN."""
    import torch
    levels = torch.tensor(_E2M1_LEVELS, dtype=torch.float32, device=x32.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    magnitude = x32.abs().clamp(max=E2M1_MAX)
    index = torch.bucketize(magnitude, midpoints)  # a tie lands on the lower level
    odd_lower = (torch.arange(len(_E2M1_LEVELS) - 1, device=x32.device) % 2) == 1
    at_tie = magnitude == midpoints[index.clamp(max=len(midpoints) - 1)]
    index = torch.where(at_tie & odd_lower[index.clamp(max=len(midpoints) - 1)], index + 1, index)
    rounded = torch.copysign(levels[index], x32)
    return torch.where(torch.isnan(x32), x32, rounded)


def fake_quant_fp4(
    x: torch.Tensor,
    *,
    granularity: str = "none",
    group_size: int | None = None,
    axis: int = -1,
) -> torch.Tensor:
    """FP4 E2M1 round trip; ``granularity="none"`` snaps to the grid as is (saturating), anything
    else first scales each group so its absmax maps to 6. fp32 result."""
    import torch
    if granularity not in FP8_GRANULARITIES:
        raise LLMProbeError(
            f"unknown fp4 granularity {granularity!r}; accepted: {', '.join(FP8_GRANULARITIES)}"
        )
    x32 = _as_fp32(x)
    if granularity == "none":
        return _round_to_e2m1(x32)
    groups, restore = _grouped(x32, granularity, group_size, axis)
    if x32.numel() == 0:
        return x32.clone()
    scale = groups.abs().amax(dim=1, keepdim=True) / E2M1_MAX
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return restore(_round_to_e2m1(groups / safe_scale) * safe_scale)


def quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    granularity: str = "per-channel",
    group_size: int | None = None,
    symmetric: bool = True,
    axis: int = -1,
) -> torch.Tensor:
    """The one entry point: put ``x`` through format ``fmt`` and return the de-quantized fp32 tensor
    (fp64 for ``"fp64"``).

    - ``fp64``/``fp32``: identity in that precision; ``fp16``/``bf16``: cast (granularity ignored).
    - ``fp8_*``: ``granularity="none"`` is the saturating cast, otherwise scaled fp8 with that
      granularity (so the default ``"per-channel"`` is scaled per output row).
    - ``int<N>``: :func:`fake_quant_int` with ``granularity``/``group_size``/``symmetric``/``axis``.
    - ``nf4``: :func:`fake_quant_nf4` with ``group_size`` as the block size (default 64);
      granularity and symmetric do not apply.
    - ``fp4_e2m1``: :func:`fake_quant_fp4`, scaled per ``granularity`` like fp8 (``"none"``: as is).
    ``group_size`` is read only by per-group granularity and nf4.
    """
    fmt = parse_format(fmt)
    if fmt in ("fp64", "fp32", "fp16", "bf16"):
        return cast_to(x, fmt)
    if fmt in FP8_FORMATS:
        return fake_quant_fp8(x, fmt, granularity=granularity, group_size=group_size, axis=axis)
    if fmt == "nf4":
        return fake_quant_nf4(x, NF4_BLOCK_SIZE if group_size is None else group_size)
    if fmt == "fp4_e2m1":
        return fake_quant_fp4(x, granularity=granularity, group_size=group_size, axis=axis)
    bits = _int_bits(fmt)
    return fake_quant_int(
        x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size, axis=axis
    )
