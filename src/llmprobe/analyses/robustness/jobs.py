"""Job adapters of the robustness analyses (declared in ``catalog/robustness.py``)."""

from __future__ import annotations

import torch

from ...core.data import eval_windows
from ...core.errors import LLMProbeError
from ...core.modulemap import ModuleMap
from ...core.reference import Reference
from . import ablation as ablation_mod
from . import adversarial as adversarial_mod
from . import bitflip as bitflip_mod
from . import noise as noise_mod
from . import superweights as superweights_mod
from .common import select_sites


def _result(tables, **manifest):
    from ...session import Result

    return Result(tables=tables, manifest=manifest)


def prepare_job(job) -> None:
    """Everything that can be wrong with the options given the model and data, checked before the
    output folder exists: window length, the selection, targets and bits."""
    o = job.options
    lm = job.lm
    if lm.max_length is not None and o.seqlen > lm.max_length:
        raise LLMProbeError(f"--seqlen {o.seqlen} is above this model's maximum of {lm.max_length} tokens")
    mmap = ModuleMap(lm.model)
    job.state["mmap"] = mmap
    name = job.analysis.name
    if name == "robustness.adversarial" and o.text is not None:
        ids = lm.tokenizer(o.text, return_tensors="pt").input_ids[0]
        if ids.numel() < 2:
            raise LLMProbeError("--text must give at least 2 tokens")
        job.state["sequences"] = [ids]
        job.state["dataset"] = "text"
        return
    corpus, ids = job.evaluation
    job.state["windows"] = [w.input_ids for w in eval_windows(ids, o.seqlen, max_windows=o.max_windows)]
    job.state["dataset"] = corpus.name
    layers = o.layer_list() if hasattr(o, "layer_list") else None
    if name == "robustness.ablation":
        ablation_mod.ablation_targets(mmap, o.granularity, o.mode, o.roles, layers, o.filter)
        if o.span > mmap.num_layers:
            raise LLMProbeError(f"--span {o.span} is larger than the model's {mmap.num_layers} blocks")
    elif name == "robustness.noise":
        select_sites(mmap, o.roles, layers, o.filter)
    elif name == "robustness.bit-flip":
        job.state["targets"] = _bit_targets(mmap, o, layers)
    elif name == "robustness.super-weights":
        superweights_mod.down_sites(mmap)


def _bit_targets(mmap, o, layers):
    if o.target is None:
        sites = select_sites(mmap, o.roles, layers, o.filter)
        bitflip_mod.check_bits(o.bits, sites[0].module.weight.dtype)
        return []
    site = mmap.site(o.target)
    targets = []
    for item in o.index:
        row, col = bitflip_mod.parse_index(item)
        if not (0 <= row < site.out_features and 0 <= col < site.in_features):
            raise LLMProbeError(f"--index {row},{col} is outside {site.name} "
                                f"({site.out_features} rows x {site.in_features} columns)")
        targets.append((site.name, row, col))
    bitflip_mod.check_bits(o.bits, site.module.weight.dtype)
    return targets


def _reference(job) -> Reference:
    o = job.options
    return Reference(job.lm.model, job.state["windows"], prefix_cache=not o.no_prefix_cache,
                     cache_budget_mb=o.cache_budget_mb)


def ablation_job(job):
    o = job.options
    tables = ablation_mod.ablation(job.lm, job.state["windows"], mode=o.mode, granularity=o.granularity,
                                   roles=o.roles, layers=o.layer_list(), regex=o.filter, span=o.span,
                                   dataset=job.state["dataset"], reference=_reference(job))
    return _result(tables)


def noise_job(job):
    o = job.options
    tables = noise_mod.noise_sweep(job.lm, job.state["windows"], sigmas=o.sigmas, distribution=o.distribution,
                                   absolute=o.absolute, roles=o.roles, layers=o.layer_list(), regex=o.filter,
                                   per_target=o.per_target, repeats=o.repeats, seed=o.seed,
                                   dataset=job.state["dataset"], reference=_reference(job))
    return _result(tables)


def bit_flip_job(job):
    o = job.options
    tables = bitflip_mod.bit_flip(job.lm, job.state["windows"], targets=job.state["targets"], bits=o.bits,
                                  count=o.count, seed=o.seed, roles=o.roles, layers=o.layer_list(), regex=o.filter,
                                  dataset=job.state["dataset"], reference=_reference(job))
    return _result(tables)


def super_weights_job(job):
    o = job.options
    detect = torch.stack(job.state["windows"]) if o.detect_on_windows else None
    tables = superweights_mod.super_weights(
        job.lm, job.state["windows"], text=o.text, detect_windows=detect, threshold=o.threshold,
        relative=o.relative, max_iterations=o.max_iterations, outlier_fraction=o.outlier_fraction,
        dataset=job.state["dataset"], reference=_reference(job))
    return _result(tables, detection="windows" if o.detect_on_windows else "text")


def adversarial_job(job):
    o = job.options
    sequences = job.state.get("sequences") or job.state["windows"]
    tables = adversarial_mod.adversarial(job.lm, sequences, attacks=o.attacks, token_budgets=o.budgets,
                                         rates=o.rates, eps=o.eps, pgd_steps=o.pgd_steps, repeats=o.repeats,
                                         seed=o.seed)
    return _result(tables, sequences=job.state["dataset"])
