"""Per-module weight precision plans from measured sensitivity (``quant plan``), and their check
by fake quantization (``quant eval``, ``quant eval --sweep``). docs/quant.md has the details.

Plan
    1. Every selected linear module m and every candidate format f gets a size ``bits(m, f)``
       (integer bits, group scales included, see :func:`format_bits`) and a sensitivity
       ``s(m, f)`` (``--metric``; default ``kl``: the whole model's mean next-token
       KL(unquantized ‖ only m in format f), measured on the first ``--measure-windows``
       calibration windows; ``output``, the expected output error E_x ‖(W − Q_f(W)) x‖², is the
       one-pass alternative — measured on the embedded model, its plans lose to uniform ones).
    2. A multiple-choice knapsack (core/allocation.py) picks one format per module minimising
       Σ s(m, f_m) subject to Σ bits(m, f_m) <= floor(avg_bits × Σ params) — an integer bound,
       so the plan's average never exceeds the budget, not even by rounding.
    3. The plan is returned as a table, a JSON document (every module's format, sensitivity and
       size, plus every candidate's sensitivity so that ``quant eval --sweep`` can re-plan at
       other budgets without recalibrating) and an llm-compressor recipe (YAML).

Eval
    A plan (or a uniform / random one) is applied as fake quantization — round to nearest with
    the plan's group size, in fp32, by core/quant.py — through core/interventions.patched_weights;
    perplexity and KL(unquantized ‖ quantized) are read with core/readouts.py on evaluation
    windows; the weights are restored bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
import math
import random as _random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from ..core import progress
from ..core.allocation import allocate
from ..core.calibration import Calibration
from ..core.collect import Batch, collect
from ..core.data import eval_windows
from ..core.errors import LLMProbeError
from ..core.interventions import Patch, patched_weights
from ..core.loading import LoadedModel
from ..core.modulemap import LinearSite, ModuleMap, compile_regex
from ..core.quant import parse_format, quantize
from ..core.readouts import next_token_kl, nll_sum, top1_agreement, window_mean_loss
from ..core.records import Record

Tables = dict[str, list[Record]]

METRICS = ("output", "kl", "delta-loss", "fgmp", "alpha", "kurtosis")
DEFAULT_CANDIDATES = ("int2", "int3", "int4", "int5", "int6", "int8")
SCALE_BITS = 16            # every group scale is counted as one fp16 number
PLAN_FORMAT_VERSION = 1
_FLOAT_ELEMENT_BITS = {"fp16": 16, "bf16": 16, "fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4, "nf4": 4}
_UNSCALED = ("fp16", "bf16")     # plain casts: no scale stored
_NOT_CANDIDATES = ("fp32", "fp64")


# -- formats and sizes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """How every candidate format is applied: the group size (0 = one scale per output row)
    and, for integer formats, symmetric or asymmetric grids."""

    group_size: int = 128
    symmetric: bool = True

    def describe(self) -> str:
        groups = "per-channel" if self.group_size == 0 else f"group {self.group_size}"
        return f"{groups}, {'symmetric' if self.symmetric else 'asymmetric'}"


def check_scheme(group_size: int, symmetric: bool = True) -> Scheme:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise LLMProbeError(f"--group-size must be a non-negative integer (0 = per-channel); got {group_size!r}")
    return Scheme(group_size, bool(symmetric))


def parse_candidate(text: str, option: str = "--candidates") -> str:
    """'4' -> 'int4'; any core format name except fp32/fp64 (no quantization) is accepted."""
    raw = str(text).strip()
    if raw.isdigit():
        raw = f"int{raw}"
    try:
        fmt = parse_format(raw)
    except LLMProbeError as exc:
        raise LLMProbeError(f"{option}: {exc}") from None
    if fmt in _NOT_CANDIDATES:
        raise LLMProbeError(f"{option}: {fmt} is not a weight-quantization format; use fp16, bf16 or narrower")
    return fmt


def parse_candidates(candidates: str | Sequence[str] | None) -> list[str]:
    """Candidate formats, de-duplicated, sorted by element bits (narrowest first)."""
    if candidates is None:
        items: Sequence[str] = DEFAULT_CANDIDATES
    elif isinstance(candidates, str):
        items = [c for c in candidates.split(",") if c.strip()]
    else:
        items = list(candidates)
    if not items:
        raise LLMProbeError("--candidates is empty; give formats such as 2,3,4,8 or int4,nf4,fp8_e4m3")
    formats = []
    for item in items:
        fmt = parse_candidate(item)
        if fmt not in formats:
            formats.append(fmt)
    return sorted(formats, key=lambda f: (element_bits(f), f))


def element_bits(fmt: str) -> int:
    fmt = parse_format(fmt)
    if fmt.startswith("int"):
        return int(fmt[3:])
    if fmt in _FLOAT_ELEMENT_BITS:
        return _FLOAT_ELEMENT_BITS[fmt]
    return 32 if fmt == "fp32" else 64


def _groups(site_or_shape, scheme: Scheme, fmt: str) -> int:
    out_features, in_features = _shape(site_or_shape)
    if fmt in _UNSCALED:
        return 0
    if scheme.group_size == 0:
        if fmt == "nf4":  # nf4 has no per-channel form: core's default block of 64 is used
            return -(-out_features * in_features // 64)
        return out_features
    return out_features * in_features // scheme.group_size


def _shape(site_or_shape) -> tuple[int, int]:
    if isinstance(site_or_shape, LinearSite):
        return site_or_shape.out_features, site_or_shape.in_features
    out_features, in_features = site_or_shape
    return int(out_features), int(in_features)


def format_bits(site_or_shape, fmt: str, scheme: Scheme) -> int:
    """Exact storage of one [out, in] weight in ``fmt``, in bits: every element at the format's
    width, plus per group (per output row when group_size is 0) one 16-bit scale and, for
    asymmetric integer grids, one zero point of the element width (packed as GPTQ/AutoRound do).
    fp16/bf16 store no scale."""
    out_features, in_features = _shape(site_or_shape)
    params = out_features * in_features
    width = element_bits(fmt)
    per_group = SCALE_BITS + (width if fmt.startswith("int") and not scheme.symmetric else 0)
    return params * width + _groups((out_features, in_features), scheme, fmt) * per_group


def check_group_size(sites: Sequence[LinearSite], scheme: Scheme) -> None:
    if scheme.group_size == 0:
        return
    common = math.gcd(*[s.in_features for s in sites]) if sites else 0
    for site in sites:
        if site.in_features % scheme.group_size:
            fits = [g for g in (256, 128, 64, 32, 16, 8) if common % g == 0 and g < scheme.group_size]
            hint = f"e.g. {fits[0]}, " if fits else ""
            raise LLMProbeError(f"--group-size {scheme.group_size} does not divide the {site.in_features} input "
                                f"features of {site.name}; pick a divisor ({hint}or 0 for per-channel)")


def fake_quant(weight: torch.Tensor, fmt: str, scheme: Scheme) -> torch.Tensor:
    """Round-to-nearest fake quantization of an [out, in] weight (fp32 result), groups running
    along the input dimension as in GPTQ/AWQ checkpoints."""
    fmt = parse_format(fmt)
    if fmt in _UNSCALED:
        return quantize(weight, fmt)
    if scheme.group_size == 0:
        return quantize(weight, fmt, granularity="per-channel", symmetric=scheme.symmetric, axis=-1)
    return quantize(weight, fmt, granularity="per-group", group_size=scheme.group_size,
                    symmetric=scheme.symmetric, axis=-1)


def quantized_weight(site: LinearSite, fmt: str, scheme: Scheme) -> torch.Tensor:
    """Q(W) in the module's stored layout (Conv1D keeps [in, out]) and dtype."""
    q = fake_quant(site.weight(), fmt, scheme)
    if site.transposed:
        q = q.t()
    return q.to(site.module.weight.dtype)


# -- module selection and pins --------------------------------------------------------------


def parse_keep(keep: Sequence[str] | None) -> list[tuple[str, str]]:
    """'REGEX=FORMAT' items -> [(regex, format)]; the first matching item pins a module."""
    pins = []
    for item in keep or ():
        pattern, sep, fmt = str(item).rpartition("=")
        if not sep or not pattern:
            raise LLMProbeError(f"--keep {item!r}: write REGEX=FORMAT, e.g. 'mlp.down_proj=int8'")
        compile_regex(pattern)
        pins.append((pattern, parse_candidate(fmt, option="--keep")))
    return pins


def pinned_formats(sites: Sequence[LinearSite], pins: Sequence[tuple[str, str]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for pattern, fmt in pins:
        regex = compile_regex(pattern)
        hits = [s.name for s in sites if regex.search(s.name)]
        if not hits:
            raise LLMProbeError(f"--keep {pattern}={fmt}: no selected module matches '{pattern}'")
        for name in hits:
            result.setdefault(name, fmt)
    return result


def budget_bits(avg_bits: float | str | Fraction, params: int) -> int:
    """floor(avg_bits × params), computed exactly (the decimal the user typed, not its float)."""
    exact = Fraction(str(avg_bits)) if not isinstance(avg_bits, Fraction) else avg_bits
    return math.floor(exact * params)


def _options(sites: Sequence[LinearSite], candidates: Sequence[str], pins: Mapping[str, str]
             ) -> dict[str, list[str]]:
    return {s.name: [pins[s.name]] if s.name in pins else list(candidates) for s in sites}


def check_budget(sites: Sequence[LinearSite], options: Mapping[str, list[str]], scheme: Scheme,
                 avg_bits: float) -> int:
    """The budget in bits, or a one-line error when even the narrowest choice does not fit."""
    if not isinstance(avg_bits, (int, float, str, Fraction)) or isinstance(avg_bits, bool):
        raise LLMProbeError(f"--avg-bits must be a number; got {avg_bits!r}")
    try:
        value = Fraction(str(avg_bits))
    except (ValueError, ZeroDivisionError):
        raise LLMProbeError(f"--avg-bits must be a number; got {avg_bits!r}") from None
    if value <= 0:
        raise LLMProbeError(f"--avg-bits must be positive; got {avg_bits}")
    params = sum(s.in_features * s.out_features for s in sites)
    budget = budget_bits(value, params)
    floor = sum(min(format_bits(s, f, scheme) for f in options[s.name]) for s in sites)
    if budget < floor:
        narrowest = min((f for fs in options.values() for f in fs), key=element_bits)
        raise LLMProbeError(
            f"--avg-bits {avg_bits} is below the smallest plan possible: {floor / params:.4f} bits per parameter "
            f"({narrowest} everywhere allowed, {scheme.describe()} scales included)")
    return budget


# -- sensitivity metrics ---------------------------------------------------------------------


class _GramCollector:
    """Per key: G = Σ_t x_t x_tᵀ (fp64 accumulator) and the token count. Each batch's product is
    formed in fp32 in chunks of rows and added to the fp64 sum (fp64 matmuls are several times
    slower on CPU; the chunked fp32 partial sums keep the relative error near 1e-6)."""

    CHUNK_ROWS = 1024

    def __init__(self) -> None:
        self.gram: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def update(self, key: str, batch: Batch) -> None:
        x = batch.x
        if key not in self.gram:
            self.gram[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.tokens[key] = 0
        for start in range(0, x.shape[0], self.CHUNK_ROWS):
            part = x[start:start + self.CHUNK_ROWS]
            self.gram[key] += (part.t() @ part).double()
        self.tokens[key] += int(x.shape[0])


def output_error(delta: torch.Tensor, gram: torch.Tensor, tokens: int,
                 row_weights: torch.Tensor | None = None) -> float:
    """E_x ‖Δ x‖² = trace(Δ G Δᵀ) / T for Δ [out, in] and G = Σ x xᵀ over T tokens (fp64).
    With ``row_weights`` f (one per output): Σ_o f_o (Δ G Δᵀ)_oo / T."""
    d = delta.to(device=gram.device, dtype=torch.float64)
    per_row = ((d @ gram) * d).sum(dim=1)
    if row_weights is not None:
        per_row = per_row * row_weights.to(per_row)
    return float(per_row.sum()) / max(tokens, 1)


def _layer_chunks(sites: Sequence[LinearSite], layers_per_pass: int) -> list[list[LinearSite]]:
    if layers_per_pass <= 0:
        return [list(sites)]
    layers = sorted({s.layer for s in sites if s.layer is not None})
    chunks = []
    for start in range(0, len(layers), layers_per_pass):
        wanted = set(layers[start:start + layers_per_pass])
        chunks.append([s for s in sites if s.layer in wanted])
    rest = [s for s in sites if s.layer is None]
    if rest:
        chunks.append(rest)
    return [c for c in chunks if c]


def _output_fisher(calib: Calibration, sites: Sequence[LinearSite], batch_size: int) -> dict[str, torch.Tensor]:
    """Per module, the diagonal output Fisher f_o = mean over tokens of (∂L/∂y_o)², with L each
    window's mean next-token loss (summed over the windows of a batch)."""
    model = calib.lm.model
    sums = {s.name: torch.zeros(s.out_features, dtype=torch.float64) for s in sites}
    counts = {s.name: 0 for s in sites}
    handles = []
    flags = {p: p.requires_grad for p in model.parameters()}

    def tap(name: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                def grad_hook(grad):
                    g = grad.detach().reshape(-1, grad.shape[-1]).double()
                    sums[name] += (g * g).sum(dim=0).cpu()
                    counts[name] += g.shape[0]
                out.register_hook(grad_hook)
        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for s in sites:
            handles.append(s.module.register_forward_hook(tap(s.name)))
        embed = model.get_input_embeddings()
        handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        device = next(model.parameters()).device
        for start in range(0, calib.windows.shape[0], batch_size):
            ids = calib.windows[start:start + batch_size].to(device)
            with torch.enable_grad():
                window_mean_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def _sens_output(calib, sites, options, scheme, *, batch_size, layers_per_pass, fisher_weighted):
    fisher = _output_fisher(calib, sites, batch_size) if fisher_weighted else {}
    result: dict[str, dict[str, float]] = {}
    tokens_seen = 0
    for chunk in _layer_chunks(sites, layers_per_pass):
        grams = _GramCollector()
        key_sites = collect(calib.lm.model, calib.mmap, chunk, calib.windows, [grams], site="input",
                            token_filter=calib.token_filter, batch_size=batch_size, description="second moments")
        for key, members in key_sites.items():
            gram, tokens = grams.gram[key], grams.tokens[key]
            tokens_seen = max(tokens_seen, tokens)
            for site in members:
                weight = site.weight().float()
                result[site.name] = {
                    fmt: output_error(fake_quant(weight, fmt, scheme) - weight, gram, tokens, fisher.get(site.name))
                    for fmt in options[site.name]}
        del grams
    return result, tokens_seen


def _sens_measured(model, windows, sites, options, scheme, *, quantity: str):
    """Measured on the calibration windows, one module quantized at a time: the whole model's
    mean next-token KL(unquantized ‖ quantized) (``kl``) or the change of its mean next-token
    loss (``delta-loss``). The readout is the robustness one (analyses/robustness/readout.py):
    the unquantized run is done once and its block inputs are kept, so a module in block ℓ
    reruns blocks ℓ…end only. The loss change can be negative by chance (a small perturbation
    that happens to help these windows); KL is never negative and sees every position's whole
    distribution, which is why it is the steadier of the two."""
    from ..core.reference import Reference

    reference = Reference(model, list(windows))
    work = [(site, fmt) for site in sites for fmt in options[site.name]]
    # Quantized when the patch is entered (once per window), so at most one quantized copy of
    # a matrix exists at a time; the pairs of one block are read out together.
    readouts = reference.evaluate_many([
        (lambda site=site, fmt=fmt: patched_weights(
            model, [Patch(site.weight_name, "set", value=quantized_weight(site, fmt, scheme))]), site.layer)
        for site, fmt in work], description=quantity)
    result: dict[str, dict[str, float]] = {}
    for (site, fmt), readout in zip(work, readouts):
        value = readout.kl if quantity == "kl" else readout.mean_nll - reference.mean_nll
        result.setdefault(site.name, {})[fmt] = value
    return result


def _weight_fisher(calib: Calibration, sites: Sequence[LinearSite], batch_size: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of each selected weight, F = Σ_windows (∂L_w/∂W)², [out, in]."""
    model = calib.lm.model
    flags = {p: p.requires_grad for p in model.parameters()}
    weights = [s.module.weight for s in sites]
    fisher = {s.name: torch.zeros(s.out_features, s.in_features, dtype=torch.float64) for s in sites}
    device = weights[0].device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for start in range(0, calib.windows.shape[0]):
            ids = calib.windows[start:start + 1].to(device)
            with torch.enable_grad():
                loss = window_mean_loss(model(input_ids=ids, use_cache=False).logits, ids)
                grads = torch.autograd.grad(loss, weights)
            for s, g in zip(sites, grads):
                g = g.detach().double().cpu()
                fisher[s.name] += (g.t() if s.transposed else g) ** 2
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return fisher


def _sens_fgmp(calib, sites, options, scheme, *, batch_size):
    """FGMP-style (arXiv 2504.14152) Fisher-weighted weight error Σ_i F_i (Q(W)_i − W_i)², with the
    high-precision reference being the unquantized weight."""
    fisher = _weight_fisher(calib, sites, batch_size)
    result = {}
    for site in sites:
        weight = site.weight().float()
        result[site.name] = {
            fmt: float((fisher[site.name] * (fake_quant(weight, fmt, scheme) - weight).double() ** 2).sum())
            for fmt in options[site.name]}
    return result


def _sens_alpha(sites, options, scheme):
    """|α̂(Q(W)) − α̂(W)|: how far quantization moves the Alpha-Hill tail exponent of W's ESD
    (the precision sweep of seed 001, turned into a per-format cost)."""
    from ..core.spectral import alpha_hill, eigenvalues

    result = {}
    for site in progress.track(list(sites), "alpha", total=len(sites)):
        weight = site.weight().float()
        base = alpha_hill(eigenvalues(weight)[0]).alpha
        row = {}
        for fmt in options[site.name]:
            alpha = alpha_hill(eigenvalues(fake_quant(weight, fmt, scheme))[0]).alpha
            row[fmt] = abs(alpha - base) if math.isfinite(alpha) and math.isfinite(base) else 0.0
        result[site.name] = row
    return result


def _sens_kurtosis(sites, options):
    """Heuristic: Σ W² · (κ + 3) · 4^(−bits). Round-to-nearest error per element scales with
    (range / 2^bits)², and the range of a heavy-tailed weight (high excess kurtosis κ) is wide
    relative to its RMS; (κ + 3) = E[W⁴]/E[W²]² stands in for that."""
    result = {}
    for site in sites:
        w = site.weight().double()
        centred = w - w.mean()
        m2 = float((centred ** 2).mean())
        m4 = float((centred ** 4).mean())
        tail = m4 / (m2 * m2) if m2 > 0 else 3.0
        energy = float((w * w).sum())
        result[site.name] = {fmt: energy * tail * 4.0 ** (-element_bits(fmt)) for fmt in options[site.name]}
    return result


# -- records ---------------------------------------------------------------------------------


class QuantSensitivity(Record):
    """One module in one candidate format."""

    module: str
    layer: int | None
    role: str
    params: int
    format: str
    bits_per_param: float          # size_bits / params (group scales included)
    size_bits: int
    metric: str
    sensitivity: float
    chosen: bool                   # the plan picked this format for this module


class QuantPlanModule(Record):
    """The plan's choice for one module."""

    module: str
    layer: int | None
    role: str
    params: int
    format: str
    bits_per_param: float
    size_bits: int
    sensitivity: float
    pinned: bool                   # fixed by --keep


class QuantPlanSummary(Record):
    metric: str
    candidates: str                # ';'-separated
    group_size: int                # 0 = per-channel
    symmetric: bool
    modules: int
    params: int
    budget_avg_bits: float         # --avg-bits as given
    budget_bits: int               # floor(avg_bits × params)
    plan_bits: int                 # Σ size_bits of the plan (<= budget_bits)
    plan_avg_bits: float           # plan_bits / params
    total_sensitivity: float
    lower_bound: float             # proven lower bound on the optimum (== total for the exact solver)
    solver: str                    # "dp" (exact) or "lagrangian"
    formats: str                   # 'format:modules' counts, ';'-separated
    calibration_tokens: int | None


class QuantEvalResult(Record):
    """One plan evaluated against the unquantized model."""

    label: str
    kind: str                      # "plan" | "uniform" | "random" | "baseline"
    seed: int | None
    budget_avg_bits: float | None
    avg_bits: float
    modules: int
    params: int
    windows: int
    tokens: int
    ppl: float
    base_ppl: float
    delta_ppl: float
    mean_nll: float
    base_mean_nll: float
    kl_mean: float                 # mean over scored positions of KL(unquantized ‖ quantized), nats
    top1_agreement: float          # share of positions whose most likely next token is unchanged


# -- plan ------------------------------------------------------------------------------------


@dataclass
class PlanOutput:
    tables: Tables
    documents: dict[str, Any]      # "quant_plan" (JSON), "recipe" (YAML text)


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise LLMProbeError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    return metric


def plan(calib: Calibration, *, avg_bits: float, candidates: str | Sequence[str] | None = None,
         group_size: int = 128, symmetric: bool = True, metric: str = "kl", keep: Sequence[str] = (),
         fisher_weighted: bool = False, layers_per_pass: int = 0, batch_size: int = 1,
         solver: str = "auto", measure_windows: int = 4) -> PlanOutput:
    """Measure every selected module's sensitivity to every candidate and allocate formats under
    the bit budget (module docstring). Every option is validated before the model runs."""
    metric = _check_metric(metric)
    scheme = check_scheme(group_size, symmetric)
    formats = parse_candidates(candidates)
    sites = list(calib.sites)
    check_group_size(sites, scheme)
    pins = pinned_formats(sites, parse_keep(keep))
    options = _options(sites, formats, pins)
    budget = check_budget(sites, options, scheme, avg_bits)
    if fisher_weighted and metric != "output":
        raise LLMProbeError("--fisher-weighted applies to --metric output only")
    if isinstance(layers_per_pass, bool) or not isinstance(layers_per_pass, int) or layers_per_pass < 0:
        raise LLMProbeError(f"--layers-per-pass must be a non-negative integer; got {layers_per_pass!r}")
    if batch_size < 1:
        raise LLMProbeError(f"--batch-size must be at least 1; got {batch_size}")
    if isinstance(measure_windows, bool) or not isinstance(measure_windows, int) or measure_windows < 0:
        raise LLMProbeError(f"--measure-windows must be a non-negative integer; got {measure_windows!r}")

    tokens = None
    if metric == "output":
        sens, tokens = _sens_output(calib, sites, options, scheme, batch_size=batch_size,
                                    layers_per_pass=layers_per_pass, fisher_weighted=fisher_weighted)
    elif metric in ("kl", "delta-loss"):
        windows = calib.windows[:measure_windows] if measure_windows else calib.windows
        sens = _sens_measured(calib.lm.model, windows, sites, options, scheme, quantity=metric)
        tokens = int(windows.shape[0] * windows.shape[1])
    elif metric == "fgmp":
        sens = _sens_fgmp(calib, sites, options, scheme, batch_size=batch_size)
    elif metric == "alpha":
        sens = _sens_alpha(sites, options, scheme)
    else:
        sens = _sens_kurtosis(sites, options)
    label = metric + ("+fisher" if fisher_weighted else "")
    return build_plan(sites, sens, options, scheme, avg_bits=avg_bits, budget=budget, metric=label,
                      candidates=formats, pins=pins, calibration_tokens=tokens, solver=solver,
                      model=calib.lm.source.display if calib.lm.source is not None else "")


def build_plan(sites: Sequence[LinearSite], sensitivity: Mapping[str, Mapping[str, float]],
               options: Mapping[str, list[str]], scheme: Scheme, *, avg_bits, budget: int, metric: str,
               candidates: Sequence[str], pins: Mapping[str, str] | None = None,
               calibration_tokens: int | None = None, solver: str = "auto", model: str = "") -> PlanOutput:
    """Allocate from given sensitivities (no model run): tables, plan JSON and recipe."""
    pins = pins or {}
    costs = [[format_bits(s, f, scheme) for f in options[s.name]] for s in sites]
    values = [[float(sensitivity[s.name][f]) for f in options[s.name]] for s in sites]
    result = allocate(costs, values, budget, method=solver)
    chosen = {s.name: options[s.name][j] for s, j in zip(sites, result.choice)}
    params = sum(s.in_features * s.out_features for s in sites)

    sens_rows, plan_rows = [], []
    for site, cost_row, value_row in zip(sites, costs, values):
        n = site.in_features * site.out_features
        for fmt, cost, value in zip(options[site.name], cost_row, value_row):
            sens_rows.append(QuantSensitivity(
                module=site.name, layer=site.layer, role=site.role, params=n, format=fmt,
                bits_per_param=cost / n, size_bits=cost, metric=metric, sensitivity=value,
                chosen=fmt == chosen[site.name]))
        fmt = chosen[site.name]
        cost = format_bits(site, fmt, scheme)
        plan_rows.append(QuantPlanModule(
            module=site.name, layer=site.layer, role=site.role, params=n, format=fmt, bits_per_param=cost / n,
            size_bits=cost, sensitivity=float(sensitivity[site.name][fmt]), pinned=site.name in pins))
    counts: dict[str, int] = {}
    for row in plan_rows:
        counts[row.format] = counts.get(row.format, 0) + 1
    summary = QuantPlanSummary(
        metric=metric, candidates=";".join(candidates), group_size=scheme.group_size, symmetric=scheme.symmetric,
        modules=len(sites), params=params, budget_avg_bits=float(avg_bits), budget_bits=budget,
        plan_bits=result.cost, plan_avg_bits=result.cost / params, total_sensitivity=result.value,
        lower_bound=result.lower_bound, solver=result.method,
        formats=";".join(f"{f}:{counts[f]}" for f in sorted(counts, key=lambda f: (element_bits(f), f))),
        calibration_tokens=calibration_tokens)
    document = plan_document(sites, plan_rows, sens_rows, scheme, summary, model=model)
    return PlanOutput(
        tables={"quant_plan": plan_rows, "quant_sensitivity": sens_rows, "quant_plan_summary": [summary]},
        documents={"quant_plan": document, "recipe": recipe_yaml(plan_rows, scheme)})


def plan_document(sites, plan_rows, sens_rows, scheme: Scheme, summary: QuantPlanSummary, *, model: str = "") -> dict:
    by_site = {s.name: s for s in sites}
    opts: dict[str, dict[str, dict]] = {}
    for row in sens_rows:
        opts.setdefault(row.module, {})[row.format] = {"size_bits": row.size_bits, "sensitivity": row.sensitivity}
    modules = []
    for row in plan_rows:
        site = by_site[row.module]
        modules.append({"module": row.module, "layer": row.layer, "role": row.role, "params": row.params,
                        "out_features": site.out_features, "in_features": site.in_features,
                        "format": row.format, "bits_per_param": row.bits_per_param, "size_bits": row.size_bits,
                        "sensitivity": row.sensitivity, "pinned": row.pinned, "options": opts[row.module]})
    return {"llmprobe_quant_plan": PLAN_FORMAT_VERSION, "model": model, "metric": summary.metric,
            "candidates": summary.candidates.split(";"), "group_size": scheme.group_size,
            "symmetric": scheme.symmetric, "budget_avg_bits": summary.budget_avg_bits,
            "budget_bits": summary.budget_bits, "params": summary.params, "plan_bits": summary.plan_bits,
            "avg_bits": summary.plan_avg_bits, "total_sensitivity": summary.total_sensitivity,
            "solver": summary.solver, "modules": modules}


def _weights_scheme(fmt: str, scheme: Scheme) -> str | None:
    """The compressed-tensors ``weights:`` args of one format, or None when it has none."""
    if fmt.startswith("int"):
        kind, symmetric = "int", scheme.symmetric
    elif fmt in ("fp8_e4m3", "fp4_e2m1"):
        kind, symmetric = "float", True
    else:
        return None
    strategy = ("strategy: channel" if scheme.group_size == 0
                else f"strategy: group, group_size: {scheme.group_size}")
    return (f"{{num_bits: {element_bits(fmt)}, type: {kind}, symmetric: {str(symmetric).lower()}, "
            f"{strategy}}}")


def recipe_yaml(plan_rows: Sequence[QuantPlanModule], scheme: Scheme) -> str:
    """The plan as an llm-compressor recipe: one config group per format, each targeting its
    modules by anchored regex (``re:^name$``); fp16/bf16 modules go to ``ignore``. Formats
    compressed-tensors cannot express (nf4, fp8_e5m2) are listed in a comment and also ignored,
    so the recipe never quantizes a module to something other than the plan."""
    by_format: dict[str, list[str]] = {}
    for row in plan_rows:
        by_format.setdefault(row.format, []).append(row.module)
    ignore = ["lm_head"]
    lines = ["# llm-compressor recipe written by llmprobe quant plan (weights only, round-to-nearest;",
             "# swap QuantizationModifier for GPTQModifier to calibrate the same scheme).",
             "quant_stage:", "  quant_modifiers:", "    QuantizationModifier:"]
    groups = []
    unsupported = []
    for fmt in sorted(by_format, key=lambda f: (element_bits(f), f)):
        args = _weights_scheme(fmt, scheme)
        if args is None:
            if fmt not in _UNSCALED:
                unsupported.append(fmt)
            ignore.extend(by_format[fmt])
            continue
        groups.append((fmt, args, by_format[fmt]))
    if unsupported:
        lines.insert(2, f"# not expressible in compressed-tensors, left unquantized: {', '.join(unsupported)}")
    lines.append("      ignore: [" + ", ".join(_yaml_string(_target(n) if n != "lm_head" else n)
                                          for n in ignore) + "]")
    lines.append("      config_groups:")
    for index, (fmt, args, names) in enumerate(groups):
        lines.append(f"        group_{index}:  # {fmt}, {len(names)} modules")
        lines.append("          targets:")
        lines.extend(f"            - {_yaml_string(_target(n))}" for n in names)
        lines.append(f"          weights: {args}")
    return "\n".join(lines) + "\n"


def _target(module: str) -> str:
    return "re:^" + module.replace(".", r"\.") + "$"


def _yaml_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- plans to evaluate -----------------------------------------------------------------------


@dataclass
class AppliedPlan:
    """Formats to apply to named modules with one scheme, and how it was made."""

    label: str
    kind: str
    formats: dict[str, str]
    scheme: Scheme
    seed: int | None = None
    budget_avg_bits: float | None = None
    options: dict[str, dict[str, dict]] = field(default_factory=dict)   # from a plan file
    candidates: list[str] = field(default_factory=list)


def plan_from_document(doc: Mapping, label: str = "plan") -> AppliedPlan:
    """A plan JSON document (from ``quant plan``) read back, with every field checked."""
    if not isinstance(doc, Mapping) or doc.get("llmprobe_quant_plan") != PLAN_FORMAT_VERSION:
        raise LLMProbeError("--plan is not an llmprobe quant plan (missing 'llmprobe_quant_plan': 1)")
    try:
        scheme = check_scheme(int(doc["group_size"]), bool(doc["symmetric"]))
        formats, options = {}, {}
        for entry in doc["modules"]:
            formats[str(entry["module"])] = parse_candidate(entry["format"], option="--plan")
            options[str(entry["module"])] = {parse_candidate(f, option="--plan"): dict(v)
                                             for f, v in entry.get("options", {}).items()}
        candidates = [parse_candidate(c, option="--plan") for c in doc.get("candidates", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise LLMProbeError(f"--plan is malformed: {exc!r}") from None
    return AppliedPlan(label, "plan", formats, scheme, budget_avg_bits=doc.get("budget_avg_bits"),
                       options=options, candidates=candidates)


def load_plan(path) -> AppliedPlan:
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise LLMProbeError(f"--plan {path}: no such file")
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LLMProbeError(f"--plan {path}: not readable JSON ({exc})") from None
    return plan_from_document(doc)


def uniform_plan(sites: Sequence[LinearSite], fmt: str, scheme: Scheme) -> AppliedPlan:
    fmt = parse_candidate(fmt, option="--uniform")
    return AppliedPlan(f"uniform {fmt}", "uniform", {s.name: fmt for s in sites}, scheme)


def random_plan(sites: Sequence[LinearSite], candidates: Sequence[str], scheme: Scheme, *, avg_bits, seed: int,
                pins: Mapping[str, str] | None = None) -> AppliedPlan:
    """A random plan that fills the same budget: every module gets a random importance u
    (log-uniform over 1e-3..1e3) and the same solver allocates for s(m, f) = u_m · params_m ·
    4^(−bits_f). Random preferences, same budget use as a real plan."""
    pins = dict(pins or {})
    options = _options(sites, list(candidates), pins)
    budget = check_budget(sites, options, scheme, avg_bits)
    rng = _random.Random(seed)
    sens = {}
    for s in sites:
        importance = 10.0 ** rng.uniform(-3.0, 3.0)
        sens[s.name] = {f: importance * s.in_features * s.out_features * 4.0 ** (-element_bits(f))
                        for f in options[s.name]}
    costs = [[format_bits(s, f, scheme) for f in options[s.name]] for s in sites]
    values = [[sens[s.name][f] for f in options[s.name]] for s in sites]
    result = allocate(costs, values, budget)
    formats = {s.name: options[s.name][j] for s, j in zip(sites, result.choice)}
    return AppliedPlan(f"random seed {seed}", "random", formats, scheme, seed=seed, budget_avg_bits=float(avg_bits))


def replan(applied: AppliedPlan, sites: Sequence[LinearSite], avg_bits) -> AppliedPlan:
    """The plan file's own sensitivities re-allocated at another budget (pins kept as they were:
    a module with a single option stays at it)."""
    options = {s.name: list(applied.options[s.name]) for s in sites}
    budget = check_budget(sites, options, applied.scheme, avg_bits)
    costs = [[format_bits(s, f, applied.scheme) for f in options[s.name]] for s in sites]
    values = [[float(applied.options[s.name][f]["sensitivity"]) for f in options[s.name]] for s in sites]
    result = allocate(costs, values, budget)
    formats = {s.name: options[s.name][j] for s, j in zip(sites, result.choice)}
    return AppliedPlan(f"plan @{avg_bits}", "plan", formats, applied.scheme, budget_avg_bits=float(avg_bits))


def resolve_sites(mmap: ModuleMap, applied: AppliedPlan) -> list[LinearSite]:
    """The plan's modules in this model, checked: every name exists and the group size fits."""
    sites = []
    for name in applied.formats:
        try:
            sites.append(mmap.site(name))
        except LLMProbeError:
            raise LLMProbeError(f"the plan names module {name!r}, which this model does not have "
                                "(was the plan made for another model?)") from None
    check_group_size(sites, applied.scheme)
    return sites


def plan_bits(sites: Sequence[LinearSite], applied: AppliedPlan) -> tuple[int, int]:
    """(Σ size_bits, Σ params) of a plan."""
    bits = sum(format_bits(s, applied.formats[s.name], applied.scheme) for s in sites)
    return bits, sum(s.in_features * s.out_features for s in sites)


def quantized_weights(sites: Sequence[LinearSite], applied: AppliedPlan) -> list[Patch]:
    """One 'set' patch per module holding its fake-quantized weight (computed once per plan)."""
    return [Patch(s.weight_name, "set", value=quantized_weight(s, applied.formats[s.name], applied.scheme))
            for s in sites]


@contextlib.contextmanager
def applied(model: torch.nn.Module, patches: Sequence[Patch]) -> Iterator[None]:
    """The model with the plan's weights in place; restored bit for bit on exit."""
    with patched_weights(model, patches):
        yield


# -- eval ------------------------------------------------------------------------------------


class _Reference:
    """Unquantized logits per evaluation batch, kept while they fit in ``cache_mb`` and recomputed
    otherwise, so a sweep of many plans runs the unquantized model once when it can."""

    def __init__(self, model: torch.nn.Module, cache_mb: float):
        self.model = model
        self.budget = cache_mb * 2 ** 20
        self.used = 0
        self.cache: dict[int, torch.Tensor] = {}
        self.nll: dict[int, tuple[float, int]] = {}

    def fits(self, batch: torch.Tensor) -> bool:
        """Whether this batch's logits would still fit in the cache."""
        head = self.model.get_output_embeddings()
        if head is None:
            return False
        vocab = head.weight.shape[0]
        return self.used + batch.numel() * vocab * 4 <= self.budget

    def logits(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        if index in self.cache:
            return self.cache[index]
        with torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits.float()
        if index not in self.nll:
            self.nll[index] = nll_sum(logits, ids)
        size = logits.numel() * logits.element_size()
        if self.used + size <= self.budget:
            self.cache[index] = logits
            self.used += size
        return logits


def _batches(ids: torch.Tensor, seqlen: int, max_windows: int | None, batch_size: int) -> list[torch.Tensor]:
    windows = eval_windows(ids, seqlen, max_windows=max_windows)
    stacked = [w.input_ids for w in windows]
    return [torch.stack(stacked[i:i + batch_size]) for i in range(0, len(stacked), batch_size)]


def _evaluate(lm: LoadedModel, sites, applied_plan: AppliedPlan, batches, reference: _Reference) -> QuantEvalResult:
    model = lm.model
    device = next(model.parameters()).device
    patches = quantized_weights(sites, applied_plan)
    totals = {"nll": 0.0, "count": 0, "kl": 0.0, "agree": 0.0, "positions": 0}

    def score(ids: torch.Tensor, ref: torch.Tensor) -> None:
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits.float()
        s, n = nll_sum(logits, ids)
        totals["nll"] += s
        totals["count"] += n
        # The positions that predict a target (all but the last), as in the loss.
        kl = next_token_kl(ref[:, :-1], logits[:, :-1])
        totals["kl"] += float(kl.double().sum())
        totals["agree"] += float(top1_agreement(ref[:, :-1], logits[:, :-1]).double().sum())
        totals["positions"] += int(kl.numel())

    # Reference logits first (cached where they fit): batches whose reference is cached are
    # scored under one patch of the weights; the others swap the weights in and out per batch.
    refs = {index: reference.logits(index, batch.to(device)) for index, batch in enumerate(batches)
            if index in reference.cache or reference.fits(batch)}
    with applied(model, patches):
        for index, ref in refs.items():
            score(batches[index].to(device), ref)
    for index, batch in enumerate(batches):
        if index in refs:
            continue
        ids = batch.to(device)
        ref = reference.logits(index, ids)
        with applied(model, patches):
            score(ids, ref)
        del ref
    del patches, refs
    nll, count, kl_sum, agree_sum, positions = (totals[k] for k in ("nll", "count", "kl", "agree", "positions"))
    base_nll = sum(reference.nll[i][0] for i in range(len(batches)))
    base_count = sum(reference.nll[i][1] for i in range(len(batches)))
    bits, params = plan_bits(sites, applied_plan)
    mean, base_mean = nll / count, base_nll / base_count
    return QuantEvalResult(
        label=applied_plan.label, kind=applied_plan.kind, seed=applied_plan.seed,
        budget_avg_bits=applied_plan.budget_avg_bits, avg_bits=bits / params, modules=len(sites), params=params,
        windows=sum(int(b.shape[0]) for b in batches), tokens=count, ppl=math.exp(mean),
        base_ppl=math.exp(base_mean), delta_ppl=math.exp(mean) - math.exp(base_mean), mean_nll=mean,
        base_mean_nll=base_mean, kl_mean=kl_sum / positions, top1_agreement=agree_sum / positions)


def _check_eval_args(seqlen: int, max_windows: int | None, batch_size: int, cache_mb: float) -> None:
    if batch_size < 1:
        raise LLMProbeError(f"--batch-size must be at least 1; got {batch_size}")
    if cache_mb < 0:
        raise LLMProbeError(f"--reference-cache-mb must be non-negative; got {cache_mb}")
    if max_windows is not None and max_windows < 1:
        raise LLMProbeError(f"--max-windows must be at least 1; got {max_windows}")
    if seqlen < 2:
        raise LLMProbeError(f"--seqlen must be at least 2; got {seqlen}")


def evaluate(lm: LoadedModel, ids: torch.Tensor, plans: Sequence[AppliedPlan], *, seqlen: int = 512,
             max_windows: int | None = None, batch_size: int = 1, reference_cache_mb: float = 1024.0) -> Tables:
    """Perplexity and KL against the unquantized model for each plan (``quant eval``)."""
    _check_eval_args(seqlen, max_windows, batch_size, reference_cache_mb)
    if lm.max_length is not None and seqlen > lm.max_length:
        raise LLMProbeError(f"--seqlen {seqlen} is above this model's maximum of {lm.max_length} tokens")
    mmap = ModuleMap(lm.model)
    resolved = [(p, resolve_sites(mmap, p)) for p in plans]
    batches = _batches(ids, seqlen, max_windows, batch_size)
    reference = _Reference(lm.model, reference_cache_mb)
    rows = [_evaluate(lm, sites, p, batches, reference)
            for p, sites in progress.track(resolved, "quant eval", total=len(resolved))]
    return {"quant_eval": rows}


def sweep_budgets(sites: Sequence[LinearSite], candidates: Sequence[str], scheme: Scheme) -> list[float]:
    """Default sweep: each candidate's uniform average (rounded down to 4 decimals so the uniform
    plan fits) strictly between the narrowest and widest, plus the midpoints of neighbours."""
    params = sum(s.in_features * s.out_features for s in sites)
    points = sorted({sum(format_bits(s, f, scheme) for s in sites) / params for f in candidates})
    budgets = set()
    for low, high in zip(points, points[1:]):
        budgets.add(math.floor((low + high) / 2 * 1e4) / 1e4)
        if high != points[-1]:
            budgets.add(math.floor(high * 1e4) / 1e4)
    return sorted(budgets)


def sweep(lm: LoadedModel, ids: torch.Tensor, base: AppliedPlan, *, budgets: Sequence[float] | None = None,
          seeds: Sequence[int] = (0, 1, 2, 3, 4), seqlen: int = 512, max_windows: int | None = None,
          batch_size: int = 1, reference_cache_mb: float = 1024.0) -> Tables:
    """The plan's sensitivities re-allocated at each budget, every uniform candidate plan, and
    random plans (one per seed) at each budget: perplexity and KL against average bits."""
    _check_eval_args(seqlen, max_windows, batch_size, reference_cache_mb)
    if not base.options or any(not base.options.get(n) for n in base.formats):
        raise LLMProbeError("--sweep needs a plan file from 'quant plan' (it re-plans from the stored sensitivities)")
    mmap = ModuleMap(lm.model)
    sites = resolve_sites(mmap, base)
    candidates = base.candidates or sorted({f for o in base.options.values() for f in o}, key=element_bits)
    pins = {n: next(iter(o)) for n, o in base.options.items() if len(o) == 1}
    budgets = list(budgets) if budgets else sweep_budgets(sites, candidates, base.scheme)
    if not budgets:
        raise LLMProbeError("--sweep needs at least two candidate formats (or explicit --budgets)")
    plans = [uniform_plan(sites, f, base.scheme) for f in candidates]
    for p in plans:
        p.formats.update(pins)
    for b in budgets:
        plans.append(replan(base, sites, b))
        plans.extend(random_plan(sites, candidates, base.scheme, avg_bits=b, seed=s, pins=pins) for s in seeds)
    tables = evaluate(lm, ids, plans, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                      reference_cache_mb=reference_cache_mb)
    return {"quant_sweep": tables["quant_eval"]}


# -- terminal summaries ----------------------------------------------------------------------


def plan_summary_lines(tables: Tables, top: int = 5) -> list[str]:
    """What `quant plan` prints: budget vs achieved, objective, solver, format counts, and the
    modules that cost most at the narrowest candidate."""
    s = tables["quant_plan_summary"][0]
    gap = "" if s.solver == "dp" else f" (lower bound {s.lower_bound:.6g})"
    lines = [f"plan: {s.plan_avg_bits:.4f} bits/param for a budget of {s.budget_avg_bits:g} "
             f"({s.plan_bits} of {s.budget_bits} bits, {s.modules} modules, {s.params} params)",
             f"total {s.metric} sensitivity {s.total_sensitivity:.6g}{gap}, solver {s.solver}",
             f"formats: {s.formats.replace(';', ', ')}"]
    narrowest = s.candidates.split(";")[0]
    worst = sorted((r for r in tables["quant_sensitivity"] if r.format == narrowest),
                   key=lambda r: -r.sensitivity)[:top]
    if worst:
        lines.append(f"most sensitive at {narrowest}: " + ", ".join(f"{r.module} ({r.sensitivity:.3g})" for r in worst))
    return lines


def eval_summary_lines(rows: Sequence[QuantEvalResult]) -> list[str]:
    """What `quant eval` prints: one line per plan; for a sweep, per budget the plan against the
    random plans and the uniform plan of the same size."""
    if not rows:
        return []
    lines = [f"unquantized ppl {rows[0].base_ppl:.4f} on {rows[0].windows} windows ({rows[0].tokens} tokens)"]
    budgets = sorted({r.budget_avg_bits for r in rows if r.kind == "plan" and r.budget_avg_bits is not None})
    if budgets and (len(budgets) > 1 or any(r.kind == "random" for r in rows)):
        for b in budgets:
            planned = [r for r in rows if r.kind == "plan" and r.budget_avg_bits == b][0]
            randoms = sorted(r.ppl for r in rows if r.kind == "random" and r.budget_avg_bits == b)
            uniform = [r for r in rows if r.kind == "uniform" and r.avg_bits <= b]
            line = f"@{b:g} bits: plan ppl {planned.ppl:.3f} ({planned.avg_bits:.4f} bits, KL {planned.kl_mean:.4f})"
            if randoms:
                middle = randoms[len(randoms) // 2]
                line += f"; random best/median/worst {randoms[0]:.3f}/{middle:.3f}/{randoms[-1]:.3f}"
            if uniform:
                u = max(uniform, key=lambda r: r.avg_bits)
                line += f"; {u.label} {u.ppl:.3f} ({u.avg_bits:.4f} bits)"
            lines.append(line)
        return lines
    for r in rows:
        lines.append(f"{r.label}: {r.avg_bits:.4f} bits/param, ppl {r.ppl:.4f} ({r.delta_ppl:+.4f}), "
                     f"KL {r.kl_mean:.5f}, top-1 agreement {r.top1_agreement:.4f}")
    return lines


# -- the `quant eval` entry point ------------------------------------------------------------


def parse_budgets(budgets: str | Sequence[float] | None) -> list[float] | None:
    if budgets is None or budgets == "" or budgets == []:
        return None
    items = budgets.split(",") if isinstance(budgets, str) else list(budgets)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise LLMProbeError(f"--budgets: {item!r} is not a number of bits") from None
        if not value > 0:
            raise LLMProbeError(f"--budgets: {item!r} must be positive")
        values.append(value)
    return sorted(set(values))


def eval_plans(lm: LoadedModel, ids: torch.Tensor, *, plan_path=None, uniform: str | None = None,
               random: bool = False, avg_bits: float | None = None, seed: int = 0,
               candidates: str | Sequence[str] | None = None, group_size: int = 128, symmetric: bool = True,
               roles: Sequence[str] | None = None, layers: Sequence[int] | None = None, regex: str | None = None,
               sweep_budgets_: str | Sequence[float] | None = None, do_sweep: bool = False,
               seeds: Sequence[int] = (0, 1, 2, 3, 4), seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 1, reference_cache_mb: float = 1024.0) -> Tables:
    """``quant eval``: exactly one of ``plan_path`` / ``uniform`` / ``random``; ``do_sweep`` with a
    plan. Returns ``{"quant_eval": rows}`` or, for a sweep, ``{"quant_sweep": rows}``."""
    chosen = [name for name, on in (("--plan", plan_path is not None), ("--uniform", uniform is not None),
                                    ("--random", bool(random))) if on]
    if len(chosen) != 1:
        raise LLMProbeError("give exactly one of --plan PATH, --uniform FORMAT or --random"
                            + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if do_sweep and plan_path is None:
        raise LLMProbeError("--sweep needs --plan (a plan file from 'quant plan')")
    budgets = parse_budgets(sweep_budgets_)
    if budgets and not do_sweep:
        raise LLMProbeError("--budgets only applies with --sweep")
    if do_sweep and not seeds:
        raise LLMProbeError("--seeds is empty; give at least one seed for the random plans")
    _check_eval_args(seqlen, max_windows, batch_size, reference_cache_mb)
    if plan_path is not None:
        base = load_plan(plan_path)
        if do_sweep:
            return sweep(lm, ids, base, budgets=budgets, seeds=seeds, seqlen=seqlen, max_windows=max_windows,
                         batch_size=batch_size, reference_cache_mb=reference_cache_mb)
        return evaluate(lm, ids, [base], seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                        reference_cache_mb=reference_cache_mb)
    if uniform is not None:
        uniform = parse_candidate(uniform, option="--uniform")
    elif avg_bits is None:
        raise LLMProbeError("--random needs --avg-bits")
    else:
        formats = parse_candidates(candidates)
    scheme = check_scheme(group_size, symmetric)
    sites = ModuleMap(lm.model).select(roles=roles or None, layers=layers or None, regex=regex)
    if not sites:
        raise LLMProbeError("no linear module matches the given --roles/--layers/--filter")
    check_group_size(sites, scheme)
    if uniform is not None:
        chosen_plan = uniform_plan(sites, uniform, scheme)
    else:
        chosen_plan = random_plan(sites, formats, scheme, avg_bits=avg_bits, seed=seed)
    return evaluate(lm, ids, [chosen_plan], seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                    reference_cache_mb=reference_cache_mb)


# -- job adapters (llmprobe.catalog.quant) -----------------------------------------------------


def plan_job(job):
    from ..core.output import atomic_write_text
    from ..session import Result

    o = job.options
    out = plan(job.calibration, avg_bits=o.avg_bits, candidates=o.candidates, group_size=o.group_size,
               symmetric=o.symmetric, metric=o.metric, keep=o.keep or (), fisher_weighted=o.fisher_weighted,
               layers_per_pass=o.layers_per_pass, batch_size=o.batch_size, solver=o.solver,
               measure_windows=o.measure_windows)
    if job.run is not None:
        atomic_write_text(job.run.path("recipe.yaml"), out.documents["recipe"])
    return Result(tables=out.tables, documents={"quant_plan": out.documents["quant_plan"]},
                  notes=plan_summary_lines(out.tables)[2:], data={"recipe": out.documents["recipe"]})


def eval_job(job):
    from ..session import Result

    o = job.options
    _, ids = job.evaluation
    seeds = [int(s) for s in str(o.seeds).split(",") if s.strip()] if o.seeds else []
    tables = eval_plans(job.lm, ids, plan_path=o.plan, uniform=o.uniform, random=o.random, avg_bits=o.avg_bits,
                        seed=o.seed, candidates=o.candidates, group_size=o.group_size, symmetric=o.symmetric,
                        roles=o.roles, layers=o.layer_list(), regex=o.filter, sweep_budgets_=o.budgets,
                        do_sweep=o.sweep, seeds=seeds, seqlen=o.seqlen, max_windows=o.max_windows,
                        batch_size=o.batch_size, reference_cache_mb=o.reference_cache_mb)
    rows = next(iter(tables.values()))
    return Result(tables=tables, notes=eval_summary_lines(rows))
