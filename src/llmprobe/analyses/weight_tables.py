"""Per-tensor weight tables: ``weights stats``, ``weights spectrum`` and ``weights bops``.

All three read a :class:`~llmprobe.core.weightsource.WeightSource`, so they never build the model:
tensors are loaded one at a time (stats) or in small same-shape batches (spectrum), and BOPs needs
only shapes. Layer index and role of every tensor come from the module map (structure, not name
splitting), so layer 0 is a layer and MLP matrices get their MLP roles.

``weight_stats``
    Per tensor (every tensor, 1-D norms and biases included), in fp64 whatever the stored dtype.
    NaN/Inf entries are counted and left out of every moment, min and max. Moments are two-pass
    (mean first, then central moments) over chunks of the flattened tensor, so a 28M-element
    embedding needs only a few MB of fp64 scratch beyond the tensor itself.

    * ``std``/``var``: population (ddof=0), like ``np.std``.
    * ``kurtosis``: excess (Fisher) kurtosis from population moments, ``m4 / m2² − 3`` —
      ``scipy.stats.kurtosis(x, fisher=True, bias=True)``. NaN when the finite values are all
      equal (m2 = 0) or there are none. Every row says so in ``kurtosis_estimator``.
    * ``sparsity``: fraction of *all* elements with ``|w| <= zero_tol`` (a NaN is not a zero).

``weight_spectrum``
    Per 2-D floating-point tensor: the singular values of the full matrix (never cropped) in fp64
    through :mod:`llmprobe.core.spectral` with ``need_small=True`` (the Gram path is kept only where its
    accuracy guard says the small singular values are resolved; otherwise svdvals). Ranks and
    norms all come from that one spectrum. Same-shape matrices go through the batched path.
    A matrix with NaN/Inf is not decomposed: its row has ``status="non_finite"``, NaN norms and
    empty ranks, and the run goes on.

``bops``
    Bit operations per token of every linear module: one multiply-accumulate of a ``b_w``-bit
    weight with a ``b_a``-bit activation counts ``b_w·b_a`` BOPs, so a linear with ``in`` inputs
    and ``out`` outputs costs ``in·out·b_w·b_a`` per token. With ``block_size`` B (block-scaled
    weights, one fp16 scale per B consecutive weights along the input dimension), each block's
    partial sum is multiplied by its fp16 scale once per token: ``out·ceil(in/B)`` extra
    multiplies of 16×16 bits, i.e. ``out·ceil(in/B)·256`` BOPs. The fp16 baseline is
    ``in·out·16·16``. Every linear counts once per token (dense models; an MoE model's experts
    would all be counted).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from ..core import progress, spectral
from ..core.errors import LLMProbeError
from ..core.modulemap import ModuleMap
from ..core.records import Record
from ..core.specs import KURTOSIS_ESTIMATOR  # noqa: E402  (m4/m2² − 3, population moments)
from ..core.weightsource import WeightSource, compile_regex, no_match_error

# Elements converted to fp64 at a time: 256K elements = 2 MB per temporary, small enough to stay
# in cache across the ~8 elementwise passes per chunk (measured 5-8x faster than 32 MB chunks).
STATS_CHUNK_ELEMENTS = 1 << 18
# Matrices stacked into one batched decomposition; kept modest because the batch is resident
# in memory on top of everything else (the point of a weight source is memory ~ one tensor).
SPECTRUM_BATCH_BYTES = 256 << 20
FP16_BITS = 16
SCALE_BITS = 16  # block scales are fp16
MAX_BITS = 32


# --------------------------------------------------------------------------------------------
# records


class WeightStats(Record):
    """Element statistics of one stored tensor."""

    name: str
    shape: str                # "AxB"
    ndim: int
    numel: int
    layer_index: int | None   # position in the decoder block list; None outside the blocks
    role: str                 # canonical role (attn.q, mlp.down, norm, embed, ...)
    block_type: str           # = role, under seed 003's column name
    dtype: str                # as stored in the checkpoint (F32, BF16, Q4_1, ...)
    mean: float
    std: float                # population (ddof=0)
    var: float                # population (ddof=0)
    min: float
    max: float
    abs_max: float
    sparsity: float           # fraction of all elements with |w| <= zero_tol
    zero_tol: float
    kurtosis: float           # excess (Fisher), population moments
    kurtosis_estimator: str
    finite_count: int
    nan_count: int
    inf_count: int


class WeightSpectrum(Record):
    """Ranks and norms of one 2-D matrix from its full singular-value spectrum.

    Besides the fields below every row carries ``svd_<E>_percent_rank`` and
    ``svd_<E>_percent_ratio`` (E = energy·100, e.g. ``svd_90_percent_rank``), seed 003's names
    for ``energy_rank`` and ``energy_rank_ratio``.
    """

    name: str
    layer_index: int | None
    role: str
    rows: int
    cols: int
    shape: str
    numel: int
    dtype: str
    design_rank: int                  # min(rows, cols)
    actual_rank: int | None           # numerical rank: #σ > rank_rtol·σ_max
    rank_ratio: float                 # actual_rank / design_rank
    rank_rtol: float
    energy: float
    energy_rank: int | None           # smallest r with Σ_{i<=r} σ_i² >= energy·Σσ²
    energy_rank_ratio: float          # energy_rank / design_rank
    stable_rank: float                # ‖W‖_F² / ‖W‖_2²
    effective_rank: float             # exp(entropy of σ/Σσ) (Roy & Vetterli)
    spectral_norm: float              # σ_max
    frobenius_norm: float             # sqrt(Σσ²)
    mean: float                       # over finite entries, population moments
    std: float
    var: float
    sparsity: float                   # fraction with |w| <= zero_tol
    method: str                       # gram | svd | non-finite (+cpu after a CUDA OOM)
    status: str                       # ok | non_finite
    # seed 003 columns
    model_path: str | None
    model_id: str | None
    revision: str | None
    param_name: str                   # = name
    block_type: str                   # = role
    created_at: str


# Seed 003's transformer_matrix_analysis.csv columns, in its order. "{E}" is the energy percent.
SEED_MATRIX_COLUMNS = (
    "model_path", "model_id", "revision", "param_name", "layer_index", "block_type", "shape", "rows",
    "cols", "design_rank", "actual_rank", "rank_ratio", "svd_{E}_percent_rank", "svd_{E}_percent_ratio",
    "mean", "std", "var", "sparsity", "dtype", "created_at",
)


class TransformerMatrixAnalysis(Record):
    """One row of ``transformer_matrix_analysis.csv``: seed 003's columns, in seed 003's order
    (the two ``svd_<E>_percent_*`` columns are per-run names and sit after ``rank_ratio``)."""

    model_path: str | None
    model_id: str | None
    revision: str | None
    param_name: str
    layer_index: int | None
    block_type: str
    shape: str
    rows: int
    cols: int
    design_rank: int
    actual_rank: int | None
    rank_ratio: float
    mean: float
    std: float
    var: float
    sparsity: float
    dtype: str
    created_at: str

    def row(self) -> dict:
        # pydantic puts extra fields last; move the energy-named ones to the seed's position.
        data = super().row()
        extras = {key: data.pop(key) for key in list(data) if key.startswith("svd_")}
        ordered = {}
        for key, value in data.items():
            ordered[key] = value
            if key == "rank_ratio":
                ordered.update(extras)
        return ordered


class BopsModule(Record):
    """Bit operations per token of one linear module."""

    name: str
    layer_index: int | None
    role: str
    in_features: int
    out_features: int
    macs: int                 # in·out multiply-accumulates per token
    w_bits: int
    a_bits: int
    block_size: int | None
    weight_bops: int          # macs·w_bits·a_bits
    scale_bops: int           # out·ceil(in/block_size)·16·16 (0 without block_size)
    bops: int                 # weight_bops + scale_bops
    baseline_fp16_bops: int   # macs·16·16
    ratio_to_fp16: float      # bops / baseline_fp16_bops
    bits_per_weight: float    # w_bits + 16/block_size: storage cost including the scales


class BopsSummary(Record):
    """BOPs per token summed over a layer, a role, or the whole model."""

    scope: str                # layer | role | model
    layer_index: int | None
    role: str | None
    modules: int
    macs: int
    weight_bops: int
    scale_bops: int
    bops: int
    baseline_fp16_bops: int
    ratio_to_fp16: float
    gbops: float              # bops / 1e9


# --------------------------------------------------------------------------------------------
# shared helpers


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


_INTEGER_DTYPE = re.compile(r"^(u?int\d+|[iu]\d+|bool)$", re.IGNORECASE)


def is_floating_dtype(stored_dtype: str) -> bool:
    """True for float storage (F32, BF16, float16, F8_E4M3, GGUF quant types such as Q4_1 or
    IQ2_XXS, which dequantize to floats); False for integer/bool buffers (position ids)."""
    return not _INTEGER_DTYPE.match(stored_dtype.strip().removeprefix("torch."))


def select_tensors(ws: WeightSource, regex: str | None = None, *, min_dim: int = 1,
                   max_dim: int | None = None, floating_only: bool = False,
                   what: str = "tensor") -> list[str]:
    """Names matching ``regex`` (re.search) and the dimension bounds; an error naming some of the
    checkpoint's tensors when nothing matches (a typo in --filter should not pass silently)."""
    compile_regex(regex)  # a bad regex fails here with its own message
    names = ws.select(regex, min_dim=min_dim, max_dim=max_dim)
    if floating_only:
        names = [name for name in names if is_floating_dtype(ws.stored_dtype(name))]
    if not names:
        candidates = ws.select(None, min_dim=min_dim, max_dim=max_dim)
        if floating_only:
            candidates = [name for name in candidates if is_floating_dtype(ws.stored_dtype(name))]
        raise no_match_error(regex, candidates or ws.names(), what)
    return names


def _model_positions(ws: WeightSource) -> tuple[ModuleMap, dict[str, int]]:
    """Position of every parameter/buffer in the model's own order (named_parameters, then
    buffers), so rows list q, k, v, o, gate, up, down, norms as the model defines them rather
    than alphabetically as checkpoints store them."""
    module_map = ws.module_map
    model = module_map.model
    positions: dict[str, int] = {}
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for position, (name, _) in enumerate(named):
        positions.setdefault(name, position)
    return module_map, positions


def _position_of(name: str, positions: dict[str, int], prefix: str) -> int | None:
    # Checkpoints saved from a base model lack the head model's prefix, and vice versa.
    for spelling in (name, f"{prefix}.{name}" if prefix else None,
                     name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
        if spelling is not None and spelling in positions:
            return positions[spelling]
    return None


def order_rows(ws: WeightSource, names: Iterable[str]) -> list[tuple[str, int | None, str]]:
    """``(name, layer, role)`` sorted by layer, then model order; tensors outside the decoder
    blocks (embeddings, final norm, head) last, as seed 003 sorts its CSV."""
    module_map, positions = _model_positions(ws)
    prefix = getattr(module_map.model, "base_model_prefix", "") or ""
    keyed = []
    for source_position, name in enumerate(names):
        layer, role = module_map.param_info(name)
        position = _position_of(name, positions, prefix)
        # names the model does not know keep checkpoint order, after the known ones
        model_position = position if position is not None else len(positions) + source_position
        keyed.append(((layer is None, layer if layer is not None else 0, model_position), (name, layer, role)))
    keyed.sort(key=lambda item: item[0])
    return [entry for _, entry in keyed]


# --------------------------------------------------------------------------------------------
# element statistics


@dataclass(frozen=True)
class TensorMoments:
    numel: int
    finite_count: int
    nan_count: int
    inf_count: int
    zero_count: int
    mean: float
    var: float
    min: float
    max: float
    kurtosis: float

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if math.isfinite(self.var) else math.nan

    @property
    def abs_max(self) -> float:
        if self.finite_count == 0:
            return math.nan
        return max(abs(self.min), abs(self.max))

    @property
    def sparsity(self) -> float:
        return self.zero_count / self.numel if self.numel else math.nan


def _finite_part(values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(finite entries, NaN count, Inf count); the common all-finite case costs one isfinite."""
    mask = torch.isfinite(values)
    kept = int(mask.sum())
    if kept == values.numel():
        return values, 0, 0
    nans = int(torch.isnan(values).sum())
    return values[mask], nans, values.numel() - kept - nans


@contextlib.contextmanager
def _one_intra_op_thread():
    """Chunked statistics are memory-bound elementwise passes over 2 MB chunks: one thread runs
    them at full speed, while fanning every small op out to several threads pays a fork/join per
    op — measured 5-10x slower on a shared 2-core machine (19-28 s vs 2-4.5 s for the embedded
    model's stats). The previous setting is restored, so decompositions keep every thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tensor_moments(tensor: torch.Tensor, zero_tol: float = 1e-8,
                   chunk_elements: int = STATS_CHUNK_ELEMENTS) -> TensorMoments:
    """Counts, min/max and population moments of a tensor in fp64, NaN/Inf excluded from the
    moments. Two passes over fp64 chunks: the mean first, then Σ(x−mean)² and Σ(x−mean)⁴, which
    is accurate where the one-pass Σx², Σx⁴ formulas cancel catastrophically."""
    with _one_intra_op_thread():
        return _chunked_moments(tensor, zero_tol, chunk_elements)


def _chunked_moments(tensor: torch.Tensor, zero_tol: float, chunk_elements: int) -> TensorMoments:
    flat = tensor.detach().reshape(-1)
    numel = flat.numel()
    finite_count = nan_count = inf_count = zero_count = 0
    total = 0.0
    low, high = math.inf, -math.inf
    any_non_finite = False

    single_chunk = None  # a tensor that fits in one chunk is converted to fp64 once, not twice
    for start in range(0, numel, chunk_elements):
        values = flat[start:start + chunk_elements].to(torch.float64)
        zero_count += int((values.abs() <= zero_tol).sum())  # NaN compares False: not a zero
        chunk_sum = float(values.sum())
        # A finite fp64 sum proves the chunk has no NaN/Inf (stored values up to fp32's 3.4e38
        # cannot overflow it), so the isfinite mask is only paid for where something is wrong.
        if not math.isfinite(chunk_sum):
            values, nans, infs = _finite_part(values)
            nan_count += nans
            inf_count += infs
            any_non_finite |= bool(nans or infs)
            chunk_sum = float(values.sum())
        if values.numel():
            finite_count += values.numel()
            total += chunk_sum
            low = min(low, float(values.min()))
            high = max(high, float(values.max()))
        if numel <= chunk_elements:
            single_chunk = values
    if finite_count == 0:
        return TensorMoments(numel, 0, nan_count, inf_count, zero_count, math.nan, math.nan, math.nan,
                             math.nan, math.nan)
    mean = total / finite_count
    second = fourth = 0.0
    for start in range(0, numel, chunk_elements):
        if single_chunk is not None:
            values = single_chunk
        else:
            values = flat[start:start + chunk_elements].to(torch.float64)
            if any_non_finite:
                values = _finite_part(values)[0]
        squared = (values - mean).square_()
        second += float(squared.sum())
        fourth += float(squared.square_().sum())
    var = second / finite_count
    kurtosis = (fourth / finite_count) / (var * var) - 3.0 if var > 0 else math.nan
    return TensorMoments(numel, finite_count, nan_count, inf_count, zero_count, mean, var, low, high, kurtosis)


def check_zero_tol(zero_tol: float) -> float:
    if isinstance(zero_tol, bool) or not isinstance(zero_tol, (int, float)) or not zero_tol >= 0:
        raise LLMProbeError(f"--zero-tol must be >= 0; got {zero_tol}")
    return float(zero_tol)


def weight_stats(ws: WeightSource, regex: str | None = None, zero_tol: float = 1e-8, *,
                 names: Sequence[str] | None = None) -> list[WeightStats]:
    """One :class:`WeightStats` per tensor matching ``regex`` (every tensor by default), sorted
    by layer then model order, non-layer tensors last. ``names`` skips the selection."""
    zero_tol = check_zero_tol(zero_tol)
    chosen = list(names) if names is not None else select_tensors(ws, regex)
    ordered = order_rows(ws, chosen)
    records = []
    for name, layer, role in progress.track(ordered, "weight stats", total=len(ordered)):
        tensor = ws.get(name)
        moments = tensor_moments(tensor, zero_tol)
        shape = tuple(tensor.shape)
        del tensor  # one tensor alive at a time
        records.append(WeightStats(
            name=name, shape=shape_text(shape), ndim=len(shape), numel=moments.numel, layer_index=layer,
            role=role, block_type=role, dtype=ws.stored_dtype(name), mean=moments.mean, std=moments.std,
            var=moments.var, min=moments.min, max=moments.max, abs_max=moments.abs_max,
            sparsity=moments.sparsity, zero_tol=zero_tol, kurtosis=moments.kurtosis,
            kurtosis_estimator=KURTOSIS_ESTIMATOR, finite_count=moments.finite_count,
            nan_count=moments.nan_count, inf_count=moments.inf_count,
        ))
    return records


# --------------------------------------------------------------------------------------------
# spectrum


def check_energy(energy: float) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise LLMProbeError(f"--energy must be in (0, 1]; got {energy}")
    return float(energy)


def check_rank_rtol(rank_rtol: float) -> float:
    if isinstance(rank_rtol, bool) or not isinstance(rank_rtol, (int, float)) or not rank_rtol > 0 \
            or not math.isfinite(rank_rtol):
        raise LLMProbeError(f"--rank-rtol must be a positive number; got {rank_rtol}")
    return float(rank_rtol)


def check_device(device: str) -> str:
    """Fail on an unusable device before any tensor is read (an empty batch resolves it)."""
    spectral.singular_values_batched([], device=device)
    return device


def energy_column_stem(energy: float) -> str:
    """``svd_90_percent`` for 0.9, ``svd_99_9_percent`` for 0.999 (a dot-free column name)."""
    percent = f"{energy * 100:.10g}".replace(".", "_")
    return f"svd_{percent}_percent"


def _rank_or_none(value) -> int | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def weight_spectrum(ws: WeightSource, regex: str | None = None, rank_rtol: float = 1e-6,
                    energy: float = 0.9, device: str = "cpu", *, zero_tol: float = 1e-8,
                    names: Sequence[str] | None = None, created_at: str | None = None,
                    max_batch_bytes: int = SPECTRUM_BATCH_BYTES) -> list[WeightSpectrum]:
    """One :class:`WeightSpectrum` per 2-D floating-point tensor matching ``regex``.

    Matrices are read one at a time and grouped by shape; each group goes to
    :func:`llmprobe.core.spectral.singular_values_batched` in batches of at most ``max_batch_bytes``
    (fp64 matrix + Gram matrix), so memory stays near one batch whatever the model size.
    """
    rank_rtol = check_rank_rtol(rank_rtol)
    energy = check_energy(energy)
    zero_tol = check_zero_tol(zero_tol)
    check_device(device)
    chosen = list(names) if names is not None else select_tensors(
        ws, regex, min_dim=2, max_dim=2, floating_only=True, what="2-D weight matrix")
    ordered = order_rows(ws, chosen)
    info = {name: (layer, role) for name, layer, role in ordered}
    stem = energy_column_stem(energy)
    created_at = created_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    source = ws.source
    model_path = source.location if source is not None else None
    model_id = source.display if source is not None else None
    revision = source.revision if source is not None else None

    # Same-shape matrices next to each other so that each batch is one stacked decomposition.
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, _, _ in ordered:
        by_shape.setdefault(tuple(ws.shape(name)), []).append(name)
    work = [name for group in by_shape.values() for name in group]

    rows: dict[str, WeightSpectrum] = {}
    pending: list[tuple[str, torch.Tensor, TensorMoments]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        if not pending:
            return
        results = spectral.singular_values_batched(
            [matrix for _, matrix, _ in pending], dtype=torch.float64, device=device, method="auto",
            need_small=True, max_batch_bytes=max(max_batch_bytes, 1))
        for (name, matrix, moments), (sigma, method) in zip(pending, results):
            rows[name] = _spectrum_row(name, matrix.shape, ws.stored_dtype(name), info[name], sigma, method,
                                       moments, rank_rtol, energy, stem, model_path, model_id, revision,
                                       created_at)
        pending.clear()
        pending_bytes = 0

    for position, name in enumerate(progress.track(work, "weight spectrum", total=len(work))):
        matrix = ws.get(name)
        moments = tensor_moments(matrix, zero_tol)
        rows_, cols_ = matrix.shape
        pending.append((name, matrix, moments))
        pending_bytes += (rows_ * cols_ + min(rows_, cols_) ** 2) * 8
        del matrix
        following = work[position + 1] if position + 1 < len(work) else None
        if (following is None or tuple(ws.shape(following)) != (rows_, cols_)
                or pending_bytes >= max_batch_bytes):
            flush()
    flush()
    return [rows[name] for name, _, _ in ordered]


def _spectrum_row(name, shape, dtype, layer_role, sigma, method, moments, rank_rtol, energy, stem,
                  model_path, model_id, revision, created_at) -> WeightSpectrum:
    layer, role = layer_role
    rows, cols = (int(d) for d in shape)
    finite = method != spectral.NON_FINITE_METHOD and moments.nan_count == 0 and moments.inf_count == 0
    summary = spectral.summarize(sigma, rank_rtol=rank_rtol, energy=energy, fit="none")
    actual = _rank_or_none(summary["numerical_rank"]) if finite else None
    energetic = _rank_or_none(summary["energy_rank"]) if finite else None
    design = min(rows, cols)

    def ratio(rank: int | None) -> float:
        return rank / design if rank is not None and design else math.nan

    def metric(key: str) -> float:
        return float(summary[key]) if finite else math.nan

    return WeightSpectrum(
        name=name, layer_index=layer, role=role, rows=rows, cols=cols, shape=shape_text((rows, cols)),
        numel=rows * cols, dtype=dtype, design_rank=design, actual_rank=actual, rank_ratio=ratio(actual),
        rank_rtol=rank_rtol, energy=energy, energy_rank=energetic, energy_rank_ratio=ratio(energetic),
        stable_rank=metric("stable_rank"), effective_rank=metric("effective_rank"),
        spectral_norm=metric("spectral_norm"), frobenius_norm=metric("frobenius_norm"),
        mean=moments.mean, std=moments.std, var=moments.var, sparsity=moments.sparsity, method=method,
        status="ok" if finite else "non_finite", model_path=model_path, model_id=model_id,
        revision=revision, param_name=name, block_type=role, created_at=created_at,
        **{f"{stem}_rank": energetic, f"{stem}_ratio": ratio(energetic)},
    )


def seed_matrix_rows(records: Sequence[WeightSpectrum]) -> list[TransformerMatrixAnalysis]:
    """The spectrum rows projected onto seed 003's ``transformer_matrix_analysis.csv`` columns."""
    out = []
    for record in records:
        data = record.row()
        fields = {key: data[key] for key in TransformerMatrixAnalysis.model_fields}
        extras = {key: value for key, value in data.items()
                  if key.startswith("svd_") and key.endswith(("_percent_rank", "_percent_ratio"))}
        out.append(TransformerMatrixAnalysis(**fields, **extras))
    return out


# --------------------------------------------------------------------------------------------
# bit operations


def check_bits(name: str, bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise LLMProbeError(f"{name} must be an integer in [1, {MAX_BITS}]; got {bits}")
    return bits


def check_block_size(block_size: int | None) -> int | None:
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise LLMProbeError(f"--block-size must be a positive integer; got {block_size}")
    return block_size


def bops(source: WeightSource | ModuleMap, w_bits: int = 16, a_bits: int = 16,
         block_size: int | None = None) -> list[BopsModule]:
    """BOPs per token of every linear module (the output head included), in model order.

    Needs shapes only: the module map's linears (built on the meta device); no tensor is read.
    """
    w_bits = check_bits("--w-bits", w_bits)
    a_bits = check_bits("--a-bits", a_bits)
    block_size = check_block_size(block_size)
    module_map = source if isinstance(source, ModuleMap) else source.module_map
    if not module_map.linears:
        raise LLMProbeError("this model has no linear modules to count BOPs for")
    records = []
    for site in module_map.linears:
        macs = site.in_features * site.out_features
        blocks = site.out_features * math.ceil(site.in_features / block_size) if block_size else 0
        weight_bops = macs * w_bits * a_bits
        scale_bops = blocks * SCALE_BITS * FP16_BITS
        baseline = macs * FP16_BITS * FP16_BITS
        total = weight_bops + scale_bops
        records.append(BopsModule(
            name=site.name, layer_index=site.layer, role=site.role, in_features=site.in_features,
            out_features=site.out_features, macs=macs, w_bits=w_bits, a_bits=a_bits, block_size=block_size,
            weight_bops=weight_bops, scale_bops=scale_bops, bops=total, baseline_fp16_bops=baseline,
            ratio_to_fp16=total / baseline if baseline else math.nan,
            bits_per_weight=w_bits + (SCALE_BITS / block_size if block_size else 0.0),
        ))
    return records


def _bops_total(scope: str, layer: int | None, role: str | None, rows: Sequence[BopsModule]) -> BopsSummary:
    macs = sum(r.macs for r in rows)
    weight_bops = sum(r.weight_bops for r in rows)
    scale_bops = sum(r.scale_bops for r in rows)
    baseline = sum(r.baseline_fp16_bops for r in rows)
    total = weight_bops + scale_bops
    return BopsSummary(scope=scope, layer_index=layer, role=role, modules=len(rows), macs=macs,
                       weight_bops=weight_bops, scale_bops=scale_bops, bops=total, baseline_fp16_bops=baseline,
                       ratio_to_fp16=total / baseline if baseline else math.nan, gbops=total / 1e9)


def bops_summary(records: Sequence[BopsModule]) -> list[BopsSummary]:
    """Totals per layer (in layer order, then the non-layer modules as one row with no layer),
    per role, and for the whole model (last row)."""
    by_layer: dict[int | None, list[BopsModule]] = {}
    by_role: dict[str, list[BopsModule]] = {}
    for record in records:
        by_layer.setdefault(record.layer_index, []).append(record)
        by_role.setdefault(record.role, []).append(record)
    layers = sorted(by_layer, key=lambda layer: (layer is None, layer or 0))
    out = [_bops_total("layer", layer, None, by_layer[layer]) for layer in layers]
    out += [_bops_total("role", None, role, rows) for role, rows in by_role.items()]
    out.append(_bops_total("model", None, None, records))
    return out


# -- registered analyses (declared in llmprobe.catalog.weights) -------------------------------


def _source_facts(ws: WeightSource) -> dict:
    return {"weight_source": ws.kind, "bytes_on_disk": ws.bytes_on_disk()}


def prepare_stats_job(job):
    job.state["names"] = select_tensors(job.weights, job.options.filter)


def stats_job(job):
    from ..session import Result

    o = job.options
    records = weight_stats(job.weights, zero_tol=o.zero_tol, names=job.state["names"])
    return Result(tables={"weight_stats": records},
                  manifest={"tensors": len(job.state["names"]), **_source_facts(job.weights)})


def prepare_spectrum_job(job):
    check_device(job.options.device)
    job.state["names"] = select_tensors(job.weights, job.options.filter, min_dim=2, max_dim=2, floating_only=True,
                                        what="2-D weight matrix")


def spectrum_job(job):
    from ..session import Result

    o = job.options
    records = weight_spectrum(job.weights, rank_rtol=o.rank_rtol, energy=o.energy, device=o.device,
                              zero_tol=o.zero_tol, names=job.state["names"], created_at=job.started_at)
    broken = sum(record.status != "ok" for record in records)
    result = Result(tables={"weight_spectrum": records,
                            # seed 003's file name and columns, so its notebooks read llmprobe's output unchanged
                            "transformer_matrix_analysis": seed_matrix_rows(records)},
                    csv_only=("transformer_matrix_analysis",),
                    manifest={"matrices": len(job.state["names"]), **_source_facts(job.weights)})
    if broken:
        result.manifest["non_finite_matrices"] = broken
        result.notes.append(f"[yellow]{broken} matrices hold NaN/Inf: status non_finite, spectral columns empty[/]")
    return result


def _module_map_for_shapes(source) -> ModuleMap:
    """Shapes come from the config alone. A hub model's config is a small download, where opening
    its weight source would fetch every safetensors shard."""
    if source.kind == "hub":
        from ..core.loading import load_config

        return ModuleMap.from_config(load_config(source), trust_remote_code=source.trust_remote_code)
    return WeightSource.open(source).module_map


def prepare_bops_job(job):
    job.state["module_map"] = _module_map_for_shapes(job.source)  # a bad config fails before any output


def bops_job(job):
    from ..session import Result

    o = job.options
    records = bops(job.state["module_map"], w_bits=o.w_bits, a_bits=o.a_bits, block_size=o.block_size)
    summary = bops_summary(records)
    rows = [row.row() for row in summary]
    document = {
        "w_bits": o.w_bits, "a_bits": o.a_bits, "block_size": o.block_size,
        "definition": ("BOPs per token: in*out*w_bits*a_bits per linear module, plus "
                       "out*ceil(in/block_size)*16*16 for the fp16 block-scale multiplies when block_size is "
                       "set; baseline_fp16_bops = in*out*16*16"),
        "model": next(row for row in rows if row["scope"] == "model"),
        "layers": [row for row in rows if row["scope"] == "layer"],
        "roles": [row for row in rows if row["scope"] == "role"],
    }
    return Result(tables={"bops": records}, documents={"bops_summary": document}, data={"summary": summary})
