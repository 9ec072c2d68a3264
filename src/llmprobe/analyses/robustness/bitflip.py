"""``robustness bit-flip``: flip one bit of one stored weight at a time and read out Δloss.

The flip happens in the weight's stored dtype (fp32: 1 sign, 8 exponent, 23 mantissa bits;
fp16: 1/5/10; bf16: 1/8/7; bit 0 is the least significant mantissa bit) through
``core.interventions`` (op ``flip_bit``, an XOR on the integer view), and is undone bit for bit
after each target. Loss is the shifted next-token loss of ``core.readouts`` on the evaluation
windows.

Targets are either given as ``(module, row, col)`` coordinates of the [out, in] matrix, or
drawn at random: for every requested bit position, ``count`` weights drawn from the chosen
matrices (a matrix with probability proportional to its size, then a uniform entry), all from
one ``torch.Generator().manual_seed(seed)``. Flipping every bit position of the dtype this way
gives the Δloss distribution per bit position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ...core.errors import LLMProbeError
from ...core.interventions import BIT_LAYOUT, Patch, bit_role, patched_weights
from ...core.loading import LoadedModel
from ...core.records import Record
from ...core.reference import Reference
from .common import Tables, check_positive, make_reference, model_name, select_sites
from .readout import ReadoutColumns


class BitFlip(ReadoutColumns):
    """One flipped bit of one weight."""

    target: str
    layer: int | None
    role: str
    weight_row: int             # output channel (row of the [out, in] matrix)
    weight_col: int             # input channel (column of the [out, in] matrix)
    bit: int                    # 0 = least significant
    bit_role: str               # sign / exponent / mantissa
    dtype: str
    value_before: float
    value_after: float          # may be inf or NaN (an exponent flip); kept as is


class BitPosition(Record):
    """Δloss over the flips of one bit position. Quantiles are over the flips with a finite
    Δloss; ``nonfinite`` counts the others (their values are in the per-flip table)."""

    bit: int
    bit_role: str
    dtype: str
    flips: int
    nonfinite: int
    delta_loss_min: float
    delta_loss_q25: float
    delta_loss_median: float
    delta_loss_q75: float
    delta_loss_max: float
    delta_loss_mean: float
    kl_median: float
    top1_agreement_median: float


def dtype_bits(dtype: torch.dtype) -> int:
    if dtype not in BIT_LAYOUT:
        raise LLMProbeError(f"cannot flip bits of weights stored as {str(dtype).replace('torch.', '')}")
    exponent, mantissa = BIT_LAYOUT[dtype]
    return 1 + exponent + mantissa


def check_bits(bits: Sequence[int] | None, dtype: torch.dtype) -> list[int]:
    width = dtype_bits(dtype)
    if bits is None or len(bits) == 0:
        return list(range(width))
    for bit in bits:
        if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit < width:
            raise LLMProbeError(f"--bits value {bit!r} is outside {str(dtype).replace('torch.', '')} (bits 0-{width - 1})")
    return list(bits)


def _element(site, row: int, col: int) -> tuple[str, tuple[int, int]]:
    """Parameter name and index in the *stored* layout of element [row, col] of the [out, in] matrix."""
    return site.weight_name, ((col, row) if site.transposed else (row, col))


def parse_index(text: str) -> tuple[int, int]:
    """'ROW,COL' -> (row, col)."""
    parts = str(text).replace(" ", "").split(",")
    try:
        row, col = (int(p) for p in parts)
    except ValueError:
        raise LLMProbeError(f"--index must be ROW,COL (two integers); got '{text}'") from None
    return row, col


def random_coordinates(sites, count: int, generator: torch.Generator) -> list[tuple[object, int, int]]:
    sizes = torch.tensor([s.out_features * s.in_features for s in sites], dtype=torch.float64)
    chosen = []
    for _ in range(count):
        site = sites[int(torch.multinomial(sizes, 1, generator=generator))]
        flat = int(torch.randint(site.out_features * site.in_features, (1,), generator=generator))
        chosen.append((site, flat // site.in_features, flat % site.in_features))
    return chosen


def bit_flip(lm: LoadedModel, windows: Sequence[torch.Tensor], *, targets: Sequence[tuple[str, int, int]] = (),
             bits: Sequence[int] | None = None, count: int = 4, seed: int = 0, roles: Sequence[str] | None = None,
             layers: Sequence[int] | None = None, regex: str | None = None, dataset: str = "",
             prefix_cache: bool = True, reference: Reference | None = None) -> Tables:
    """Flip each bit in ``bits`` (default: every position of the dtype) of the given ``targets``
    [(module, row, col)], or of ``count`` random weights per bit position when none are given."""
    model = lm.model if isinstance(lm, LoadedModel) else lm
    check_positive(count, "--count")
    check_positive(seed, "--seed", 0)
    from ...core.modulemap import ModuleMap

    mmap = reference.mmap if reference is not None else ModuleMap(model)
    # validate everything before the (slow) reference run
    chosen: list[tuple[object, int, int, int]] = []
    if targets:
        for name, row, col in targets:
            site = mmap.site(name)
            if not (0 <= row < site.out_features and 0 <= col < site.in_features):
                raise LLMProbeError(f"--index {row},{col} is outside {site.name} "
                                    f"({site.out_features} rows x {site.in_features} columns)")
            dtype = site.module.weight.dtype
            chosen.extend((site, row, col, bit) for bit in check_bits(bits, dtype))
    else:
        sites = select_sites(mmap, roles, layers, regex)
        dtype = sites[0].module.weight.dtype
        generator = torch.Generator().manual_seed(seed)
        for bit in check_bits(bits, dtype):
            chosen.extend((site, row, col, bit) for site, row, col in random_coordinates(sites, count, generator))
    ref = reference or make_reference(model, windows, prefix_cache=prefix_cache)
    params = dict(model.named_parameters())
    patches, values = [], []
    for site, row, col, bit in chosen:
        name, index = _element(site, row, col)
        weight = params[name]
        bit_role(weight.dtype, bit)
        patch = Patch(name, "flip_bit", index, bit)
        before = float(weight.data[index])
        with patched_weights(model, [patch]):
            after = float(weight.data[index])
        patches.append(patch)
        values.append((before, after, weight.dtype))
    # flips in one block are read out together (Reference.evaluate_many)
    readouts = ref.evaluate_many([(lambda patch=patch: patched_weights(model, [patch]), site.layer)
                                  for patch, (site, _r, _c, _b) in zip(patches, chosen)],
                                 description="bit flips")
    flips: list[BitFlip] = []
    for (site, row, col, bit), (before, after, dtype), readout in zip(chosen, values, readouts):
        flips.append(BitFlip(target=site.name, layer=site.layer, role=site.role, weight_row=row, weight_col=col, bit=bit,
                             bit_role=bit_role(dtype, bit), dtype=str(dtype).replace("torch.", ""),
                             value_before=before, value_after=after, **readout.fields(ref)))
    return {"bit_flips": flips, "bit_positions": summarize_bits(flips),
            "reference": [ref.info(model_name(lm), dataset)]}


def summarize_bits(flips: Sequence[BitFlip]) -> list[BitPosition]:
    rows = []
    for bit in sorted({f.bit for f in flips}, reverse=True):
        group = [f for f in flips if f.bit == bit]
        finite = [f for f in group if math.isfinite(f.delta_loss)]
        values = np.array([f.delta_loss for f in finite], dtype=np.float64)

        def q(p, values=values):
            return float(np.quantile(values, p)) if values.size else math.nan

        rows.append(BitPosition(
            bit=bit, bit_role=group[0].bit_role, dtype=group[0].dtype, flips=len(group),
            nonfinite=len(group) - len(finite), delta_loss_min=q(0.0), delta_loss_q25=q(0.25),
            delta_loss_median=q(0.5), delta_loss_q75=q(0.75), delta_loss_max=q(1.0),
            delta_loss_mean=float(values.mean()) if values.size else math.nan,
            kl_median=float(np.median([f.kl for f in group])),
            top1_agreement_median=float(np.median([f.top1_agreement for f in group]))))
    return rows
