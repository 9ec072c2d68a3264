"""Activation quantization error and gradient-weighted sensitivity.

Four analyses, each one streaming pass over the calibration windows with :func:`collect`:

``quant_error``
    MSE between each hooked activation x and its fake-quantized copy Q(x):
    ``mse = Σ (x - Q(x))² / (tokens · features)``, summed over every kept token of every window.
    Scales follow ``granularity``:

    * ``per-token``  one scale per token row (the feature vector one linear reads);
    * ``per-tensor`` one scale per window's ``[L, F]`` activation matrix (the tensor one forward
      pass of one window hands to the module; LMAnalyser quantizes each forward's tensor). Tokens
      dropped by ``--exclude-bos``/``--exclude-tokens`` are not part of that matrix, so they do
      not set its scale either;
    * ``per-group``  groups of ``group_size`` consecutive features within each token row.

    Aggregates over a set of modules (a layer, a role, the model): ``mse_mean`` is the plain mean
    of the module MSEs, ``mse_pooled`` is Σ squared error / Σ elements (wide inputs such as
    ``mlp.down`` weigh more). Every module sees the same tokens, so a token-weighted mean of
    module MSEs equals ``mse_mean``. Modules that share an input (q/k/v, gate/up) are collected
    once and give identical rows; aggregates count each module row.

``top_token_error``
    Each token occurrence's error at one module, ``e = mean over features of (x - Q(x))²``, is one
    observation. Observations are grouped by token id (overall, per layer, per role): count,
    mean, population std (ddof=0) and max. A shared input stands for each module reading it.

``fisher``
    Empirical Fisher information of each module's input: per window w,
    ``F_w = Σ_{tokens, features} (∂L_w/∂x)²`` where ``L_w`` is the window's mean shifted
    next-token loss. Reported: ``mean_w F_w`` (and its std/min/max) and
    ``log Σ_w F_w`` computed as ``logsumexp_w(log F_w)`` (stable however far apart windows are).

``fgmp``
    FGMP block sensitivity (Hooper et al., arXiv 2504.14152): the second-order (Fisher) estimate of
    the loss increase from storing an activation block in the low format instead of the high one,
    ``S_b = Σ_tokens Σ_{i∈b} g_i² · (Q_low(x)_i − Q_high(x)_i)²`` with ``g = ∂L/∂x`` and blocks of
    ``block_size`` consecutive features, each block quantized with its own absmax scale (the
    block-scaled formats the paper targets). Blocks are ranked over the whole model and the top
    ``keep_frac`` fraction is marked as kept in the high format.

Every statistic is accumulated in fp64 from fp32 fake quantization (:mod:`llmprobe.core.quant`);
nothing keeps activation tensors beyond one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.calibration import Calibration
from ..core.collect import Batch, Site, collect, sites_for_key
from ..core.errors import LLMProbeError
from ..core.modulemap import LinearSite
from ..core.quant import INT_BITS_RANGE, parse_format, quantize, symmetric_int_error_per_token
from ..core.records import Record

GRANULARITIES = ("per-token", "per-tensor", "per-group")
# Formats whose granularity is fixed by the format itself rather than by --granularity.
_CAST_FORMATS = ("fp64", "fp32", "fp16", "bf16")
NF4_DEFAULT_BLOCK = 64
_FORMAT_HELP = ("int (with --bits), int2 … int16, fp8 (= fp8_e4m3), fp8_e4m3, fp8_e5m2, fp4 (= fp4_e2m1), "
                "nf4, fp16, bf16")


# -- quantization spec ------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantSpec:
    """How one activation matrix is fake-quantized: format, which elements share a scale, and
    whether the integer grid is symmetric. ``granularity`` is what is actually done: ``none`` for
    plain casts (fp16/bf16), ``per-group`` for nf4's absmax blocks."""

    fmt: str
    granularity: str
    group_size: int | None = None
    symmetric: bool = True

    @property
    def label(self) -> str:
        label = f"{self.fmt} {self.granularity}"
        if self.granularity == "per-group":
            label += f" g{self.group_size}"
        if self.fmt.startswith("int") and not self.symmetric:
            label += " asym"
        return label

    @property
    def divisor(self) -> int | None:
        """Size that must divide the feature dimension (per-group and nf4 blocks), else None."""
        return self.group_size if self.granularity == "per-group" else None

    def apply(self, x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` [T, F] (rows ordered by ``window`` [T]); fp32 result."""
        if self.granularity == "none":
            return quantize(x, self.fmt)
        if self.fmt == "nf4":
            # quant.fake_quant_nf4 blocks the row-major flattening; the feature size is checked
            # to be a multiple of the block, so no block straddles two tokens.
            return quantize(x, "nf4", group_size=self.group_size)
        if self.granularity == "per-tensor":
            # One scale per window: split the rows at window boundaries (rows of a window are
            # contiguous because collect() masks a [B, L] batch in row-major order).
            _, counts = torch.unique_consecutive(window, return_counts=True)
            parts = torch.split(x, counts.tolist())
            return torch.cat([quantize(part, self.fmt, granularity="per-tensor", symmetric=self.symmetric)
                              for part in parts])
        return quantize(x, self.fmt, granularity=self.granularity, group_size=self.group_size,
                        symmetric=self.symmetric)

    @property
    def per_token_int_bits(self) -> int | None:
        """The width, where this spec is symmetric per-token int RTN (the case the compiled
        activation pass computes with its other statistics); else None."""
        if self.fmt.startswith("int") and self.granularity == "per-token" and self.symmetric:
            return int(self.fmt[3:])
        return None

    def row_squared_error(self, batch: Batch) -> torch.Tensor:
        """[T]: Σ over each token's features of (x − Q(x))²; per-token int on a compiled batch in
        the one activation pass summed in fp64, otherwise summed in fp32 over one token's F
        values (PyTorch's cascade sum: relative error ~1e-7)."""
        x = batch.x
        per_token_int = self.per_token_int_bits is not None
        if per_token_int and batch.compiled:
            return batch.row_int_error_sse(self.per_token_int_bits)
        error = batch.scratch("quant error")
        if per_token_int:
            # The common case, fused: per-token max|x| is shared with the other collectors.
            symmetric_int_error_per_token(x, int(self.fmt[3:]), batch.row_abs_max(), out=error)
        else:
            torch.sub(self.apply(x, batch.window), x, out=error)
        return error.mul_(error).sum(dim=1)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in INT_BITS_RANGE:
        raise LLMProbeError(f"--bits must be an integer between {INT_BITS_RANGE.start} and "
                            f"{INT_BITS_RANGE.stop - 1}; got {bits}")
    return bits


def resolve_format(fmt: str, bits: int | None = None, option: str = "--format") -> str:
    """Canonical format name: ``int`` takes its width from ``bits``; ``fp8`` means fp8_e4m3."""
    name = str(fmt).strip().lower()
    if name == "int":
        if bits is None:
            raise LLMProbeError(f"{option} int needs a width here; write it out, e.g. int4 or int8")
        return f"int{check_bits(bits)}"
    if name == "fp8":
        return "fp8_e4m3"
    if name == "fp4":
        return "fp4_e2m1"
    try:
        return parse_format(name)
    except LLMProbeError:
        raise LLMProbeError(f"unknown {option} '{fmt}'; use one of: {_FORMAT_HELP}") from None


def quant_spec(bits: int = 4, fmt: str = "int", granularity: str = "per-token", group_size: int | None = None,
               symmetric: bool = True) -> QuantSpec:
    """Validate the user's quantization options (before any model work) and return the spec."""
    check_bits(bits)
    canonical = resolve_format(fmt, bits)
    if granularity not in GRANULARITIES:
        raise LLMProbeError(f"unknown --granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}")
    if group_size is not None and (isinstance(group_size, bool) or group_size < 1):
        raise LLMProbeError(f"--group-size must be a positive integer; got {group_size}")
    if canonical in _CAST_FORMATS:
        return QuantSpec(canonical, "none", None, symmetric)
    if canonical == "nf4":
        # nf4 is defined with absmax blocks; --group-size (default 64) is the block.
        return QuantSpec("nf4", "per-group", group_size or NF4_DEFAULT_BLOCK, True)
    if granularity == "per-group":
        if group_size is None:
            raise LLMProbeError("--granularity per-group needs --group-size")
    elif group_size is not None:
        raise LLMProbeError(f"--group-size applies only to --granularity per-group (got {granularity})")
    return QuantSpec(canonical, granularity, group_size, symmetric)


def block_spec(fmt: str, block_size: int, option: str, symmetric: bool = True) -> QuantSpec:
    """A block-scaled format for FGMP: one absmax scale per ``block_size`` features."""
    canonical = resolve_format(fmt, None, option)
    if canonical in _CAST_FORMATS:
        return QuantSpec(canonical, "none", None, symmetric)
    return QuantSpec(canonical, "per-group", block_size, symmetric if canonical.startswith("int") else True)


# -- helpers shared by the analyses -----------------------------------------------------------

def _feature_size(member: LinearSite, site: Site) -> int:
    return member.in_features if site == "input" else member.out_features


def check_divides(calib: Calibration, size: int | None, *, site: Site = "input", option: str = "--group-size",
                  backward: bool = False) -> None:
    """Refuse a group/block size that does not divide some hooked activation's feature size,
    naming the first such module, before any forward pass runs."""
    if size is None:
        return
    for members in sites_for_key(calib.mmap, calib.sites, site, backward).values():
        features = _feature_size(members[0], site)
        if features % size != 0:
            raise LLMProbeError(f"{option} {size} does not divide the {features} {site} features of "
                                f"{members[0].name}; pick a divisor of {features}")


def _log_or_none(value: float) -> float | None:
    return math.log(value) if value > 0 else None


def _ratio_or_none(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _run(calib: Calibration, collectors: Sequence, *, site: Site, batch_size: int, backward: bool,
         description: str) -> dict[str, list[LinearSite]]:
    return collect(calib.lm.model, calib.mmap, calib.sites, calib.windows, collectors, site=site,
                   token_filter=calib.token_filter, rotate=calib.rotate, batch_size=batch_size,
                   backward=backward, description=description)


def _scopes_of(members: Sequence[LinearSite]) -> list[tuple[str, int | None, str | None, int]]:
    """(scope, layer, role, weight): how many module observations one keyed batch stands for
    in the model, layer and role aggregates."""
    scopes: list[tuple[str, int | None, str | None, int]] = [("model", None, None, len(members))]
    layers: dict[int, int] = {}
    roles: dict[str, int] = {}
    for member in members:
        if member.layer is not None:
            layers[member.layer] = layers.get(member.layer, 0) + 1
        roles[member.role] = roles.get(member.role, 0) + 1
    scopes += [("layer", layer, None, count) for layer, count in layers.items()]
    scopes += [("role", None, role, count) for role, count in roles.items()]
    return scopes


def _group_rows(rows: Sequence) -> list[tuple[str, int | None, str | None, list]]:
    """Module rows grouped into layer scopes, role scopes (model order) and the model scope."""
    by_layer: dict[int, list] = {}
    by_role: dict[str, list] = {}
    for row in rows:
        if row.layer is not None:
            by_layer.setdefault(row.layer, []).append(row)
        by_role.setdefault(row.role, []).append(row)
    groups = [("layer", layer, None, members) for layer, members in sorted(by_layer.items())]
    groups += [("role", None, role, members) for role, members in by_role.items()]
    groups.append(("model", None, None, list(rows)))
    return groups


# -- quant error -------------------------------------------------------------------------------

class ActivationQuantError(Record):
    """Quantization error of one module's activation (input or output)."""

    module: str
    layer: int | None
    role: str
    input_group: str
    site: str
    format: str
    granularity: str
    group_size: int | None
    tokens: int               # kept tokens over all windows
    features: int
    elements: int             # tokens · features
    sse: float                # Σ (x − Q(x))²
    mse: float                # sse / elements
    signal_power: float       # Σ x² / elements
    rel_mse: float | None     # sse / Σ x²
    sqnr_db: float | None     # 10·log10(Σ x² / sse)


class ActivationQuantErrorSummary(Record):
    """Quantization error over a layer, a role, or the whole model."""

    scope: str                # layer | role | model
    layer: int | None
    role: str | None
    modules: int
    elements: int
    mse_mean: float           # mean of module MSEs
    mse_pooled: float         # Σ sse / Σ elements
    rel_mse_pooled: float | None  # Σ sse / Σ x²


@dataclass
class QuantErrorResult:
    modules: list[ActivationQuantError]
    summary: list[ActivationQuantErrorSummary]

    def tables(self) -> dict[str, list[Record]]:
        return {"quant_error": self.modules, "quant_error_summary": self.summary}


class _TokenErrorStats:
    """Per-token-id running count / Σ e / Σ e² / max e for each scope, over a dense index of the
    token ids present in the windows (so memory is scopes × distinct tokens, not × vocabulary)."""

    def __init__(self, windows: torch.Tensor):
        self.token_ids = torch.unique(windows)
        self.dense_index = torch.full((int(self.token_ids.max()) + 1,), -1, dtype=torch.long)
        self.dense_index[self.token_ids] = torch.arange(len(self.token_ids))
        self.scopes: dict[tuple[str, int | None, str | None], dict[str, torch.Tensor]] = {}

    def _state(self, scope) -> dict[str, torch.Tensor]:
        if scope not in self.scopes:
            size = len(self.token_ids)
            self.scopes[scope] = {"count": torch.zeros(size, dtype=torch.float64),
                                  "sum": torch.zeros(size, dtype=torch.float64),
                                  "sumsq": torch.zeros(size, dtype=torch.float64),
                                  "max": torch.full((size,), -math.inf, dtype=torch.float64)}
        return self.scopes[scope]

    def add(self, members: Sequence[LinearSite], token_ids: torch.Tensor, errors: torch.Tensor) -> None:
        index = self.dense_index[token_ids]
        errors = errors.double().cpu()
        for scope, layer, role, weight in _scopes_of(members):
            state = self._state((scope, layer, role))
            state["count"].index_add_(0, index, torch.full_like(errors, float(weight)))
            state["sum"].index_add_(0, index, errors * weight)
            state["sumsq"].index_add_(0, index, errors.square() * weight)
            state["max"].scatter_reduce_(0, index, errors, reduce="amax")

    def merge(self, scopes: dict) -> None:
        """Fold another rank's per-scope states in (counts and sums add, maxima max)."""
        for scope, other in scopes.items():
            state = self._state(scope)
            for name in ("count", "sum", "sumsq"):
                state[name] += other[name]
            state["max"] = torch.maximum(state["max"], other["max"])


class _QuantErrorCollector:
    """Σ (x − Q(x))², Σ x² and counts per key; optionally each token row's error by token id."""

    def __init__(self, spec: QuantSpec, key_members: dict[str, list[LinearSite]] | None = None,
                 token_stats: _TokenErrorStats | None = None):
        self.spec = spec
        self.key_members = key_members
        self.token_stats = token_stats
        self.sse: dict[str, float] = {}
        self.signal: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.features: dict[str, int] = {}

    @property
    def int_error_bits(self) -> tuple[int, ...]:
        """Asked of collectors by collect(): int widths to compute in the one activation pass."""
        bits = self.spec.per_token_int_bits
        return () if bits is None else (bits,)

    def update(self, key: str, batch: Batch) -> None:
        x = batch.x
        if x.shape[0] == 0:
            return
        # Per-token sums (fp64 on compiled batches, else fp32 over F terms), folded into fp64 totals.
        row_error = batch.derived(("quant row sse", self.spec), self.spec.row_squared_error).to(torch.float64)
        row_signal = batch.row_sum_sq()
        self.sse[key] = self.sse.get(key, 0.0) + float(row_error.sum())
        self.signal[key] = self.signal.get(key, 0.0) + float(row_signal.sum())
        self.tokens[key] = self.tokens.get(key, 0) + int(x.shape[0])
        self.features[key] = int(x.shape[1])
        if self.token_stats is not None:
            self.token_stats.add(self.key_members[key], batch.token_ids, row_error / x.shape[1])

    # merging across ranks (core/distributed.merge_collectors): sums add
    def shard_state(self) -> dict:
        return {"sse": dict(self.sse), "signal": dict(self.signal), "tokens": dict(self.tokens),
                "features": dict(self.features),
                "scopes": None if self.token_stats is None else self.token_stats.scopes}

    def load_shard_state(self, state: dict) -> None:
        self.sse, self.signal, self.tokens = {}, {}, {}
        if self.token_stats is not None:
            self.token_stats.scopes = {}
        self.merge_shard_state(state)

    def merge_shard_state(self, state: dict) -> None:
        for name in ("sse", "signal", "tokens"):
            mine = getattr(self, name)
            for key, value in state[name].items():
                mine[key] = mine.get(key, 0) + value
        self.features.update(state["features"])
        if self.token_stats is not None:
            self.token_stats.merge(state["scopes"])


def _quant_error_rows(collector: _QuantErrorCollector, key_members: dict[str, list[LinearSite]],
                      spec: QuantSpec, site: Site) -> list[ActivationQuantError]:
    rows = []
    for key, members in key_members.items():
        tokens = collector.tokens.get(key, 0)
        features = collector.features.get(key, _feature_size(members[0], site))
        elements = tokens * features
        sse, signal = collector.sse.get(key, 0.0), collector.signal.get(key, 0.0)
        mse = sse / elements if elements else math.nan
        for member in members:
            rows.append(ActivationQuantError(
                module=member.name, layer=member.layer, role=member.role, input_group=member.input_group,
                site=site, format=spec.fmt, granularity=spec.granularity, group_size=spec.group_size,
                tokens=tokens, features=features, elements=elements, sse=sse, mse=mse,
                signal_power=signal / elements if elements else math.nan,
                rel_mse=_ratio_or_none(sse, signal),
                sqnr_db=10 * math.log10(signal / sse) if sse > 0 and signal > 0 else None))
    return rows


def _quant_error_summary(rows: Sequence[ActivationQuantError]) -> list[ActivationQuantErrorSummary]:
    summary = []
    for scope, layer, role, members in _group_rows(rows):
        elements = sum(r.elements for r in members)
        sse = sum(r.sse for r in members)
        signal = sum(r.signal_power * r.elements for r in members if r.elements)
        summary.append(ActivationQuantErrorSummary(
            scope=scope, layer=layer, role=role, modules=len(members), elements=elements,
            mse_mean=sum(r.mse for r in members) / len(members),
            mse_pooled=sse / elements if elements else math.nan,
            rel_mse_pooled=_ratio_or_none(sse, signal)))
    return summary


def quant_error(calib: Calibration, bits: int = 4, granularity: str = "per-token", group_size: int | None = None,
                fmt: str = "int", symmetric: bool = True, *, site: Site = "input", batch_size: int = 1,
                spec: QuantSpec | None = None) -> QuantErrorResult:
    """MSE between each module's activation and its fake-quantized copy (module docstring)."""
    spec = spec or quant_spec(bits, fmt, granularity, group_size, symmetric)
    check_divides(calib, spec.divisor, site=site,
                  option="nf4 block (--group-size)" if spec.fmt == "nf4" else "--group-size")
    collector = _QuantErrorCollector(spec)
    key_members = _run(calib, [collector], site=site, batch_size=batch_size, backward=False,
                       description="quant error")
    rows = _quant_error_rows(collector, key_members, spec, site)
    return QuantErrorResult(rows, _quant_error_summary(rows))


# -- top-token error ----------------------------------------------------------------------------

class TokenQuantError(Record):
    """Per-token quantization MSE of one token id, over one scope's modules."""

    scope: str                # model | layer | role
    layer: int | None
    role: str | None
    rank: int                 # 1 = largest mean error in this scope
    token_id: int
    token: str                # decoded text
    occurrences: int          # kept occurrences of the token in the windows
    count: int                # observations: occurrences × modules in the scope
    mean_mse: float
    std_mse: float            # population std (ddof=0) over observations
    max_mse: float
    format: str
    granularity: str


@dataclass
class TopTokenErrorResult:
    tokens: list[TokenQuantError]      # every token id, model scope, by descending mean error
    top: list[TokenQuantError]         # top-k per scope (model, each layer, each role)

    def tables(self) -> dict[str, list[Record]]:
        return {"token_error": self.tokens, "top_token_error": self.top}


def _token_rows(calib: Calibration, stats: _TokenErrorStats, scope: tuple, occurrences: torch.Tensor,
                spec: QuantSpec, limit: int | None, min_occurrences: int,
                decoded: dict[int, str]) -> list[TokenQuantError]:
    state = stats.scopes[scope]
    count = state["count"]
    seen = (count > 0) & (occurrences >= min_occurrences)
    safe = count.clamp(min=1)
    mean = state["sum"] / safe
    variance = (state["sumsq"] / safe - mean.square()).clamp(min=0)
    std = variance.sqrt()
    indices = torch.nonzero(seen).flatten()
    # Descending mean, ties by ascending token id (token_ids are sorted, so index order is id order).
    order = sorted(indices.tolist(), key=lambda i: (-float(mean[i]), i))
    if limit is not None:
        order = order[:limit]
    rows = []
    for rank, i in enumerate(order, start=1):
        token_id = int(stats.token_ids[i])
        if token_id not in decoded:
            decoded[token_id] = calib.decode(token_id)
        rows.append(TokenQuantError(
            scope=scope[0], layer=scope[1], role=scope[2], rank=rank, token_id=token_id,
            token=decoded[token_id], occurrences=int(occurrences[i]), count=int(count[i]),
            mean_mse=float(mean[i]), std_mse=float(std[i]), max_mse=float(state["max"][i]),
            format=spec.fmt, granularity=spec.granularity))
    return rows


def top_token_error(calib: Calibration, bits: int = 4, granularity: str = "per-token", group_size: int | None = None,
                    fmt: str = "int", symmetric: bool = True, *, top_k: int = 20, min_occurrences: int = 1,
                    site: Site = "input", batch_size: int = 1, spec: QuantSpec | None = None
                    ) -> TopTokenErrorResult:
    """Per-token quantization MSE aggregated by token id (module docstring)."""
    if top_k < 1:
        raise LLMProbeError(f"--top-k must be at least 1; got {top_k}")
    if min_occurrences < 1:
        raise LLMProbeError(f"--min-count must be at least 1; got {min_occurrences}")
    spec = spec or quant_spec(bits, fmt, granularity, group_size, symmetric)
    check_divides(calib, spec.divisor, site=site,
                  option="nf4 block (--group-size)" if spec.fmt == "nf4" else "--group-size")
    stats = _TokenErrorStats(calib.windows)
    key_members = sites_for_key(calib.mmap, calib.sites, site)
    collector = _QuantErrorCollector(spec, key_members, stats)
    _run(calib, [collector], site=site, batch_size=batch_size, backward=False, description="top-token error")

    kept = calib.windows[calib.token_filter.keep_mask(calib.windows)]
    occurrences = torch.zeros(len(stats.token_ids), dtype=torch.long)
    occurrences.index_add_(0, stats.dense_index[kept], torch.ones_like(kept))

    decoded: dict[int, str] = {}
    model_scope = ("model", None, None)
    if model_scope not in stats.scopes:
        raise LLMProbeError("every token was excluded: no activation left to measure")
    everything = _token_rows(calib, stats, model_scope, occurrences, spec, None, min_occurrences, decoded)
    top = list(everything[:top_k])
    layer_scopes = sorted((s for s in stats.scopes if s[0] == "layer"), key=lambda s: s[1])
    role_scopes = [s for s in stats.scopes if s[0] == "role"]
    for scope in layer_scopes + role_scopes:
        top += _token_rows(calib, stats, scope, occurrences, spec, top_k, min_occurrences, decoded)
    return TopTokenErrorResult(everything, top)


# -- Fisher information --------------------------------------------------------------------------

class ActivationFisher(Record):
    """Empirical Fisher information Σ (∂L/∂x)² of one module's input."""

    module: str
    layer: int | None
    role: str
    input_group: str
    windows: int
    tokens: int
    features: int
    fisher_mean: float          # mean over windows of F_w = Σ_{tokens, features} g²
    fisher_std: float           # population std of F_w over windows
    fisher_min: float
    fisher_max: float
    fisher_per_element: float   # Σ_w F_w / (tokens · features)
    fisher_logsumexp: float | None  # log Σ_w F_w = logsumexp_w log F_w


class ActivationFisherSummary(Record):
    """Fisher information summed over the modules of a layer, a role, or the model."""

    scope: str
    layer: int | None
    role: str | None
    modules: int
    fisher_mean: float          # mean over windows of Σ_{modules} F_w
    fisher_logsumexp: float | None  # log Σ_w Σ_{modules} F_w
    fisher_mean_per_module: float


@dataclass
class FisherResult:
    modules: list[ActivationFisher]
    summary: list[ActivationFisherSummary]
    per_window: dict[str, torch.Tensor]   # module -> F_w [windows] fp64 (for callers and tests)

    def tables(self) -> dict[str, list[Record]]:
        return {"fisher": self.modules, "fisher_summary": self.summary}


class _FisherCollector:
    """Per key and window: Σ g² (fp64), scattered by each row's window index."""

    def __init__(self, n_windows: int):
        self.n_windows = n_windows
        self.per_window: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.features: dict[str, int] = {}

    def update(self, key: str, batch: Batch) -> None:
        if batch.grad is None or batch.grad.shape[0] == 0:
            return
        row_sums = batch.grad.square().sum(dim=1, dtype=torch.float64).cpu()
        if key not in self.per_window:
            self.per_window[key] = torch.zeros(self.n_windows, dtype=torch.float64)
        self.per_window[key].index_add_(0, batch.window, row_sums)
        self.tokens[key] = self.tokens.get(key, 0) + int(batch.grad.shape[0])
        self.features[key] = int(batch.grad.shape[1])

    # merging across ranks (core/distributed.merge_collectors): each window lives on one rank
    def shard_state(self) -> dict:
        return {"per_window": self.per_window, "tokens": dict(self.tokens), "features": dict(self.features)}

    def load_shard_state(self, state: dict) -> None:
        self.per_window, self.tokens, self.features = {}, {}, {}
        self.merge_shard_state(state)

    def merge_shard_state(self, state: dict) -> None:
        for key, values in state["per_window"].items():
            if key in self.per_window:
                self.per_window[key] = self.per_window[key] + values
            else:
                self.per_window[key] = values.clone()
        for key, value in state["tokens"].items():
            self.tokens[key] = self.tokens.get(key, 0) + value
        self.features.update(state["features"])


def _logsumexp_of_logs(values: torch.Tensor) -> float | None:
    """log Σ v computed as logsumexp(log v); None when every v is 0 (log 0 = −inf)."""
    result = float(torch.logsumexp(torch.log(values), dim=0))
    return result if math.isfinite(result) else None


def fisher(calib: Calibration, *, batch_size: int = 1) -> FisherResult:
    """Σ (∂L/∂x)² per module input, per window; mean and log-sum-exp over windows."""
    n_windows = int(calib.windows.shape[0])
    collector = _FisherCollector(n_windows)
    key_members = _run(calib, [collector], site="input", batch_size=batch_size, backward=True,
                       description="fisher")
    rows: list[ActivationFisher] = []
    per_window: dict[str, torch.Tensor] = {}
    for key, members in key_members.items():
        values = collector.per_window.get(key, torch.zeros(n_windows, dtype=torch.float64))
        tokens = collector.tokens.get(key, 0)
        features = collector.features.get(key, members[0].in_features)
        for member in members:
            per_window[member.name] = values
            rows.append(ActivationFisher(
                module=member.name, layer=member.layer, role=member.role, input_group=member.input_group,
                windows=n_windows, tokens=tokens, features=features,
                fisher_mean=float(values.mean()), fisher_std=float(values.std(correction=0)),
                fisher_min=float(values.min()), fisher_max=float(values.max()),
                fisher_per_element=float(values.sum()) / (tokens * features) if tokens else math.nan,
                fisher_logsumexp=_logsumexp_of_logs(values)))
    summary = []
    for scope, layer, role, members in _group_rows(rows):
        total = torch.stack([per_window[r.module] for r in members]).sum(dim=0)
        summary.append(ActivationFisherSummary(
            scope=scope, layer=layer, role=role, modules=len(members), fisher_mean=float(total.mean()),
            fisher_logsumexp=_logsumexp_of_logs(total),
            fisher_mean_per_module=float(total.mean()) / len(members)))
    return FisherResult(rows, summary, per_window)


# -- FGMP sensitivity ----------------------------------------------------------------------------

class FgmpSensitivity(Record):
    """FGMP sensitivity of one module's input, summed over its blocks."""

    module: str
    layer: int | None
    role: str
    input_group: str
    low_format: str
    high_format: str
    block_size: int
    tokens: int
    features: int
    blocks: int                    # feature blocks (features / block_size)
    sensitivity: float             # Σ_blocks S_b
    sensitivity_per_token: float
    max_block_sensitivity: float
    delta_mse: float               # mean (Q_low(x) − Q_high(x))², unweighted
    blocks_high: int               # blocks among the model-wide top keep_frac
    high_frac: float               # blocks_high / blocks
    high_share: float | None       # share of this module's sensitivity in those blocks


class FgmpBlockSensitivity(Record):
    """One feature block of one module."""

    module: str
    layer: int | None
    role: str
    block: int
    first_feature: int
    sensitivity: float
    rank: int                      # 1 = most sensitive block in the model
    high: bool                     # kept in the high format at keep_frac


class FgmpSummary(Record):
    """FGMP sensitivity over a layer, a role, or the model."""

    scope: str
    layer: int | None
    role: str | None
    modules: int
    blocks: int
    sensitivity: float
    blocks_high: int
    high_frac: float
    high_share: float | None       # fraction of the scope's sensitivity in high blocks
    keep_frac: float
    threshold: float | None        # smallest sensitivity kept high (model-wide)


@dataclass
class FgmpResult:
    modules: list[FgmpSensitivity]
    blocks: list[FgmpBlockSensitivity]
    summary: list[FgmpSummary]

    def tables(self) -> dict[str, list[Record]]:
        return {"fgmp": self.modules, "fgmp_blocks": self.blocks, "fgmp_summary": self.summary}


class _FgmpCollector:
    """Per key: Σ_tokens Σ_{i∈b} g²·(Q_low − Q_high)² per block, plus Σ (Q_low − Q_high)²."""

    def __init__(self, low: QuantSpec, high: QuantSpec, block_size: int):
        self.low, self.high, self.block_size = low, high, block_size
        self.block_sums: dict[str, torch.Tensor] = {}
        self.delta_sums: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def update(self, key: str, batch: Batch) -> None:
        x, grad = batch.x, batch.grad
        if grad is None or x.shape[0] == 0:
            return
        delta_sq = (self.low.apply(x, batch.window) - self.high.apply(x, batch.window)).square()
        weighted = grad.square() * delta_sq
        tokens, features = x.shape
        per_block = weighted.view(tokens, features // self.block_size, self.block_size).sum(
            dim=(0, 2), dtype=torch.float64).cpu()
        if key not in self.block_sums:
            self.block_sums[key] = torch.zeros_like(per_block)
        self.block_sums[key] += per_block
        self.delta_sums[key] = self.delta_sums.get(key, 0.0) + float(delta_sq.sum(dtype=torch.float64))
        self.tokens[key] = self.tokens.get(key, 0) + tokens

    # merging across ranks (core/distributed.merge_collectors): sums add
    def shard_state(self) -> dict:
        return {"blocks": self.block_sums, "delta": dict(self.delta_sums), "tokens": dict(self.tokens)}

    def load_shard_state(self, state: dict) -> None:
        self.block_sums, self.delta_sums, self.tokens = {}, {}, {}
        self.merge_shard_state(state)

    def merge_shard_state(self, state: dict) -> None:
        for key, values in state["blocks"].items():
            self.block_sums[key] = self.block_sums[key] + values if key in self.block_sums else values.clone()
        for name, mine in (("delta", self.delta_sums), ("tokens", self.tokens)):
            for key, value in state[name].items():
                mine[key] = mine.get(key, 0) + value


def fgmp(calib: Calibration, block_size: int = 32, low: str = "int4", high: str = "int8", *,
         keep_frac: float = 0.1, symmetric: bool = True, batch_size: int = 1) -> FgmpResult:
    """FGMP block sensitivity Σ g²·(Q_low(x) − Q_high(x))² (module docstring)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise LLMProbeError(f"--block-size must be a positive integer; got {block_size}")
    if not 0.0 <= keep_frac <= 1.0:
        raise LLMProbeError(f"--keep-frac must be in [0, 1]; got {keep_frac}")
    low_spec = block_spec(low, block_size, "--low-format", symmetric)
    high_spec = block_spec(high, block_size, "--high-format", symmetric)
    check_divides(calib, block_size, option="--block-size", backward=True)
    collector = _FgmpCollector(low_spec, high_spec, block_size)
    key_members = _run(calib, [collector], site="input", batch_size=batch_size, backward=True,
                       description="fgmp")

    # Model-wide ranking of (module, block). In backward mode every key is one module, since
    # q, k and v each receive their own gradient.
    entries: list[tuple[str, LinearSite, torch.Tensor]] = []
    for key, members in key_members.items():
        blocks = members[0].in_features // block_size
        values = collector.block_sums.get(key, torch.zeros(blocks, dtype=torch.float64))
        entries.extend((key, member, values) for member in members)
    flat = torch.cat([values for _, _, values in entries]) if entries else torch.zeros(0, dtype=torch.float64)
    total_blocks = int(flat.numel())
    keep = int(math.floor(keep_frac * total_blocks + 1e-9))
    # Stable sort: equal sensitivities keep model order, so the ranking is deterministic.
    order = torch.sort(flat, descending=True, stable=True).indices
    ranks = torch.empty(total_blocks, dtype=torch.long)
    ranks[order] = torch.arange(1, total_blocks + 1)
    high_mask = ranks <= keep
    threshold = float(flat[order[keep - 1]]) if keep > 0 else None

    module_rows, block_rows = [], []
    offset = 0
    for key, member, values in entries:
        blocks = int(values.numel())
        member_high = high_mask[offset:offset + blocks]
        member_ranks = ranks[offset:offset + blocks]
        tokens = collector.tokens.get(key, 0)
        total = float(values.sum())
        module_rows.append(FgmpSensitivity(
            module=member.name, layer=member.layer, role=member.role, input_group=member.input_group,
            low_format=low_spec.fmt, high_format=high_spec.fmt, block_size=block_size, tokens=tokens,
            features=member.in_features, blocks=blocks, sensitivity=total,
            sensitivity_per_token=total / tokens if tokens else math.nan,
            max_block_sensitivity=float(values.max()) if blocks else 0.0,
            delta_mse=collector.delta_sums.get(key, 0.0) / (tokens * member.in_features) if tokens else math.nan,
            blocks_high=int(member_high.sum()), high_frac=float(member_high.double().mean()) if blocks else 0.0,
            high_share=_ratio_or_none(float(values[member_high].sum()), total)))
        for block in range(blocks):
            block_rows.append(FgmpBlockSensitivity(
                module=member.name, layer=member.layer, role=member.role, block=block,
                first_feature=block * block_size, sensitivity=float(values[block]),
                rank=int(member_ranks[block]), high=bool(member_high[block])))
        offset += blocks

    block_values = {row.module: [] for row in module_rows}
    for row in block_rows:
        block_values[row.module].append(row)
    summary = []
    for scope, layer, role, members in _group_rows(module_rows):
        blocks = sum(r.blocks for r in members)
        sensitivity = sum(r.sensitivity for r in members)
        high_blocks = sum(r.blocks_high for r in members)
        high_sensitivity = sum(b.sensitivity for r in members for b in block_values[r.module] if b.high)
        summary.append(FgmpSummary(
            scope=scope, layer=layer, role=role, modules=len(members), blocks=blocks, sensitivity=sensitivity,
            blocks_high=high_blocks, high_frac=high_blocks / blocks if blocks else 0.0,
            high_share=_ratio_or_none(high_sensitivity, sensitivity), keep_frac=keep_frac, threshold=threshold))
    return FgmpResult(module_rows, block_rows, summary)


# -- registered analyses (declared in llmprobe.catalog.activations) ---------------------------


def _job_result(result, **manifest):
    from ..session import Result

    return Result(tables=result.tables(), manifest=manifest)


def prepare_quant_job(job):
    spec = job.options.spec()
    check_divides(job.calibration, spec.divisor, site=job.options.site)


def prepare_fgmp_job(job):
    check_divides(job.calibration, job.options.block_size, option="--block-size", backward=True)


def quant_error_job(job):
    o, spec = job.options, job.options.spec()
    result = quant_error(job.calibration, site=o.site, batch_size=o.batch_size, spec=spec)
    return _job_result(result, **_spec_facts(spec))


def top_token_error_job(job):
    o, spec = job.options, job.options.spec()
    result = top_token_error(job.calibration, top_k=o.top_k, min_occurrences=o.min_count, site=o.site,
                             batch_size=o.batch_size, spec=spec)
    return _job_result(result, **_spec_facts(spec))


def fisher_job(job):
    return _job_result(fisher(job.calibration, batch_size=job.options.batch_size))


def fgmp_job(job):
    o = job.options
    low, high = o.formats()
    result = fgmp(job.calibration, o.block_size, low.fmt, high.fmt, keep_frac=o.keep_frac, symmetric=o.symmetric,
                  batch_size=o.batch_size)
    return _job_result(result, low_format=low.fmt, high_format=high.fmt)


def _spec_facts(spec: QuantSpec) -> dict:
    return {"format": spec.fmt, "granularity": spec.granularity, "group_size": spec.group_size,
            "symmetric": spec.symmetric}


__all__ = [
    "GRANULARITIES", "QuantSpec", "quant_spec", "block_spec", "check_bits", "resolve_format", "check_divides",
    "ActivationQuantError", "ActivationQuantErrorSummary", "QuantErrorResult", "quant_error",
    "TokenQuantError", "TopTokenErrorResult", "top_token_error",
    "ActivationFisher", "ActivationFisherSummary", "FisherResult", "fisher",
    "FgmpSensitivity", "FgmpBlockSensitivity", "FgmpSummary", "FgmpResult", "fgmp",
]
