"""``robustness noise``: random weight noise over a σ sweep, read out as ppl / KL curves.

Noise for one (σ, repeat) is drawn from ``torch.Generator().manual_seed(seed + repeat)`` (CPU,
fp32), matrix after matrix in model order, in each weight's stored layout:

* Gaussian: ``ε ~ N(0, 1)``;
* uniform: ``ε ~ U(−√3, √3)``, which has unit variance, so both distributions at the same σ
  perturb with the same standard deviation;

scaled by ``σ · std(W)`` (population std of that matrix's entries, fp64; the default) or by
``σ`` itself (``absolute``), cast to the weight's dtype and added. With ``per_target`` every
matrix is perturbed alone (its generator restarted at the same seed), else all chosen matrices
at once. σ = 0 is allowed and must reproduce the reference exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ...core.errors import LLMProbeError
from ...core.interventions import Patch, patched_weights
from ...core.loading import LoadedModel
from ...core.records import Record
from ...core.reference import Reference
from .common import Tables, check_positive, make_reference, model_name, select_sites
from .readout import ReadoutColumns

DISTRIBUTIONS = ("gaussian", "uniform")


class NoiseRun(ReadoutColumns):
    """One noisy model (one σ, one repeat, one target) against the unmodified one."""

    distribution: str
    scale: str                  # "relative" (σ·std(W)) or "absolute" (σ)
    sigma: float
    target: str                 # a module name, or "all" (every chosen matrix at once)
    layer: int | None
    role: str
    matrices: int               # matrices perturbed together
    repeat: int
    seed: int


class NoiseSummary(Record):
    """Mean and sample std (ddof 1; NaN for one repeat) over repeats of one (σ, target)."""

    distribution: str
    scale: str
    sigma: float
    target: str
    layer: int | None
    role: str
    repeats: int
    nonfinite_runs: int         # repeats whose loss or KL is inf/NaN (included in the means)
    ppl_mean: float
    ppl_std: float
    delta_ppl_mean: float
    delta_ppl_std: float
    kl_mean: float
    kl_std: float
    top1_agreement_mean: float
    top1_agreement_std: float
    loss_mean: float
    loss_std: float


def check_noise_options(sigmas: Sequence[float], distribution: str, repeats: int) -> list[float]:
    if distribution not in DISTRIBUTIONS:
        raise LLMProbeError(f"unknown --distribution '{distribution}'; use one of {', '.join(DISTRIBUTIONS)}")
    sigmas = [float(s) for s in sigmas]
    if not sigmas:
        raise LLMProbeError("--sigmas needs at least one value")
    for sigma in sigmas:
        if not math.isfinite(sigma) or sigma < 0:
            raise LLMProbeError(f"--sigmas values must be finite and >= 0; got {sigma}")
    check_positive(repeats, "--repeats")
    return sigmas


def draw_noise(shape: torch.Size, generator: torch.Generator, distribution: str) -> torch.Tensor:
    """Unit-variance noise of ``shape`` (fp32, CPU) from ``generator``."""
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * math.sqrt(3.0)


def noise_patches(weights: Sequence[tuple[str, torch.Tensor]], sigma: float, distribution: str, absolute: bool,
                  seed: int) -> list[Patch]:
    """'add' patches for ``weights`` [(parameter name, tensor)], drawn in the given order."""
    generator = torch.Generator().manual_seed(seed)
    patches = []
    for name, weight in weights:
        eps = draw_noise(weight.shape, generator, distribution)
        scale = sigma if absolute else sigma * float(weight.detach().double().std(correction=0))
        patches.append(Patch(name, "add", None, (eps * scale).to(weight.dtype).to(weight.device)))
    return patches


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def noise_sweep(lm: LoadedModel, windows: Sequence[torch.Tensor], *, sigmas: Sequence[float] = (0.01, 0.05, 0.1, 0.2),
                distribution: str = "gaussian", absolute: bool = False, roles: Sequence[str] | None = None,
                layers: Sequence[int] | None = None, regex: str | None = None, per_target: bool = False,
                repeats: int = 3, seed: int = 0, dataset: str = "", prefix_cache: bool = True,
                reference: Reference | None = None) -> Tables:
    """Perturb the chosen matrices with noise at each σ, ``repeats`` seeds each."""
    sigmas = check_noise_options(sigmas, distribution, repeats)
    model = lm.model if isinstance(lm, LoadedModel) else lm
    ref = reference or make_reference(model, windows, prefix_cache=prefix_cache)
    sites = select_sites(ref.mmap, roles, layers, regex)
    params = dict(model.named_parameters())
    weights = [(s.weight_name, params[s.weight_name]) for s in sites]
    if per_target:
        groups = [([w], s.name, s.layer, s.role) for w, s in zip(weights, sites)]
    else:
        groups = [(weights, "all", None, ",".join(sorted({s.role for s in sites})))]
    scale = "absolute" if absolute else "relative"
    runs: list[NoiseRun] = []
    summary: list[NoiseSummary] = []
    for group, target, layer, role in groups:
        first_layer = ref.first_layer_of([name for name, _ in group])
        for sigma in sigmas:
            per_repeat: list[NoiseRun] = []
            for repeat in range(repeats):
                patches = noise_patches(group, sigma, distribution, absolute, seed + repeat)
                readout = ref.evaluate(lambda patches=patches: patched_weights(model, patches), first_layer)
                per_repeat.append(NoiseRun(distribution=distribution, scale=scale, sigma=sigma, target=target,
                                           layer=layer, role=role, matrices=len(group), repeat=repeat,
                                           seed=seed + repeat, **readout.fields(ref)))
                del patches
            runs.extend(per_repeat)
            column = {key: [getattr(r, key) for r in per_repeat]
                      for key in ("ppl", "delta_ppl", "kl", "top1_agreement", "loss")}
            summary.append(NoiseSummary(
                distribution=distribution, scale=scale, sigma=sigma, target=target, layer=layer, role=role,
                repeats=repeats, nonfinite_runs=sum(not r.finite for r in per_repeat),
                **{f"{key}_mean": float(np.mean(values)) for key, values in column.items()},
                **{f"{key}_std": _std(values) for key, values in column.items()}))
    return {"noise_runs": runs, "noise_summary": summary,
            "reference": [ref.info(model_name(lm), dataset)]}
