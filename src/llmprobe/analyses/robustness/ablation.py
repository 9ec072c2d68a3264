"""``robustness ablation``: remove one target at a time and rank targets by Δppl, with KL.

Targets (``granularity``):

* ``matrix``: one linear matrix, zeroed (``mode="zero"``) or every entry set to the mean of that
  matrix's own entries (``mode="mean"``; the weight mean, computed in fp64 — not an activation
  mean);
* ``layer``: all chosen matrices of one block's role family (attention: q/k/v/o; MLP: gate/up/
  down), zeroed or mean-set together;
* ``block``: a whole decoder block skipped: a forward hook replaces its output with its input, so
  the hidden state passes through the residual stream unchanged (``mode`` does not apply).

The sweep reuses the unmodified run's hidden states up to the first modified block
(``Reference`` prefix cache): a target in block ℓ reruns blocks ℓ…end only.

Block similarity, from one unmodified pass and no ablation: with ``h_ℓ`` the input of block ℓ
(``h_L`` the last block's output, before the final norm), per token,

* Block Influence (ShortGPT, arXiv 2403.03853): ``BI_ℓ = 1 − mean_t cos(h_ℓ,t, h_ℓ+1,t)``;
* angular distance (arXiv 2403.17887): ``d_ℓ(n) = arccos(cos(h_ℓ,t, h_ℓ+n,t)) / π``, averaged over
  every token (``angular_distance``) and over the last token of each window only
  (``angular_distance_last``, the paper's choice);

averaged over every token of every window (fp64 sums). When block ablation was measured in the
same run, the Spearman rank correlation of each with the measured Δppl is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...core.errors import LLMProbeError
from ...core.interventions import Patch, forward_hooks, patched_weights
from ...core.loading import LoadedModel
from ...core.modulemap import ModuleMap
from ...core.records import Record
from ...core.reference import Reference, block_output
from .common import Tables, check_positive, make_reference, model_name, select_sites
from .readout import ReadoutColumns, spearman

MODES = ("zero", "mean")
GRANULARITIES = ("matrix", "layer", "block")


class AblationTarget(ReadoutColumns):
    """One ablated target, ranked by Δppl (1 = most damaging; non-finite Δppl ranks first)."""

    rank: int
    target: str
    granularity: str
    mode: str                   # zero / mean / skip
    layer: int
    role: str                   # matrix role, role family (attn/mlp) or "block"
    matrices: int
    parameters: int             # weights changed (0 for a skipped block)


class BlockSimilarity(Record):
    """Block Influence and angular distance of one block from the unmodified pass."""

    layer: int
    block_influence: float
    span: int
    angular_distance: float
    angular_distance_last: float
    tokens: int
    block_delta_ppl: float | None   # measured Δppl of skipping this block (block granularity)
    block_kl: float | None


class SimilarityAgreement(Record):
    """Spearman rank correlation of a one-pass metric with the measured block-ablation Δppl."""

    metric: str
    span: int
    blocks: int
    spearman_delta_ppl: float
    spearman_kl: float


def check_ablation_options(mode: str, granularity: str) -> None:
    if mode not in MODES:
        raise LLMProbeError(f"unknown --mode '{mode}'; use one of {', '.join(MODES)}")
    if granularity not in GRANULARITIES:
        raise LLMProbeError(f"unknown --granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}")
    if granularity == "block" and mode != "zero":
        raise LLMProbeError("--mode mean does not apply to --granularity block (a block is skipped: its input "
                            "passes through the residual)")


def _family(role: str) -> str:
    return role.split(".")[0] if "." in role else role


def ablation_patches(sites, mode: str) -> list[Patch]:
    patches = []
    for site in sites:
        if mode == "zero":
            patches.append(Patch(site.weight_name, "zero"))
        else:
            mean = float(site.module.weight.detach().double().mean())
            patches.append(Patch(site.weight_name, "set", None, mean))
    return patches


def skip_block_hook(_module, args, kwargs, output):
    """Replace a decoder block's output with its input hidden states (same container type)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


def ablation_targets(mmap: ModuleMap, granularity: str, mode: str, roles, layers, regex):
    """[(target name, role, layer, modification factory builder, parameter count, matrices)]."""
    targets = []
    if granularity == "block":
        wanted = mmap._resolve_layers(list(layers)) if layers else set(range(mmap.num_layers))
        if not wanted:
            raise LLMProbeError("no decoder block matches --layers")
        if not mmap.blocks:
            raise LLMProbeError("this model has no decoder blocks to skip")
        for layer in sorted(wanted):
            name = f"{mmap.blocks_path}.{layer}"
            targets.append((name, "block", layer, ("hook", name), 0, 0))
        return targets
    sites = [s for s in select_sites(mmap, roles, layers, regex) if s.layer is not None]
    if not sites:
        raise LLMProbeError("no linear matrix inside the decoder blocks matches --roles/--layers/--filter")
    if granularity == "matrix":
        for site in sites:
            targets.append((site.name, site.role, site.layer, ("patch", [site]),
                            site.in_features * site.out_features, 1))
        return targets
    groups: dict[tuple[int, str], list] = {}
    for site in sites:
        groups.setdefault((site.layer, _family(site.role)), []).append(site)
    for (layer, family), members in groups.items():
        targets.append((f"{mmap.blocks_path}.{layer}.{family}", family, layer, ("patch", members),
                        sum(s.in_features * s.out_features for s in members), len(members)))
    return targets


def _modification(model, kind, mode):
    what, payload = kind
    if what == "hook":
        return lambda: forward_hooks(model, {payload: skip_block_hook}, with_kwargs=True)
    patches = ablation_patches(payload, mode)
    return lambda: patched_weights(model, patches)


def _rank_key(row) -> float:
    return -math.inf if not math.isfinite(row.delta_ppl) else -row.delta_ppl


def ablation(lm: LoadedModel, windows: Sequence[torch.Tensor], *, mode: str = "zero", granularity: str = "matrix",
             roles: Sequence[str] | None = None, layers: Sequence[int] | None = None, regex: str | None = None,
             span: int = 1, dataset: str = "", prefix_cache: bool = True, reference: Reference | None = None,
             similarity: bool = True) -> Tables:
    """Ablate each target alone; rank by Δppl. Block similarity metrics from one clean pass."""
    check_ablation_options(mode, granularity)
    check_positive(span, "--span")
    model = lm.model if isinstance(lm, LoadedModel) else lm
    mmap = reference.mmap if reference is not None else ModuleMap(model)
    if span >= max(mmap.num_layers, 1) + 1:
        raise LLMProbeError(f"--span {span} is larger than the model's {mmap.num_layers} blocks")
    targets = ablation_targets(mmap, granularity, mode, roles, layers, regex)
    ref = reference or make_reference(model, windows, prefix_cache=prefix_cache)
    # Targets of one block are read out together: each reruns its block, the blocks after it
    # run once for all of them (Reference.evaluate_many / evaluate_in_block).
    readouts = ref.evaluate_many([(_modification(model, target[3], mode), target[2]) for target in targets],
                                 description="ablation")
    rows: list[AblationTarget] = []
    for index, (name, role, layer, _kind, parameters, matrices) in enumerate(targets):
        readout = readouts[index]
        rows.append(AblationTarget(rank=0, target=name, granularity=granularity,
                                   mode="skip" if granularity == "block" else mode, layer=layer, role=role,
                                   matrices=matrices, parameters=parameters, **readout.fields(ref)))
    rows.sort(key=_rank_key)
    for rank, row in enumerate(rows, 1):
        row.rank = rank
    tables: Tables = {"ablation": rows, "reference": [ref.info(model_name(lm), dataset)]}
    if similarity and mmap.blocks:
        sims = block_similarity(model, ref.windows, span=span, mmap=mmap)
        measured = {row.layer: row for row in rows} if granularity == "block" else {}
        for sim in sims:
            if sim.layer in measured:
                sim.block_delta_ppl = measured[sim.layer].delta_ppl
                sim.block_kl = measured[sim.layer].kl
        tables["block_similarity"] = sims
        if measured:
            with_both = [s for s in sims if s.block_delta_ppl is not None]
            agreement = []
            for metric in ("block_influence", "angular_distance", "angular_distance_last"):
                values = [getattr(s, metric) for s in with_both]
                agreement.append(SimilarityAgreement(
                    metric=metric, span=1 if metric == "block_influence" else span, blocks=len(with_both),
                    spearman_delta_ppl=spearman(values, [s.block_delta_ppl for s in with_both]),
                    spearman_kl=spearman(values, [s.block_kl for s in with_both])))
            tables["similarity_agreement"] = agreement
    return tables


@torch.inference_mode()
def block_similarity(model: torch.nn.Module, windows: Sequence[torch.Tensor], *, span: int = 1,
                     mmap: ModuleMap | None = None) -> list[BlockSimilarity]:
    """BI and angular distance per block from one unmodified pass over ``windows`` (streamed:
    only one window's block inputs are held at a time)."""
    mmap = mmap or ModuleMap(model)
    blocks = mmap.blocks
    n = len(blocks)
    names = {id(b): name for name, b in model.named_modules()}
    device = next(model.parameters()).device
    bi_sum = [0.0] * n
    ang_sum = [0.0] * n
    ang_last = [0.0] * n
    tokens = 0
    for ids in windows:
        states: list[torch.Tensor | None] = [None] * (n + 1)

        def pre(_m, args, kwargs, index, states=states):
            states[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        def post(_m, _args, _kwargs, output, index, states=states):
            if index == n - 1:
                states[n] = block_output(output).detach()

        pre_hooks = [(names[id(b)], lambda m, a, k, i=i: pre(m, a, k, i)) for i, b in enumerate(blocks)]
        post_hooks = [(names[id(blocks[-1])], lambda m, a, k, o: post(m, a, k, o, n - 1))]
        with forward_hooks(model, pre_hooks, pre=True, with_kwargs=True), \
                forward_hooks(model, post_hooks, with_kwargs=True):
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
        flat = [s.reshape(-1, s.shape[-1]).float() for s in states]
        tokens += flat[0].shape[0]
        for layer in range(n):
            cos_next = torch.nn.functional.cosine_similarity(flat[layer], flat[layer + 1], dim=-1)
            bi_sum[layer] += float(cos_next.double().sum())
            if layer + span <= n:
                cos_span = torch.nn.functional.cosine_similarity(flat[layer], flat[layer + span], dim=-1)
                angle = torch.arccos(cos_span.double().clamp(-1.0, 1.0)) / math.pi
                ang_sum[layer] += float(angle.sum())
                ang_last[layer] += float(angle[-1])
    rows = []
    for layer in range(n):
        has_span = layer + span <= n
        rows.append(BlockSimilarity(
            layer=layer, block_influence=1.0 - bi_sum[layer] / tokens, span=span,
            angular_distance=ang_sum[layer] / tokens if has_span else math.nan,
            angular_distance_last=ang_last[layer] / len(windows) if has_span else math.nan,
            tokens=tokens, block_delta_ppl=None, block_kl=None))
    return rows
