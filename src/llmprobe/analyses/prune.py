"""Pruning: magnitude, Wanda and SparseGPT (unstructured or N:M), layer by layer, with OWL's
non-uniform allocation as an option; and Wanda's per-layer metric for one matrix.

``prune_run`` (``llmprobe prune run``)
    1. Perplexity of the dense model on the evaluation windows (when given).
    2. For wanda / sparsegpt, *layer-sequential calibration* as both papers: the calibration
       windows' inputs to block 0 are captured, then block l is moved to the compute device,
       run once over the stored hidden states with hooks that accumulate, per input group
       (q/k/v share one), the Gram matrix G = sum_t x_t x_t^T (fp32; only its diagonal when the
       reconstruction error is off and the method is wanda); every selected matrix of the block
       is pruned from those statistics (all matrices of a block are calibrated on the same pass
       of the *dense* block, as in both reference implementations); the pruned block is run
       again and its outputs become block l+1's inputs. One block at a time lives on the
       device; the rest of the model stays where it was loaded.
       Magnitude needs no data: each matrix is pruned from |W| alone.
    3. Pruned weights are written through ``core.interventions.patched_weights`` (restored bit
       for bit when the function returns, ``restore=True``, the default) or, with
       ``restore=False``, in place for good (no host copy of the original weights: the model
       object must not be reused as dense afterwards).
    4. The pruned model is saved as a Hugging Face folder (``save_dir``), the masks optionally
       (``mask_path``), and perplexity is measured again.

Numbers, per pruned matrix: target and achieved sparsity (achieved = exact zeros in the
written weight / its size), N:M validity, and for wanda/sparsegpt the layer reconstruction
error ||W X - W' X||^2 / ||W X||^2 over the calibration inputs X the matrix saw (computed from
G, see ``core.pruning.reconstruction_error``).

``layer_metrics`` (``llmprobe prune layer-metrics``)
    |W|, the per-input-channel activation norm sqrt(s_j) with s_j = mean over calibration
    tokens of x_j^2 (the RMS of input feature j), and the Wanda score |W_ij| * sqrt(s_j): their
    statistics, histograms and max-pooled heatmaps for one linear module of the dense model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import progress
from ..core.blockwise import BlockInputs, capture_block_inputs, on_device, run_block
from ..core.errors import LLMProbeError
from ..core.interventions import Patch, forward_hooks, patched_weights
from ..core.loading import LoadedModel
from ..core.modulemap import LinearSite, ModuleMap
from ..core.pruning import (
    check_sparsity,
    magnitude_mask,
    nm_valid,
    parse_nm,
    reconstruction_error,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from ..core.records import Record
from .perplexity import PerplexityResult, perplexity

Tables = dict[str, list[Record]]

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")
SCOPES = ("matrix", "row")
# OWL (arXiv 2310.05175): a weight is an outlier when its Wanda score exceeds M times the mean
# score of its layer; per-layer sparsities spread over [S - lambda, S + lambda]. The paper's
# LLaMA settings are M = 5, lambda = 0.08 (it tunes both per model).
OWL_M = 5.0
OWL_LAMBDA = 0.08
# OWL may push a layer's sparsity past these bounds for extreme S and lambda; it is clipped.
MAX_LAYER_SPARSITY = 0.99


# -- records ---------------------------------------------------------------------------------


class PrunedMatrix(Record):
    """One pruned weight matrix."""

    module: str
    layer: int
    role: str
    out_features: int
    in_features: int
    method: str
    pattern: str                       # "unstructured" or "N:M"
    target_sparsity: float             # the layer's target (OWL: per layer), N/M for N:M
    achieved_sparsity: float           # exact zeros in the written weight / its size
    zeros: int
    nm_valid: bool | None              # every M-group of every row has >= N zeros (N:M only)
    reconstruction_error: float | None  # ||WX - W'X||^2 / ||WX||^2 on the calibration inputs
    calibration_tokens: int | None


class PrunedLayer(Record):
    """One decoder block: its selected matrices together."""

    layer: int
    matrices: int
    params: int
    target_sparsity: float
    achieved_sparsity: float
    outlier_ratio: float | None        # OWL: share of Wanda scores > M x layer mean (0-1)


class PrunePerplexity(PerplexityResult):
    """Perplexity before (``stage='dense'``) and after (``'pruned'``) pruning."""

    stage: str


class PruneSummary(Record):
    method: str
    pattern: str
    allocation: str
    scope: str | None
    target_sparsity: float             # S, or N/M
    achieved_sparsity: float           # zeros / params over the pruned matrices
    matrices: int
    params: int
    zeros: int
    calibration_windows: int | None
    calibration_seqlen: int | None
    mean_reconstruction_error: float | None
    ppl_dense: float | None
    ppl_pruned: float | None
    prune_seconds: float
    saved_to: str | None


class LayerMetricStat(Record):
    """Statistics of one quantity of ``prune layer-metrics``."""

    module: str
    quantity: str                      # weight_abs | activation_norm | wanda_score
    shape: str
    count: int
    mean: float
    std: float                         # population std (ddof=0)
    min: float
    p01: float
    p25: float
    median: float
    p75: float
    p99: float
    max: float


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneSpec:
    method: str
    sparsity: float                    # unstructured target (0 when N:M)
    nm: tuple[int, int] | None
    scope: str                         # magnitude only: matrix | row
    allocation: str
    owl_m: float
    owl_lambda: float
    percdamp: float
    blocksize: int

    @property
    def pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"

    @property
    def target(self) -> float:
        return self.nm[0] / self.nm[1] if self.nm else self.sparsity

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt") or self.allocation == "owl"


def check_options(method: str, sparsity: float | None = None, nm: str | tuple[int, int] | None = None, *,
                  scope: str = "matrix", allocation: str = "uniform", owl_m: float = OWL_M,
                  owl_lambda: float = OWL_LAMBDA, percdamp: float = 0.01, blocksize: int = 128) -> PruneSpec:
    """Validate every pruning option (before any work) and return them as one spec."""
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LLMProbeError(f"unknown --method '{method}'{hint}; use one of {', '.join(METHODS)}")
    if (sparsity is None) == (nm is None):
        raise LLMProbeError("give exactly one of --sparsity S (unstructured) or --nm N:M")
    parsed_nm = parse_nm(nm) if nm is not None else None
    target = check_sparsity(sparsity) if sparsity is not None else 0.0
    if scope not in SCOPES:
        raise LLMProbeError(f"unknown --scope '{scope}'; use one of {', '.join(SCOPES)}")
    if allocation not in ALLOCATIONS:
        raise LLMProbeError(f"unknown --allocation '{allocation}'; use one of {', '.join(ALLOCATIONS)}")
    if allocation == "owl" and parsed_nm is not None:
        raise LLMProbeError("--allocation owl sets a sparsity per layer; it needs --sparsity, not --nm")
    if not (isinstance(owl_m, (int, float)) and math.isfinite(owl_m) and owl_m > 0):
        raise LLMProbeError(f"--owl-m must be a positive number; got {owl_m!r}")
    if not (isinstance(owl_lambda, (int, float)) and 0 <= owl_lambda < 1):
        raise LLMProbeError(f"--owl-lambda must be in [0, 1); got {owl_lambda!r}")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise LLMProbeError(f"--percdamp must be a number >= 0; got {percdamp!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise LLMProbeError(f"--blocksize must be a positive integer; got {blocksize!r}")
    if parsed_nm is not None and method == "sparsegpt" and blocksize % parsed_nm[1]:
        raise LLMProbeError(f"--blocksize {blocksize} must be a multiple of M={parsed_nm[1]} for --nm "
                            f"{parsed_nm[0]}:{parsed_nm[1]}")
    return PruneSpec(method, target, parsed_nm, scope, allocation, float(owl_m), float(owl_lambda),
                     float(percdamp), int(blocksize))


def select_sites(mmap: ModuleMap, roles: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                 regex: str | None = None, nm: tuple[int, int] | None = None) -> list[LinearSite]:
    """The linears to prune: by default every linear inside the decoder blocks (embeddings and
    the output head are never pruned)."""
    if not mmap.blocks:
        raise LLMProbeError("this model has no decoder blocks; nothing to prune")
    sites = [s for s in mmap.select(roles=roles or None, layers=layers or None, regex=regex)
             if s.layer is not None and s.role != "lm_head"]
    if not sites:
        raise LLMProbeError("no linear module inside the decoder blocks matches the given --roles/--layers/--filter")
    if nm is not None:
        bad = [s for s in sites if s.in_features % nm[1]]
        if bad:
            raise LLMProbeError(f"--nm {nm[0]}:{nm[1]}: {bad[0].name} has {bad[0].in_features} inputs, "
                                f"not a multiple of {nm[1]}")
    return sites


def resolve_site(mmap: ModuleMap, name: str) -> LinearSite:
    """The linear module called ``name``, or a one-line error listing the closest names."""
    key = name.removesuffix(".weight")
    for site in mmap.linears:
        if site.name == key:
            return site
    names = [site.name for site in mmap.linears]
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
    if close:
        raise LLMProbeError(f"no linear module named '{name}'; closest: {', '.join(close)}")
    raise LLMProbeError(f"no linear module named '{name}'; linear modules look like: {', '.join(names[:4])}")


# -- statistics collected per block ----------------------------------------------------------


class _GroupStats:
    """Running input statistics of one input group: sum of x x^T (or only sum of x^2) and the
    token count. fp32, on the device the block runs on, as SparseGPT's H."""

    def __init__(self, features: int, device: torch.device, gram: bool):
        self.tokens = 0
        self.gram = torch.zeros(features, features, device=device) if gram else None
        self.sq_sum = None if gram else torch.zeros(features, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += int(x.shape[0])
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)
        else:
            self.sq_sum += (x * x).sum(dim=0)

    def squares(self) -> torch.Tensor:
        return torch.diagonal(self.gram).clone() if self.gram is not None else self.sq_sum


def _relative_names(block: torch.nn.Module) -> dict[int, str]:
    """Module id -> name inside ``block`` (hooks and patches are addressed relative to the
    block, so each lookup walks one block, not the whole model)."""
    return {id(module): name for name, module in block.named_modules()}


@contextlib.contextmanager
def _collecting(block: torch.nn.Module, sites: Sequence[LinearSite], device: torch.device, gram: bool):
    """Pre-hooks on the first module of each input group; yields {input_group: _GroupStats}."""
    names = _relative_names(block)
    stats: dict[str, _GroupStats] = {}
    hooks = {}
    for site in sites:
        if site.input_group in stats:
            continue
        group = _GroupStats(site.in_features, device, gram)
        stats[site.input_group] = group

        def hook(_module, args, group=group):
            group.update(args[0].detach())

        hooks[names[id(site.module)]] = hook
    with forward_hooks(block, hooks, pre=True):
        yield stats


# -- pruning one matrix ----------------------------------------------------------------------


def _prune_matrix(spec: PruneSpec, weight: torch.Tensor, sparsity: float,
                  stats: _GroupStats | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight [out, in] fp32, prune mask) for one matrix."""
    if spec.method == "magnitude":
        mask = magnitude_mask(weight, sparsity=sparsity, nm=spec.nm, scope=spec.scope)
        return weight.float().masked_fill(mask, 0.0), mask
    if spec.method == "wanda":
        mask = wanda_mask(weight, stats.squares(), sparsity=sparsity, nm=spec.nm)
        return weight.float().masked_fill(mask, 0.0), mask
    hessian = stats.gram * (2.0 / max(stats.tokens, 1))
    return sparsegpt_prune(weight, hessian, sparsity=sparsity, nm=spec.nm, blocksize=spec.blocksize,
                           percdamp=spec.percdamp)


def _param_layout(site: LinearSite, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] -> how the module stores it (Conv1D keeps [in, out])."""
    weight = weight.to(dtype)
    return weight.t().contiguous() if site.transposed else weight


class _Writer:
    """Writes one block's pruned weights: through ``patched_weights`` (undone when the run
    ends) or in place."""

    def __init__(self, stack: contextlib.ExitStack, restore: bool):
        self.stack, self.restore = stack, restore

    def write(self, block: torch.nn.Module, pruned: Sequence[tuple[LinearSite, torch.Tensor]]) -> None:
        names = _relative_names(block)
        patches = []
        for site, new in pruned:
            param = site.module.weight
            value = _param_layout(site, new.to(param.device), param.dtype)
            if self.restore:
                patches.append(Patch(f"{names[id(site.module)]}.weight", "set", value=value))
            else:
                # Permanent pruning (restore=False): no copy of the dense weights is kept, which
                # is what keeps host memory at one model. The caller owns a model it will not
                # reuse as dense.
                with torch.no_grad():
                    param.data.copy_(value)
        if patches:
            self.stack.enter_context(patched_weights(block, patches))


# -- OWL -------------------------------------------------------------------------------------


def owl_sparsities(outlier_ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """OWL's per-layer sparsities: ratios min-max scaled to [0, 2*lam], centred on their mean,
    layer sparsity = S - (scaled - mean(scaled)); more outliers -> lower sparsity. The plain
    mean over layers equals S (before clipping to [0, 0.99])."""
    r = np.asarray(outlier_ratios, dtype=np.float64)
    if r.size == 0 or r.max() == r.min():
        return [float(sparsity)] * int(r.size)
    scaled = (r - r.min()) / (r.max() - r.min()) * (2 * lam)
    layer = sparsity - (scaled - scaled.mean())
    return [float(min(max(v, 0.0), MAX_LAYER_SPARSITY)) for v in layer]


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of the scores (all matrices of a layer together) above m times their mean."""
    flat = torch.cat([s.flatten().double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


@torch.no_grad()
def _owl_ratios(lm: LoadedModel, mmap: ModuleMap, by_layer: dict[int, list[LinearSite]], inputs: BlockInputs,
                device: torch.device, m: float) -> dict[int, float]:
    """Outlier ratio of each selected layer on the dense model (OWL measures before pruning)."""
    ratios: dict[int, float] = {}
    last = max(by_layer)
    for index, block in enumerate(progress.track(mmap.blocks[:last + 1], "owl outlier ratios")):
        sites = by_layer.get(index, [])
        with on_device(block, device):
            with _collecting(block, sites, device, gram=False) as stats:
                outputs = run_block(block, inputs)
            if sites:
                ratios[index] = outlier_ratio(
                    [wanda_scores(s.weight(), stats[s.input_group].squares()) for s in sites], m)
        inputs.hidden = outputs
    return ratios


# -- the run ---------------------------------------------------------------------------------


def _evaluate(lm: LoadedModel, ids: torch.Tensor, *, seqlen: int, max_windows: int | None, dataset: str,
              device: torch.device, stage: str) -> PrunePerplexity:
    with on_device(lm.model, device):
        result = perplexity(dataclasses.replace(lm, device=device), ids, seqlen=seqlen,
                            max_windows=max_windows, dataset=dataset)
    return PrunePerplexity(**result.model_dump(), stage=stage)


def save_pruned_model(lm: LoadedModel, save_dir: Path, info: dict[str, Any]) -> Path:
    """Config, safetensors weights, generation config and tokenizer, as ``from_pretrained`` reads
    them, plus ``llmprobe-prune.json`` (how it was pruned)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(save_dir, safe_serialization=True)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(save_dir)
    generation = getattr(lm.model, "generation_config", None)
    if generation is not None and not (save_dir / "generation_config.json").is_file():
        generation.save_pretrained(save_dir)
    (save_dir / "llmprobe-prune.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return save_dir


def prune_run(lm: LoadedModel, *, method: str, sparsity: float | None = None, nm: str | None = None,
              roles: Sequence[str] | None = None, layers: Sequence[int] | None = None, regex: str | None = None,
              windows: torch.Tensor | None = None, scope: str = "matrix", allocation: str = "uniform",
              owl_m: float = OWL_M, owl_lambda: float = OWL_LAMBDA, percdamp: float = 0.01,
              blocksize: int = 128, reconstruction: bool = True, eval_ids: torch.Tensor | None = None,
              eval_seqlen: int | None = None, max_windows: int | None = None, eval_dataset: str = "",
              device: str | torch.device | None = None, batch_size: int = 8, save_dir: str | Path | None = None,
              mask_path: str | Path | None = None, restore: bool = True, evaluate_dense: bool = True,
              calibration_info: dict | None = None) -> tuple[Tables, dict[str, Any]]:
    """Prune ``lm`` (see the module docstring) and return its tables and a JSON document.

    ``windows``: calibration token ids [nsamples, seqlen] (needed by wanda, sparsegpt and OWL).
    ``eval_ids``: the 1-D evaluation token stream; perplexity before/after is skipped without it.
    ``device``: where each block is computed (default: where the model is).
    ``restore``: undo the pruning before returning (the weights come back bit for bit); False
    prunes ``lm.model`` for good and keeps no copy of the dense weights.
    ``evaluate_dense``: also measure the dense model's perplexity first (skip it when it is
    already known, e.g. in a sweep over methods).
    """
    spec = check_options(method, sparsity, nm, scope=scope, allocation=allocation, owl_m=owl_m,
                         owl_lambda=owl_lambda, percdamp=percdamp, blocksize=blocksize)
    mmap = ModuleMap(lm.model)
    sites = select_sites(mmap, roles, layers, regex, spec.nm)
    if spec.needs_calibration and windows is None:
        raise LLMProbeError(f"--method {spec.method}{' with --allocation owl' if spec.allocation == 'owl' else ''} "
                            f"needs calibration windows (--dataset)")
    if windows is not None and (windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2):
        raise LLMProbeError(f"calibration windows must be [nsamples, seqlen>=2] token ids; got {tuple(windows.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise LLMProbeError(f"--batch-size must be a positive integer; got {batch_size!r}")
    if eval_ids is not None and eval_seqlen is None:
        raise LLMProbeError("--eval-seqlen is needed with evaluation data")
    compute = torch.device(device) if device is not None else next(lm.model.parameters()).device
    by_layer: dict[int, list[LinearSite]] = {}
    for site in sites:
        by_layer.setdefault(site.layer, []).append(site)

    ppl_rows: list[PrunePerplexity] = []
    evaluate = eval_ids is not None
    if evaluate and evaluate_dense:
        ppl_rows.append(_evaluate(lm, eval_ids, seqlen=eval_seqlen, max_windows=max_windows, dataset=eval_dataset,
                                  device=compute, stage="dense"))

    started = time.perf_counter()
    matrices: list[PrunedMatrix] = []
    layer_rows: list[PrunedLayer] = []
    masks: dict[str, torch.Tensor] = {}
    layer_target = {index: spec.sparsity for index in by_layer}
    ratios: dict[int, float] = {}
    docs: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        writer = _Writer(stack, restore)
        if spec.allocation == "owl":
            inputs = capture_block_inputs(lm.model, mmap, windows, compute, batch_size)
            ratios = _owl_ratios(lm, mmap, by_layer, inputs, compute, spec.owl_m)
            del inputs
            order = sorted(ratios)
            layer_target = dict(zip(order, owl_sparsities([ratios[i] for i in order], spec.sparsity,
                                                          spec.owl_lambda)))

        def record(site: LinearSite, new: torch.Tensor, stats: _GroupStats | None, dense: torch.Tensor) -> None:
            zeros = int((new == 0).sum())
            error = None
            if stats is not None and stats.gram is not None:
                error = reconstruction_error(dense, new, stats.gram)
            matrices.append(PrunedMatrix(
                module=site.name, layer=site.layer, role=site.role, out_features=site.out_features,
                in_features=site.in_features, method=spec.method, pattern=spec.pattern,
                target_sparsity=spec.target if spec.nm else layer_target[site.layer],
                achieved_sparsity=zeros / new.numel(), zeros=zeros,
                nm_valid=nm_valid(new, *spec.nm) if spec.nm else None, reconstruction_error=error,
                calibration_tokens=stats.tokens if stats is not None else None))
            if mask_path is not None:
                masks[site.weight_name] = (new != 0).cpu()

        if spec.method == "magnitude":
            for index in progress.track(sorted(by_layer), "magnitude pruning"):
                pruned = []
                for site in by_layer[index]:
                    dense = site.weight().to(compute).float()
                    new, _mask = _prune_matrix(spec, dense, layer_target[index], None)
                    record(site, new, None, dense)
                    pruned.append((site, new))
                writer.write(mmap.blocks[index], pruned)
        else:
            inputs = capture_block_inputs(lm.model, mmap, windows, compute, batch_size)
            last = max(by_layer)
            want_gram = spec.method == "sparsegpt" or reconstruction
            for index, block in enumerate(progress.track(mmap.blocks[:last + 1], f"{spec.method} pruning")):
                block_sites = by_layer.get(index, [])
                new_weights: dict[str, torch.Tensor] = {}
                with on_device(block, compute):
                    if block_sites:
                        with _collecting(block, block_sites, compute, want_gram) as stats:
                            run_block(block, inputs)
                        for site in block_sites:
                            group = stats[site.input_group]
                            dense = site.weight().float()
                            new, _mask = _prune_matrix(spec, dense, layer_target[index], group)
                            record(site, new, group, dense)
                            new_weights[site.name] = new.cpu() if restore else new
                        del stats
                if block_sites:
                    # written after the block is back home, so saved originals stay off the device
                    writer.write(block, [(site, new_weights.pop(site.name)) for site in block_sites])
                if index < last:
                    with on_device(block, compute):
                        inputs.hidden = run_block(block, inputs)
            del inputs
        prune_seconds = time.perf_counter() - started

        for index, rows in sorted(_group(matrices).items()):
            params = sum(r.out_features * r.in_features for r in rows)
            zeros = sum(r.zeros for r in rows)
            layer_rows.append(PrunedLayer(layer=index, matrices=len(rows), params=params,
                                          target_sparsity=rows[0].target_sparsity,
                                          achieved_sparsity=zeros / params, outlier_ratio=ratios.get(index)))

        info = {"method": spec.method, "pattern": spec.pattern, "sparsity": spec.target,
                "allocation": spec.allocation, "scope": spec.scope if spec.method == "magnitude" else None,
                "percdamp": spec.percdamp if spec.method == "sparsegpt" else None,
                "blocksize": spec.blocksize if spec.method == "sparsegpt" else None,
                "owl": {"m": spec.owl_m, "lambda": spec.owl_lambda} if spec.allocation == "owl" else None,
                "source_model": lm.source.display, "modules": len(sites),
                "calibration": calibration_info}
        saved = None
        if save_dir is not None:
            saved = str(save_pruned_model(lm, Path(save_dir), info))
        if mask_path is not None:
            from safetensors.torch import save_file

            Path(mask_path).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in masks.items()}, str(mask_path))
        if evaluate:
            ppl_rows.append(_evaluate(lm, eval_ids, seqlen=eval_seqlen, max_windows=max_windows,
                                      dataset=eval_dataset, device=compute, stage="pruned"))

    params = sum(r.params for r in layer_rows)
    zeros = sum(r.zeros for r in matrices)
    errors = [r.reconstruction_error for r in matrices if r.reconstruction_error is not None]
    summary = PruneSummary(
        method=spec.method, pattern=spec.pattern, allocation=spec.allocation,
        scope=spec.scope if spec.method == "magnitude" else None, target_sparsity=spec.target,
        achieved_sparsity=zeros / params, matrices=len(matrices), params=params, zeros=zeros,
        calibration_windows=int(windows.shape[0]) if windows is not None and spec.needs_calibration else None,
        calibration_seqlen=int(windows.shape[1]) if windows is not None and spec.needs_calibration else None,
        mean_reconstruction_error=float(np.mean(errors)) if errors else None,
        ppl_dense=ppl_rows[0].ppl if evaluate and evaluate_dense else None,
        ppl_pruned=ppl_rows[-1].ppl if evaluate else None,
        prune_seconds=prune_seconds, saved_to=saved)
    docs["prune"] = {**info, "restored": restore, "layer_sparsity": {str(k): v for k, v in layer_target.items()},
                     "mask_file": str(mask_path) if mask_path is not None else None}
    tables: Tables = {"prune_summary": [summary], "pruned_matrices": matrices, "pruned_layers": layer_rows}
    if ppl_rows:
        tables["prune_perplexity"] = ppl_rows
    return tables, docs


def _group(rows: Sequence[PrunedMatrix]) -> dict[int, list[PrunedMatrix]]:
    grouped: dict[int, list[PrunedMatrix]] = {}
    for row in rows:
        grouped.setdefault(row.layer, []).append(row)
    return grouped


# -- layer metrics ---------------------------------------------------------------------------


class _Stop(Exception):
    pass


@torch.no_grad()
def input_mean_squares(lm: LoadedModel, site: LinearSite, windows: torch.Tensor,
                       batch_size: int = 8) -> tuple[torch.Tensor, int]:
    """s_j = mean over calibration tokens of x_j^2 at ``site``'s input (fp64), and the token
    count. The forward stops right after the module (nothing later is needed)."""
    from ..core.blockwise import model_device

    state = {"sum": torch.zeros(site.in_features, dtype=torch.float64), "tokens": 0}

    def hook(_module, args):
        x = args[0].detach().reshape(-1, site.in_features)
        state["sum"] += (x.double() ** 2).sum(dim=0).cpu()
        state["tokens"] += int(x.shape[0])
        raise _Stop

    where = model_device(lm.model)
    with forward_hooks(lm.model, {site.name: hook}, pre=True):
        for start in range(0, windows.shape[0], batch_size):
            try:
                lm.model(input_ids=windows[start:start + batch_size].to(where), use_cache=False)
            except _Stop:
                pass
    return state["sum"] / max(state["tokens"], 1), state["tokens"]


def max_pool(values: torch.Tensor, max_rows: int, max_cols: int) -> tuple[torch.Tensor, int, int]:
    """Max-pool a 2-D array down to at most max_rows x max_cols cells with integer factors
    (ragged edges pooled over what is there; nothing cropped). Returns (pooled, row factor,
    column factor)."""
    rows, cols = values.shape
    fr, fc = max(1, math.ceil(rows / max_rows)), max(1, math.ceil(cols / max_cols))
    if fr == 1 and fc == 1:
        return values.clone(), 1, 1
    pooled = torch.nn.functional.max_pool2d(values[None, None].float(), kernel_size=(fr, fc), stride=(fr, fc),
                                            ceil_mode=True)[0, 0]
    return pooled, fr, fc


def _stats(module: str, quantity: str, values: np.ndarray, shape: Sequence[int]) -> LayerMetricStat:
    v = values.astype(np.float64).ravel()
    p01, p25, p50, p75, p99 = np.percentile(v, [1, 25, 50, 75, 99])
    return LayerMetricStat(module=module, quantity=quantity, shape="x".join(str(s) for s in shape), count=v.size,
                           mean=float(v.mean()), std=float(v.std()), min=float(v.min()), p01=float(p01),
                           p25=float(p25), median=float(p50), p75=float(p75), p99=float(p99), max=float(v.max()))


def _histogram(values: np.ndarray, bins: int) -> dict[str, list[float]]:
    """Counts over log-spaced bins between the smallest positive value and the maximum (these
    quantities span decades); exact zeros are counted apart."""
    v = values.astype(np.float64).ravel()
    positive = v[v > 0]
    zeros = int((v == 0).sum())
    if positive.size == 0:
        return {"edges": [], "counts": [], "zeros": zeros}
    low, high = positive.min(), positive.max()
    if high <= low:
        high = low * 1.0001 + 1e-30
    edges = np.logspace(np.log10(low), np.log10(high), bins + 1)
    counts, _ = np.histogram(positive, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "zeros": zeros}


def layer_metrics(lm: LoadedModel, layer: str, windows: torch.Tensor, *, batch_size: int = 8,
                  max_cells: int = 256, bins: int = 80) -> tuple[Tables, dict[str, Any]]:
    """|W|, sqrt(s_j) and |W|*sqrt(s_j) of one linear module (seed 004's figure, with the real
    Wanda metric): statistics table + pooled arrays and histograms for the figure."""
    mmap = ModuleMap(lm.model)
    site = resolve_site(mmap, layer)
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 8:
        raise LLMProbeError(f"--max-cells must be an integer >= 8; got {max_cells!r}")
    weight_abs = site.weight().float().abs().cpu()
    mean_sq, tokens = input_mean_squares(lm, site, windows, batch_size)
    act_norm = torch.sqrt(mean_sq).float()
    score = weight_abs * act_norm.unsqueeze(0)
    shape = tuple(weight_abs.shape)
    rows = [_stats(site.name, "weight_abs", weight_abs.numpy(), shape),
            _stats(site.name, "activation_norm", act_norm.numpy(), (site.in_features,)),
            _stats(site.name, "wanda_score", score.numpy(), shape)]
    w_pooled, fr, fc = max_pool(weight_abs, max_cells, max_cells)
    s_pooled, _, _ = max_pool(score, max_cells, max_cells)
    bar_factor = max(1, math.ceil(site.in_features / (4 * max_cells)))
    bars = max_pool(act_norm[None, :], 1, 4 * max_cells)[0][0]
    doc = {"module": site.name, "layer": site.layer, "role": site.role, "shape": list(shape),
           "calibration_tokens": tokens, "row_factor": fr, "col_factor": fc, "bar_factor": bar_factor,
           "weight_abs_pooled": w_pooled.tolist(), "wanda_score_pooled": s_pooled.tolist(),
           "activation_norm_pooled": bars.tolist(),
           "histograms": {"weight_abs": _histogram(weight_abs.numpy(), bins),
                          "activation_norm": _histogram(act_norm.numpy(), bins),
                          "wanda_score": _histogram(score.numpy(), bins)}}
    return {"layer_metrics": rows}, {"layer_metrics": doc}


# -- job adapters (the registry's prune.run and prune.layer-metrics) --------------------------


def prepare_run_job(job) -> None:
    """Every check that needs the model or data, before the output folder is opened."""
    from ..core.loading import resolve_device
    from .perplexity import check_seqlen, default_seqlen

    o, lm = job.options, job.lm
    spec = check_options(o.method, o.target_sparsity, o.nm, scope=o.scope, allocation=o.allocation, owl_m=o.owl_m,
                         owl_lambda=o.owl_lambda, percdamp=o.percdamp, blocksize=o.blocksize)
    select_sites(ModuleMap(lm.model), o.roles, o.layer_list(), o.filter, spec.nm)
    job.state["compute"] = (next(lm.model.parameters()).device if o.compute_device == "auto"
                            else resolve_device(o.compute_device))
    if spec.needs_calibration:
        seqlen = check_seqlen(o.seqlen, lm.max_length) if o.seqlen is not None else default_seqlen(lm.max_length)
        job.state["calibration"] = job.session.calibration(o.model_copy(update={"seqlen": seqlen}))
    if o.evaluate:
        eval_seqlen = (check_seqlen(o.eval_seqlen, lm.max_length) if o.eval_seqlen is not None
                       else default_seqlen(lm.max_length))
        corpus, ids = job.session.token_ids(o.eval_dataset, purpose="eval")
        if len(ids) < eval_seqlen:
            raise LLMProbeError(f"the evaluation text has only {len(ids)} tokens, fewer than --eval-seqlen "
                                f"{eval_seqlen}; use a smaller --eval-seqlen or a longer text")
        job.state["evaluation"] = (corpus, ids)
        job.state["eval_seqlen"] = eval_seqlen


def run_job(job):
    from ..session import Result

    o, state = job.options, job.state
    calib = state.get("calibration")
    corpus, ids = state.get("evaluation", (None, None))
    save_dir = job.run_dir / "model" if job.run_dir is not None and o.save_model else None
    mask_path = job.run_dir / "masks.safetensors" if job.run_dir is not None and o.save_mask else None
    calibration_info = calib.manifest() if calib is not None else None
    tables, docs = prune_run(
        job.lm, method=o.method, sparsity=o.target_sparsity, nm=o.nm, roles=o.roles, layers=o.layer_list(),
        regex=o.filter, windows=calib.windows if calib is not None else None, scope=o.scope,
        allocation=o.allocation, owl_m=o.owl_m, owl_lambda=o.owl_lambda, percdamp=o.percdamp,
        blocksize=o.blocksize, reconstruction=o.reconstruction, eval_ids=ids,
        eval_seqlen=state.get("eval_seqlen"), max_windows=o.max_windows,
        eval_dataset=corpus.name if corpus is not None else "", device=state["compute"], batch_size=o.batch_size,
        save_dir=save_dir, mask_path=mask_path, restore=o.restore, calibration_info=calibration_info)
    if save_dir is not None:
        job.run.adopt("model")   # listed in the manifest: --overwrite may replace the folder later
        tables["prune_summary"][0].saved_to = "model"   # relative to the run folder (it may be staged)
    if mask_path is not None:
        job.run.adopt("masks.safetensors")
    if not o.restore:
        # The session's model is pruned for good: a later run in this session must load it again.
        job.session.__dict__.pop("lm", None)
    return Result(tables=tables, documents=docs)


def prepare_layer_metrics_job(job) -> None:
    resolve_site(ModuleMap(job.lm.model), job.options.layer)


def layer_metrics_job(job):
    from ..session import Result

    o = job.options
    tables, data = layer_metrics(job.lm, o.layer, job.calibration.windows, batch_size=o.batch_size,
                                 max_cells=o.max_cells, bins=o.bins)
    meta = {k: v for k, v in data["layer_metrics"].items() if not k.endswith("_pooled") and k != "histograms"}
    return Result(tables=tables, data=data, manifest={"layer_metrics": meta})
