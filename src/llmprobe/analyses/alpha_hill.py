"""Alpha-Hill of every weight matrix across numeric precisions (seed 001, ``weights alpha-hill``).

For each selected 2-D weight ``W`` and each precision ``p``:

1. ``W`` is read once from the weight source and cast to ``load_dtype`` (the seed loaded the
   whole model in ``--load-dtype``; a bf16 load rounds every weight to bf16 before anything else).
2. ``W_p = quantize(W, p)`` (:mod:`llmprobe.core.quant`): a cast for fp64/fp32/fp16/bf16, scaled fp8
   (one absmax scale per output channel), symmetric per-output-channel integers for ``int<N>``,
   NF4 blocks of 64. Per-channel means per *output* row; for GPT-2 ``Conv1D`` weights (stored
   ``[in, out]``) the scale runs along the stored columns instead.
3. ``λ = σ(W_p)²`` (no normalization), from :mod:`llmprobe.core.spectral`. ``W_p`` holds values of
   format ``p`` (all exactly representable in fp32/fp64); the arithmetic of its spectrum is
   ``spectrum_dtype``:

   * ``fp64`` always for the ``fp64`` precision (fp64 means fp64 arithmetic, SPEC §5);
   * ``"auto"`` (default): **fp64 when the run compares two or more precisions** or fits a
     power law, fp32 for a single non-fp64 precision with the Hill fit. Differences between
     precisions are the point of a comparison, and they are small: on SmolLM2-135M fp16 moves
     alpha by 1.8e-5 (median, relative) while fp32 arithmetic adds ~1e-6 of noise (up to 7e-6),
     which makes the fp16-vs-fp32 difference wrong by 7 % at the median and by over 50 % for
     one matrix in ten (with sign flips); bf16 differences are off by 1 % / 10 %. A single
     alpha has a statistical error of order 1/sqrt(k) (~13 % for k = 57), so there fp32
     arithmetic is ample and about twice as fast. The power-law fit's KS scan reads the small
     end of the spectrum, which fp32 Gram eigenvalues do not resolve (the spectral guard would
     fall back to a slower fp32 SVD), hence fp64;
   * ``fp64`` / ``fp32``: forced for every precision (the seed computed each spectrum "in the
     precision"; ``fp32`` matches that and is the fast choice for huge models on GPUs with slow
     fp64). The ``fp64`` precision is still computed in fp64.

   For an fp32 load in fp64 arithmetic the ``fp32`` and ``fp64`` columns agree: storing an fp32
   weight in fp64 loses nothing. The ``method_<p>`` column names the arithmetic actually used.

   Method: eigenvalues of the smaller Gram matrix (``gram-fp64`` / ``gram-fp32``), matrices
   grouped by shape. The Gram route resolves the top of the spectrum, which is all Alpha-Hill
   and the norms read, to full precision. With ``fit="powerlaw"`` the KS scan reads the whole
   spectrum, so :mod:`llmprobe.core.spectral`'s guard recomputes a matrix with ``svdvals``
   (``svd-fp64``) when its smallest σ is below what the Gram route resolves.

4. Estimators (from the same λ): Alpha-Hill ``α = 1 + k / Σ_{i≤k} ln(λ_i/λ_{k+1})`` with
   ``k = max(10, ⌊k_frac·n⌋)`` capped at ``n−1``; with ``fit="powerlaw"`` the column ``alpha_<p>``
   holds the Clauset–Shalizi–Newman fit instead (``xmin``, ``D_ks``, ``sigma``; Hill kept as
   ``alpha_hill_<p>``) and ``k_used_<p>`` is the size of the fitted tail. For every precision:
   ``alpha_weighted = α·log10 λ_max``, ``log_spectral_norm = log10 λ_max``,
   ``log_norm = log10 Σλ``, ``stable_rank = Σλ/λ_max``.

Default selection (no regex): every 2-D weight inside the decoder blocks — the linear modules
the seed's per-layer analysis is about (attention and MLP projections). Token embeddings and the
output head are left out by default: they are vocabulary-sized tables, not "layers" one assigns
a precision to, and a tied head would count the same matrix twice. A regex selects any 2-D
weight by name instead (``embed_tokens|lm_head`` brings them in).

Memory: matrices are grouped by shape and processed a chunk at a time (chunks budgeted in bytes),
so no more than one chunk of same-shape matrices (plus its quantized copy) is held at once.

A weight with NaN/Inf (after the load cast) gets NaN everywhere and ``status = "non_finite"``;
the run goes on. ``status = "nan_alpha"`` flags a finite weight where some precision's alpha is
NaN (overflow in the cast, rank-deficient tail); ``note`` says which and why.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..core import distributed
from ..core.devices import DTYPE_NAMES, on_cpu_without_torch, resolve_device, torch_dtype, usable_cores
from ..core.errors import LLMProbeError
from ..core.modulemap import ROLES
from ..core.progress import track
from ..core.quant import ARRAY_FORMATS, FORMATS, cast_array, parse_format, quantize
from ..core.records import Record
from ..core.spectral import (
    NON_FINITE_METHOD,
    all_finite,
    alpha_hill,
    alpha_weighted,
    array_singular_values,
    log_norm,
    log_spectral_norm,
    powerlaw_fit,
    singular_values_batched,
    stable_rank,
)
from ..core.weightsource import WeightSource, compile_regex, no_match_error

if TYPE_CHECKING:  # torch is imported only on the paths that need it (see _reads_arrays)
    import torch

logger = logging.getLogger(__name__)

DEFAULT_PRECISIONS = ("fp32", "fp16", "bf16")
FITS = ("hill", "powerlaw")
LOAD_DTYPES = DTYPE_NAMES
SPECTRUM_DTYPES = ("fp64", "fp32")
SPECTRUM_DTYPE_CHOICES = ("auto", *SPECTRUM_DTYPES)
# Roles whose weights are not decoder-block matrices; left out unless a regex names them.
_NOT_BLOCK_MATRICES = {"embed", "lm_head", "norm"}
# Per chunk of same-shape matrices: loaded weights + quantized copies + stack + Gram.
DEFAULT_CHUNK_BYTES = 512 << 20
_PRECISION_ACCEPTED = "fp64, fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int2 … int16 (e.g. int8, int4), nf4"

# Seed-001 per-precision columns, which lead the table right after the five per-layer columns.
SEED_PRECISION_FIELDS = ("alpha", "k_used", "n_eigs", "method")
_SEED_COLUMN = re.compile(
    r"^(?:{})_(?:{})$".format("|".join(SEED_PRECISION_FIELDS), "|".join(re.escape(f) for f in FORMATS)))
SEED_LEADING_COLUMNS = ("layer_name", "category", "out_features", "in_features", "numel")

STATUS_OK = "ok"
STATUS_NON_FINITE = "non_finite"
STATUS_NAN_ALPHA = "nan_alpha"


class PrecisionAlphaHill(Record):
    """One weight matrix: its alpha (and spectral norms) at each precision.

    Per precision ``p`` (extra columns, in ``--precisions`` order): ``alpha_<p>``, ``k_used_<p>``,
    ``n_eigs_<p>``, ``method_<p>`` (seed 001), then ``alpha_weighted_<p>``,
    ``log_spectral_norm_<p>``, ``log_norm_<p>``, ``stable_rank_<p>`` and, with the power-law fit,
    ``alpha_hill_<p>``, ``xmin_<p>``, ``D_ks_<p>``, ``sigma_<p>``.
    """

    table = "precision_alpha_hill_results"

    layer_name: str
    category: str
    out_features: int
    in_features: int
    numel: int
    layer_index: int | None
    role: str
    stored_dtype: str
    status: str
    note: str = ""

    def row(self) -> dict:
        # Seed-001 column order: the five per-layer columns, then alpha/k_used/n_eigs/method for
        # every precision, then everything llmprobe adds; scripts written for the seed's CSV
        # keep working, by name or by position.
        data = self.model_dump(mode="json")
        lead = {name: data.pop(name) for name in SEED_LEADING_COLUMNS}
        seed = {name: data.pop(name) for name in list(data) if _SEED_COLUMN.match(name)}
        return {**lead, **seed, **data}


class PrecisionSummaryStatistics(Record):
    """Alpha over all analysed matrices at one precision; ``count`` = matrices with a finite alpha,
    ``std`` with ddof=1 (pandas), quartiles by linear interpolation."""

    table = "precision_summary_statistics"

    precision: str
    count: int
    mean: float
    std: float
    min: float
    median: float
    max: float
    q25: float
    q75: float


@dataclass(frozen=True)
class MatrixPlan:
    """One selected weight: where it sits in the model and how to quantize it per channel."""

    name: str
    shape: tuple[int, int]
    layer_index: int | None
    role: str
    category: str
    out_features: int
    in_features: int
    # Reduction axis of per-channel quantization in the *stored* tensor (one scale per output
    # channel): -1 for [out, in] weights, 0 for Conv1D's [in, out].
    channel_axis: int


# --------------------------------------------------------------------------- option checks


def parse_precisions(precisions: str | Sequence[str]) -> list[str]:
    """Canonical precision names in the order given, duplicates dropped; one clear error otherwise."""
    items = precisions.split(",") if isinstance(precisions, str) else list(precisions)
    names = [str(item).strip() for item in items if str(item).strip()]
    if not names:
        raise LLMProbeError(f"no precisions given; accepted: {_PRECISION_ACCEPTED}")
    canonical: list[str] = []
    for name in names:
        try:
            fmt = parse_format(name)
        except LLMProbeError:
            raise LLMProbeError(f"unknown precision '{name}'; accepted: {_PRECISION_ACCEPTED}") from None
        if fmt not in canonical:
            canonical.append(fmt)
    return canonical


def check_k_frac(k_frac: float) -> float:
    if isinstance(k_frac, bool) or not isinstance(k_frac, (int, float)) or not 0.0 < k_frac < 1.0:
        raise LLMProbeError(f"--k-frac must be strictly between 0 and 1 (exclusive); got {k_frac}")
    return float(k_frac)


def check_fit(fit: str) -> str:
    if fit not in FITS:
        raise LLMProbeError(f"unknown --fit '{fit}'; use one of {', '.join(FITS)}")
    return fit


def check_spectrum_dtype(spectrum_dtype: str) -> str:
    if spectrum_dtype not in SPECTRUM_DTYPE_CHOICES:
        raise LLMProbeError(
            f"unknown --spectrum-dtype '{spectrum_dtype}'; use one of {', '.join(SPECTRUM_DTYPE_CHOICES)}")
    return spectrum_dtype


def check_load_dtype(load_dtype: str) -> str:
    if load_dtype not in LOAD_DTYPES:
        raise LLMProbeError(f"unknown --load-dtype '{load_dtype}'; use one of {', '.join(LOAD_DTYPES)}")
    return load_dtype


# --------------------------------------------------------------------------- selection


def category_of(role: str) -> str:
    """Seed-001 category from the canonical role: ``attn.q`` -> ``attn_q``, ``embed`` -> ``embed``."""
    return role.replace(".", "_")


def _natural_key(name: str) -> tuple:
    # layers.2 before layers.10 when a weight's position in the model is unknown
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def select_matrices(ws: WeightSource, regex: str | None = None) -> list[MatrixPlan]:
    """The matrices to analyse, in model order (module-map order; by name where unknown).

    ``regex`` (re.search on the weight name) picks any 2-D weight; without it, every 2-D weight
    inside the decoder blocks (module docstring). Raises LLMProbeError for a bad regex or an
    empty selection (listing some existing names).
    """
    compile_regex(regex)  # bad regex -> one-line error before any work
    two_d = ws.select(None, min_dim=2, max_dim=2)
    places = ws.weight_places(two_d)
    role_rank = {role: rank for rank, role in enumerate(ROLES)}

    if regex:
        names = ws.select(regex, min_dim=2, max_dim=2)
        if not names:
            raise no_match_error(regex, two_d or ws.names(), what="2-D weight")
    else:
        names = [name for name in two_d
                 if places[name].layer is not None and places[name].role not in _NOT_BLOCK_MATRICES]
        if not names:
            sample = ", ".join(two_d[:6]) or "none"
            raise LLMProbeError(
                f"found no 2-D weight inside decoder blocks; pick weights with --filter-layers (2-D weights: {sample})")

    plans = []
    for name in names:
        place = places[name]
        shape = tuple(int(d) for d in ws.shape(name))
        if place.linear is not None:
            out_features, in_features, transposed = place.linear
            channel_axis = 0 if transposed else -1
        else:  # embeddings and other non-linear matrices: rows are the output channels
            out_features, in_features = shape
            channel_axis = -1
        plans.append(MatrixPlan(name, shape, place.layer, place.role, category_of(place.role), out_features,
                                in_features, channel_axis))

    def model_order(plan: MatrixPlan):
        position = places[plan.name].position
        if position is not None:
            return (0, position, ())
        return (1, plan.layer_index if plan.layer_index is not None else -1,
                (role_rank.get(plan.role, len(role_rank)),) + _natural_key(plan.name))

    return sorted(plans, key=model_order)


# Matrices per chunk on the CPU: each finished chunk's rows can go to the figure workers early.
CPU_CHUNK_MATRICES = 10


def _chunks(plans: list[MatrixPlan], chunk_bytes: int, device=None) -> list[list[MatrixPlan]]:
    """Chunks of matrices decomposed together, each within ``chunk_bytes`` of fp64 copies.

    On a GPU, same-shape groups in first-seen order (they are stacked into batched calls). On
    the CPU, where LAPACK takes one matrix at a time anyway, runs of at most
    :data:`CPU_CHUNK_MATRICES` consecutive matrices in model order: rows then finish in model
    order, so figures of the first matrices can be drawn while the later ones are computed."""
    if device is not None and _on_cpu(device):
        chunks, chunk, size = [], [], 0
        for plan in plans:
            cost = _chunk_cost(plan.shape)
            if chunk and (len(chunk) == CPU_CHUNK_MATRICES or size + cost > chunk_bytes):
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(plan)
            size += cost
        return chunks + ([chunk] if chunk else [])
    by_shape: dict[tuple[int, int, int], list[MatrixPlan]] = {}
    for plan in plans:
        by_shape.setdefault((*plan.shape, plan.channel_axis), []).append(plan)
    chunks = []
    for (rows, cols, _), group in by_shape.items():
        size = max(1, chunk_bytes // max(_chunk_cost((rows, cols)), 1))
        chunks.extend(group[start:start + size] for start in range(0, len(group), size))
    return chunks


def _chunk_cost(shape) -> int:
    # fp64 copies are the widest thing a chunk holds: weight + quantized copy + stack + Gram.
    rows, cols = shape
    return (3 * rows * cols + min(rows, cols) ** 2) * 8


# --------------------------------------------------------------------------- the analysis


def spectrum_arithmetic(precision: str, spectrum_dtype: str, precisions: Sequence[str], fit: str = "hill") -> str:
    """The arithmetic ("fp64"/"fp32") of one precision's spectrum (module docstring, step 3)."""
    if precision == "fp64":
        return "fp64"
    if spectrum_dtype == "auto":
        return "fp64" if len(precisions) > 1 or fit == "powerlaw" else "fp32"
    return spectrum_dtype


def _method_label(method_used: str, dtype_label: str) -> str:
    if method_used == NON_FINITE_METHOD:
        return method_used
    base, plus, fallback = method_used.partition("+")  # "gram+cpu" after a CUDA OOM fallback
    return f"{base}-{dtype_label}{plus}{fallback}"


def _estimates(lam: np.ndarray, k_frac: float, fit: str) -> tuple[dict, str | None]:
    """Every per-precision number from one descending λ; returns (columns without suffix, NaN reason)."""
    hill = alpha_hill(lam, k_frac)
    values = {}
    if fit == "powerlaw":
        law = powerlaw_fit(lam)
        alpha, k_used, reason = law.alpha, law.n_tail, law.reason
        extra = {"alpha_hill": hill.alpha, "xmin": law.xmin, "D_ks": law.D_ks, "sigma": law.sigma}
    else:
        alpha, k_used, reason = hill.alpha, hill.k_used, hill.reason
        extra = {}
    lam_max = float(lam[0]) if lam.size else math.nan
    values.update(alpha=alpha, k_used=int(k_used))
    values.update(extra)
    values.update(
        alpha_weighted=alpha_weighted(alpha, lam_max) if math.isfinite(alpha) else math.nan,
        log_spectral_norm=log_spectral_norm(lam),
        log_norm=log_norm(lam),
        stable_rank=stable_rank(lam),
    )
    return values, reason


def _nan_estimates(fit: str) -> dict:
    values = {"alpha": math.nan, "k_used": 0}
    if fit == "powerlaw":
        values.update(alpha_hill=math.nan, xmin=math.nan, D_ks=math.nan, sigma=math.nan)
    values.update(alpha_weighted=math.nan, log_spectral_norm=math.nan, log_norm=math.nan, stable_rank=math.nan)
    return values


def _process_chunk(ws, chunk, precisions, k_frac, fit, device, load_dtype, spectrum_dtype,
                   arrays: bool = False) -> list[PrecisionAlphaHill]:
    # Read each weight once; the load cast happens on the target device. ``arrays``: the
    # torch-free CPU path (_reads_arrays), the same numbers from numpy arrays.
    if arrays:
        weights = [ws.array(plan.name).astype(np.float32, copy=False) for plan in chunk]
    else:
        weights = [ws.get(plan.name).to(device).to(torch_dtype(load_dtype)) for plan in chunk]
    finite = [all_finite(weight) for weight in weights]
    per_matrix: list[dict[str, dict]] = [{} for _ in chunk]
    reasons: list[list[str]] = [[] for _ in chunk]
    live = [index for index, ok in enumerate(finite) if ok]

    for precision in precisions:
        dtype_label = spectrum_arithmetic(precision, spectrum_dtype, precisions, fit)
        if arrays:  # Hill only (_reads_arrays): the Gram route, as "auto" takes without need_small
            converted = [cast_array(weights[i], precision) for i in live]
            spectra = array_singular_values(converted, dtype=dtype_label)
        else:
            converted = [quantize(weights[i], precision, granularity="per-channel", axis=chunk[i].channel_axis)
                         for i in live]
            # Hill and the norms read only the top of the spectrum (Gram is exact there); the
            # power-law KS scan reads all of it, so let the guard switch to svdvals when needed.
            spectra = singular_values_batched(converted, dtype=dtype_label, device=device, method="auto",
                                              need_small=fit == "powerlaw") if live else []
        del converted
        for index, (sigma, method_used) in zip(live, spectra):
            lam = (sigma if arrays else sigma.numpy()) ** 2
            values, reason = _estimates(lam, k_frac, fit)
            values["n_eigs"] = int(lam.size)
            values["method"] = _method_label(method_used, dtype_label)
            if method_used == NON_FINITE_METHOD:
                reason = "non-finite values after conversion (overflow)"
            if reason is not None:
                reasons[index].append(f"{precision}: {reason}")
            per_matrix[index][precision] = values
        for index, ok in enumerate(finite):
            if not ok:
                values = _nan_estimates(fit)
                values.update(n_eigs=min(chunk[index].shape), method=NON_FINITE_METHOD)
                per_matrix[index][precision] = values

    rows = []
    for index, plan in enumerate(chunk):
        if not finite[index]:
            weight = weights[index] if arrays else weights[index].cpu().numpy()
            nans, infs = int(np.isnan(weight).sum()), int(np.isinf(weight).sum())
            status, note = STATUS_NON_FINITE, f"weight has {nans} NaN and {infs} Inf values"
        elif reasons[index]:
            status, note = STATUS_NAN_ALPHA, "; ".join(reasons[index])
        else:
            status, note = STATUS_OK, ""
        columns = {}
        # seed columns first for every precision, then the added ones (PrecisionAlphaHill.row)
        for precision in precisions:
            values = per_matrix[index][precision]
            for field in SEED_PRECISION_FIELDS:
                columns[f"{field}_{precision}"] = values[field]
        for precision in precisions:
            for field, value in per_matrix[index][precision].items():
                if field not in SEED_PRECISION_FIELDS:
                    columns[f"{field}_{precision}"] = value
        rows.append(PrecisionAlphaHill(
            layer_name=plan.name, category=plan.category, out_features=plan.out_features,
            in_features=plan.in_features, numel=plan.shape[0] * plan.shape[1], layer_index=plan.layer_index,
            role=plan.role, stored_dtype=ws.stored_dtype(plan.name), status=status, note=note, **columns))
        logger.debug("%s %s: %s", plan.name, plan.shape,
                     ", ".join(f"{p}={per_matrix[index][p]['alpha']:.4f}" for p in precisions))
    return rows


def summarize_precisions(rows: Sequence[PrecisionAlphaHill], precisions: Sequence[str]) -> list[PrecisionSummaryStatistics]:
    """Distribution of ``alpha_<p>`` over the rows, per precision (finite values only)."""
    summary = []
    for precision in precisions:
        values = np.array([getattr(row, f"alpha_{precision}") for row in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        count = int(values.size)
        if count == 0:
            stats = dict.fromkeys(("mean", "std", "min", "median", "max", "q25", "q75"), math.nan)
        else:
            stats = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if count > 1 else math.nan,
                "min": float(values.min()),
                "median": float(np.median(values)),
                "max": float(values.max()),
                "q25": float(np.percentile(values, 25)),
                "q75": float(np.percentile(values, 75)),
            }
        summary.append(PrecisionSummaryStatistics(precision=precision, count=count, **stats))
    return summary


def _reads_arrays(ws: WeightSource, plans: Sequence[MatrixPlan], device, load_dtype: str,
                  precisions: Sequence[str], fit: str) -> bool:
    """Whether this run takes the torch-free path: numpy arrays, numpy casts and the same LAPACK
    calls (bit-identical numbers, tests/test_alpha_hill.py), so that a CPU run does not import
    torch (~2-3 s of a ~10 s command). It needs the CPU without asking torch, an fp32 load of
    tensors numpy can read (fp32/fp16/fp64 safetensors), float formats numpy rounds as torch does
    (fp64, fp32, fp16), the Hill fit (the power-law fit's guard may switch to ``svdvals``) and a
    single process (torchrun shards through torch.distributed)."""
    return (on_cpu_without_torch(device) and load_dtype == "fp32" and fit == "hill"
            and all(precision in ARRAY_FORMATS for precision in precisions)
            and not distributed.is_distributed()
            and all(ws.readable_as_array(plan.name) for plan in plans))


# Matrices from which a second process shares the spectra (below, its start-up costs more).
HELPER_MIN_MATRICES = 40


def _spectra_helper(arrays: bool, plans: Sequence[MatrixPlan], ws: WeightSource):
    """A context giving a :class:`~llmprobe.core.helper.Helper` that shares the chunks of the
    torch-free CPU path, or None. LAPACK runs each small eigenvalue problem on one BLAS thread (above
    :data:`~llmprobe.core.spectral.SINGLE_THREAD_MAX_SIDE` BLAS threads share the cores) and
    holds the GIL, so for small matrices only a second process puts a second core to work (on
    the 2-core VM it also takes the time the figure workers leave idle while they wait for
    rows). Not for large matrices, small selections, torchrun, one core, or with
    ``LLMPROBE_SPECTRA_HELPER=0``."""
    import contextlib

    from ..core.spectral import SINGLE_THREAD_MAX_SIDE

    if (not arrays or len(plans) < HELPER_MIN_MATRICES or distributed.is_distributed()
            or any(min(plan.shape) > SINGLE_THREAD_MAX_SIDE for plan in plans)
            or os.environ.get("LLMPROBE_SPECTRA_HELPER", "1") == "0" or usable_cores() < 2):
        return contextlib.nullcontext()
    from ..core.helper import Helper, HelperGone

    try:
        return Helper(f"{__name__}:_process_chunk", ws)
    except (OSError, HelperGone) as exc:  # no interpreter to start: the spectra run here alone
        logger.warning("no spectra helper process (%s): the spectra run in this process", exc)
        return contextlib.nullcontext()


def _share_chunks(chunks: list, helper, compute: Callable, arguments: Callable) -> Iterator[list]:
    """The rows of every chunk, as each is done: computed here, or by ``helper`` (if any), which
    is kept two chunks ahead while this process takes the next chunk in model order itself, so
    neither waits for the other. Rows come out of model order (the callers place them). Should
    the helper process die, the chunks it held are computed here and the run goes on; an error
    of the computation itself is raised as it would be here."""
    from ..core.helper import HelperGone

    upcoming = iter(chunks)
    handed: dict[int, object] = {}  # ticket -> the chunk the helper holds
    orphans: list = []  # chunks of a helper that died, computed here next

    def lose_helper(reason: Exception) -> None:
        nonlocal helper
        logger.warning("%s: its chunks are computed in this process", reason)
        orphans.extend(handed[ticket] for ticket in sorted(handed))
        handed.clear()
        helper = None

    def feed() -> None:
        while helper is not None and len(handed) < 2:
            chunk = next(upcoming, None)
            if chunk is None:
                return
            try:
                handed[helper.submit(*arguments(chunk))] = chunk
            except HelperGone as gone:
                orphans.append(chunk)
                lose_helper(gone)

    feed()
    while True:
        try:
            for ticket in helper.answered() if helper is not None else ():
                rows = helper.result(ticket)
                del handed[ticket]
                yield rows
                feed()
        except HelperGone as gone:
            lose_helper(gone)
        chunk = orphans.pop(0) if orphans else next(upcoming, None)
        if chunk is not None:
            yield compute(chunk)
            feed()
        elif handed:
            ticket = min(handed)
            try:
                rows = helper.result(ticket)
            except HelperGone as gone:
                lose_helper(gone)
                continue
            del handed[ticket]
            yield rows
        else:
            return


def _on_cpu(device) -> bool:
    return getattr(device, "type", str(device).partition(":")[0]) == "cpu"


def _as_weight_source(source) -> WeightSource:
    if isinstance(source, WeightSource):
        return source
    torch = sys.modules.get("torch")  # an nn.Module implies torch is imported
    if torch is not None and isinstance(source, torch.nn.Module):
        return WeightSource.from_model(source)
    return WeightSource.open(source)


def alpha_hill_analysis(
    ws,
    precisions: str | Sequence[str] = DEFAULT_PRECISIONS,
    k_frac: float = 0.1,
    regex: str | None = None,
    device: str | torch.device = "cpu",
    load_dtype: str = "fp32",
    fit: str = "hill",
    *,
    spectrum_dtype: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_rows: Callable[[list[PrecisionAlphaHill]], None] | None = None,
) -> tuple[list[PrecisionAlphaHill], list[PrecisionSummaryStatistics]]:
    """Alpha of every selected weight matrix at every precision, and its distribution per precision.

    ``ws``: a :class:`WeightSource`, an ``nn.Module``, or anything :meth:`WeightSource.open`
    takes (a model id/path, None for the embedded model). Returns ``(rows, summary)``; the
    semantics of every column are in the module docstring. ``on_rows`` is called with the rows
    of each finished chunk as they come (on the CPU in model order, except that chunks shared
    with the helper process may arrive a little ahead or behind).
    """
    precisions = parse_precisions(precisions)
    k_frac = check_k_frac(k_frac)
    fit = check_fit(fit)
    load_dtype = check_load_dtype(load_dtype)
    spectrum_dtype = check_spectrum_dtype(spectrum_dtype)
    ws = _as_weight_source(ws)
    plans = select_matrices(ws, regex)
    arrays = _reads_arrays(ws, plans, device, load_dtype, precisions, fit)
    target = "cpu" if arrays else resolve_device(device)
    chunks = _chunks(plans, chunk_bytes, target)
    logger.info("alpha-hill: %d matrices in %d chunks; precisions %s; fit %s; k_frac %g; spectra in %s on %s",
                len(plans), len(chunks), ",".join(precisions), fit, k_frac,
                ",".join(f"{p}:{spectrum_arithmetic(p, spectrum_dtype, precisions, fit)}" for p in precisions),
                target)

    def rows_of(part: list[MatrixPlan]) -> list[PrecisionAlphaHill]:
        def rows_as_done() -> Iterator[PrecisionAlphaHill]:
            work = (precisions, k_frac, fit, target, load_dtype, spectrum_dtype, arrays)
            chunks = _chunks(part, chunk_bytes, target)
            with _spectra_helper(arrays, part, ws) as helper:
                for chunk_rows in _share_chunks(chunks, helper, lambda chunk: _process_chunk(ws, chunk, *work),
                                                lambda chunk: (chunk, *work)):
                    if on_rows is not None:
                        on_rows(chunk_rows)
                    yield from chunk_rows

        done = list(track(rows_as_done(), "alpha-hill", total=len(part)))
        # on a GPU chunks run shape by shape; report in model order
        position = {plan.name: index for index, plan in enumerate(part)}
        return sorted(done, key=lambda row: position[row.layer_name])

    # Under torchrun each rank takes its share of the matrices, balanced by m·n·min(m, n);
    # every rank gets all rows back in model order.
    rows = distributed.map_shards(plans, rows_of, costs=[distributed.matrix_cost(plan.shape) for plan in plans])
    return rows, summarize_precisions(rows, precisions)


# -- registered analysis (declared in llmprobe.catalog.weights) -------------------------------

RESULTS_TABLE = "precision_alpha_hill_results"
SUMMARY_TABLE = "precision_summary_statistics"


def prepare_job(job):
    o = job.options
    # "cpu" as text where that is certain without torch; alpha_hill_analysis resolves the rest
    job.state["device"] = "cpu" if on_cpu_without_torch(o.device) else resolve_device(o.device)
    job.state["plans"] = select_matrices(job.weights, o.filter)  # an empty selection fails here


def alpha_hill_job(job):
    from ..plots.alpha_hill import FigureStreamer
    from ..session import Result

    o = job.options
    chosen = parse_precisions(o.precisions)
    # The combined-batch figures of the first matrices are drawn while the rest are computed.
    streamer = FigureStreamer(job.state["plans"], chosen, o)
    rows, summary = alpha_hill_analysis(job.weights, chosen, k_frac=o.k_frac, regex=o.filter,
                                        device=job.state["device"], load_dtype=o.load_dtype, fit=o.fit,
                                        spectrum_dtype=o.spectrum_dtype,
                                        on_rows=lambda done: job.draw_early(streamer.ready(done)))
    flagged = {status: sum(row.status == status for row in rows) for status in ("non_finite", "nan_alpha")}
    result = Result(tables={RESULTS_TABLE: rows, SUMMARY_TABLE: summary},
                    manifest={"precisions": chosen, "device": str(job.state["device"]),
                              "matrices": len(job.state["plans"]), "weight_source": job.weights.kind,
                              "flagged_matrices": {k: v for k, v in flagged.items() if v}})
    if flagged["non_finite"]:
        result.notes.append(f"[yellow]{flagged['non_finite']} matrices hold NaN/Inf: status non_finite, alphas NaN[/]")
    return result
