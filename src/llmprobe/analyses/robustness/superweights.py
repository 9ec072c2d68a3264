"""``robustness super-weights``: the super-weight search of Yu et al., arXiv 2411.07191.

Method (as the paper and its reference code do it):

1. Run the model on a prompt (default the paper's "Apple Inc. is a worldwide tech company.") or
   on calibration windows, with a forward hook on every MLP down projection (role ``mlp.down``,
   or ``mlp.fc2`` for non-gated MLPs). Per layer record max|x| of the projection's input (over
   every token and channel) and of its output, with the channel and token where each occurs.
2. A layer *spikes* when both its input and its output max|x| exceed the threshold: absolute
   (``threshold``, the paper's 50) or, with ``relative=R``, R times the median over layers of
   that side's max|x| on the intact model (for models whose activations are on another scale;
   the thresholds stay fixed over the iterations).
3. In a spiking layer the super weight is ``W_down[row, col]`` with ``row`` = the output channel
   of the output spike and ``col`` = the input channel of the input spike (coordinates of the
   [out, in] matrix).
4. Zero everything found so far and search again, until no new coordinate appears or
   ``max_iterations`` searches were made.

Readouts on the evaluation windows (the shared reference readout): each super weight zeroed
alone; all of them zeroed; and the paper's control — the largest-magnitude weights
(``outlier_fraction`` of each 2-D weight, the paper's 5e-7, i.e. ``int(numel · fraction)`` per
matrix) zeroed while the super weights are kept, and then zeroed together with them. The
massive activations they feed: the residual stream (block outputs) on the detection input,
per layer max|h| with channel and token, intact and with every super weight zeroed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...core.errors import LLMProbeError
from ...core.interventions import Patch, forward_hooks, patched_weights
from ...core.loading import LoadedModel
from ...core.modulemap import LinearSite, ModuleMap
from ...core.records import Record
from ...core.reference import Reference, block_output
from .common import Tables, check_positive, make_reference, model_name
from .readout import ReadoutColumns

DEFAULT_TEXT = "Apple Inc. is a worldwide tech company."
DOWN_ROLES = ("mlp.down", "mlp.fc2")


class DownProjSpikes(Record):
    """max|x| of one down projection's input and output on the detection input, per search."""

    iteration: int              # 0 = intact model; k = after zeroing what searches < k found
    layer: int
    module: str
    input_max: float            # max|x| of the input
    input_value: float          # the signed value there
    input_channel: int
    input_token: int            # token position in the detection input
    output_max: float
    output_value: float
    output_channel: int
    output_token: int
    input_threshold: float
    output_threshold: float
    spike: bool                 # both above their thresholds


class SuperWeight(ReadoutColumns):
    """One super weight, and the model with it alone zeroed."""

    iteration: int
    layer: int
    module: str
    weight_row: int             # output channel = the residual channel it writes
    weight_col: int             # input channel of the down projection
    value: float
    input_spike: float          # signed input activation at the spike
    output_spike: float         # signed output activation at the spike
    token_position: int         # token of the output spike
    token: str
    residual_max: float         # max|h[:, weight_row]| over block outputs from this layer on (intact)
    residual_max_zeroed: float  # the same with this weight zeroed


class SuperWeightCheck(ReadoutColumns):
    """The model with groups of weights zeroed (the paper's control)."""

    condition: str
    weights_zeroed: int


class MassiveActivation(Record):
    """Largest residual-stream activation after each block on the detection input."""

    layer: int
    max_abs: float
    channel: int
    token_position: int
    max_abs_zeroed: float       # with every super weight zeroed
    channel_zeroed: int
    token_position_zeroed: int


@dataclass
class _Peak:
    value: float
    channel: int
    token: int

    @property
    def magnitude(self) -> float:
        return abs(self.value)


def _peak(x: torch.Tensor, offset_tokens: int = 0) -> _Peak:
    flat = x.reshape(-1, x.shape[-1]).float()
    index = int(flat.abs().argmax())
    token, channel = divmod(index, flat.shape[-1])
    return _Peak(float(flat[token, channel]), channel, token + offset_tokens)


def _merge(a: _Peak | None, b: _Peak) -> _Peak:
    # NaN never wins, so a broken window cannot hide a real spike elsewhere; ties keep the first
    return b if a is None or b.magnitude > a.magnitude else a


def down_sites(mmap: ModuleMap) -> list[LinearSite]:
    sites = [s for s in mmap.linears if s.role in DOWN_ROLES and s.layer is not None]
    if not sites:
        raise LLMProbeError("this model has no MLP down projection (role mlp.down or mlp.fc2) to search")
    return sites


@torch.inference_mode()
def scan(model: torch.nn.Module, inputs: Sequence[torch.Tensor], sites: Sequence[LinearSite],
         blocks: Sequence[torch.nn.Module] = ()) -> tuple[dict[str, tuple[_Peak, _Peak]], list[_Peak]]:
    """Per down projection (input peak, output peak) over every input sequence, and per block
    the residual-stream peak. Token positions count from the start of each sequence."""
    device = next(model.parameters()).device
    peaks: dict[str, list] = {s.name: [None, None] for s in sites}
    residual: list[_Peak | None] = [None] * len(blocks)
    names = {id(m): n for n, m in model.named_modules()}

    def site_hook(name):
        def hook(_module, args, output):
            peaks[name][0] = _merge(peaks[name][0], _peak(args[0]))
            peaks[name][1] = _merge(peaks[name][1], _peak(output))
        return hook

    def block_hook(index):
        def hook(_module, _args, output):
            residual[index] = _merge(residual[index], _peak(block_output(output)))
        return hook

    hooks = [(s.name, site_hook(s.name)) for s in sites]
    hooks += [(names[id(b)], block_hook(i)) for i, b in enumerate(blocks)]
    with forward_hooks(model, hooks):
        for ids in inputs:
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
    return {k: (v[0], v[1]) for k, v in peaks.items()}, residual


def _thresholds(stats, threshold: float, relative: float | None) -> tuple[float, float]:
    if relative is None:
        return threshold, threshold
    inputs = [p[0].magnitude for p in stats.values()]
    outputs = [p[1].magnitude for p in stats.values()]
    return relative * statistics.median(inputs), relative * statistics.median(outputs)


def check_super_options(threshold: float, relative: float | None, max_iterations: int, outlier_fraction: float) -> None:
    if not math.isfinite(threshold) or threshold <= 0:
        raise LLMProbeError(f"--threshold must be a positive number; got {threshold}")
    if relative is not None and (not math.isfinite(relative) or relative <= 1):
        raise LLMProbeError(f"--relative must be a number > 1 (times the median over layers); got {relative}")
    check_positive(max_iterations, "--max-iterations")
    if not 0 <= outlier_fraction < 1:
        raise LLMProbeError(f"--outlier-fraction must be in [0, 1); got {outlier_fraction}")


def detection_inputs(tokenizer, text: str | None, windows: torch.Tensor | None) -> list[torch.Tensor]:
    if windows is not None:
        return [w for w in windows]
    if not text or not text.strip():
        raise LLMProbeError("--text is empty")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise LLMProbeError("--text gives no tokens")
    return [ids]


def find_super_weights(model: torch.nn.Module, inputs: Sequence[torch.Tensor], *, threshold: float = 50.0,
                       relative: float | None = None, max_iterations: int = 5, mmap: ModuleMap | None = None):
    """The iterative search. Returns (found [(iteration, site, row, col, in peak, out peak)],
    spike rows for every search)."""
    mmap = mmap or ModuleMap(model)
    sites = down_sites(mmap)
    found: list[tuple] = []
    spikes: list[DownProjSpikes] = []
    for iteration in range(max_iterations):
        patches = [_zero_patch(site, row, col) for _, site, row, col, _, _ in found]
        with patched_weights(model, patches):
            stats, _ = scan(model, inputs, sites)
        if iteration == 0:  # relative thresholds come from the intact model and stay fixed,
            # so zeroing a spike does not lower the bar for the next search
            limit_in, limit_out = _thresholds(stats, threshold, relative)
        new = []
        for site in sites:
            peak_in, peak_out = stats[site.name]
            spike = peak_in.magnitude > limit_in and peak_out.magnitude > limit_out
            spikes.append(DownProjSpikes(
                iteration=iteration, layer=site.layer, module=site.name, input_max=peak_in.magnitude,
                input_value=peak_in.value, input_channel=peak_in.channel, input_token=peak_in.token,
                output_max=peak_out.magnitude, output_value=peak_out.value, output_channel=peak_out.channel,
                output_token=peak_out.token, input_threshold=limit_in, output_threshold=limit_out, spike=spike))
            key = (site.name, peak_out.channel, peak_in.channel)
            if spike and all((s.name, r, c) != key for _, s, r, c, _, _ in found):
                new.append((iteration, site, peak_out.channel, peak_in.channel, peak_in, peak_out))
        if not new:
            break
        found.extend(new)
    return found, spikes


def _zero_patch(site: LinearSite, row: int, col: int) -> Patch:
    return Patch(site.weight_name, "zero", (col, row) if site.transposed else (row, col))


def outlier_patches(model: torch.nn.Module, fraction: float, keep: set[tuple[str, tuple[int, int]]]) -> list[Patch]:
    """Zero the ``int(numel · fraction)`` largest-|w| entries of every 2-D weight (the paper's
    outlier removal), except the entries in ``keep`` [(param name, index)]."""
    patches = []
    if fraction <= 0:
        return patches
    for name, param in model.named_parameters():
        if not name.endswith("weight") or param.dim() != 2:
            continue
        count = int(param.numel() * fraction)
        if count < 1:
            continue
        flat = param.detach().abs().reshape(-1).float()
        top = torch.topk(flat, count).indices
        mask = torch.ones(param.numel(), dtype=torch.bool)
        mask[top.cpu()] = False
        for kept_name, (r, c) in keep:
            if kept_name == name:
                mask[r * param.shape[1] + c] = True
        patches.append(Patch(name, "mask", None, mask.view(param.shape).to(param.device)))
    return patches


def super_weights(lm: LoadedModel, windows: Sequence[torch.Tensor], *, text: str | None = DEFAULT_TEXT,
                  detect_windows: torch.Tensor | None = None, threshold: float = 50.0, relative: float | None = None,
                  max_iterations: int = 5, outlier_fraction: float = 5e-7, tokenizer=None, dataset: str = "",
                  prefix_cache: bool = True, reference: Reference | None = None) -> Tables:
    """Find super weights on ``text`` (or ``detect_windows``) and read out their effect."""
    check_super_options(threshold, relative, max_iterations, outlier_fraction)
    model = lm.model if isinstance(lm, LoadedModel) else lm
    tokenizer = tokenizer or getattr(lm, "tokenizer", None)
    if detect_windows is None and tokenizer is None:
        raise LLMProbeError("super-weight search needs a tokenizer for --text, or calibration windows")
    inputs = detection_inputs(tokenizer, text, detect_windows)
    mmap = reference.mmap if reference is not None else ModuleMap(model)
    found, spikes = find_super_weights(model, inputs, threshold=threshold, relative=relative,
                                       max_iterations=max_iterations, mmap=mmap)
    ref = reference or make_reference(model, windows, prefix_cache=prefix_cache)
    sites = down_sites(mmap)
    _, residual = scan(model, inputs, sites, mmap.blocks)
    all_patches = [_zero_patch(site, row, col) for _, site, row, col, _, _ in found]
    with patched_weights(model, all_patches):
        _, residual_zeroed = scan(model, inputs, sites, mmap.blocks)

    rows: list[SuperWeight] = []
    for iteration, site, row, col, peak_in, peak_out in found:
        patch = _zero_patch(site, row, col)
        weight = site.weight()
        readout = ref.evaluate(lambda patch=patch: patched_weights(model, [patch]), site.layer)
        intact = _channel_max(model, inputs, mmap, row, site.layer, [])
        zeroed = _channel_max(model, inputs, mmap, row, site.layer, [patch])
        token_id = int(inputs[0][peak_out.token]) if len(inputs) == 1 else None
        rows.append(SuperWeight(
            iteration=iteration, layer=site.layer, module=site.name, weight_row=row, weight_col=col,
            value=float(weight[row, col]), input_spike=peak_in.value, output_spike=peak_out.value,
            token_position=peak_out.token, token=tokenizer.decode([token_id]) if token_id is not None and tokenizer else "",
            residual_max=intact, residual_max_zeroed=zeroed, **readout.fields(ref)))

    keep = {(site.weight_name, (col, row) if site.transposed else (row, col)) for _, site, row, col, _, _ in found}
    outliers = outlier_patches(model, outlier_fraction, keep)
    outliers_all = outlier_patches(model, outlier_fraction, set())
    n_outliers = sum(int((~p.value).sum()) for p in outliers)
    n_outliers_all = sum(int((~p.value).sum()) for p in outliers_all)
    first = min((site.layer for _, site, *_ in found), default=None)
    checks = []
    conditions = [("super_weights_zeroed", all_patches, len(all_patches), first),
                  ("outliers_zeroed_super_weights_kept", outliers, n_outliers, None),
                  ("outliers_and_super_weights_zeroed", outliers_all + all_patches, None, None)]
    for condition, patches, count, start in conditions:
        if not patches:
            continue
        if count is None:  # distinct entries: super weights that are outliers too count once
            count = n_outliers_all + sum(1 for p in all_patches if not _masked(outliers_all, p))
        readout = ref.evaluate(lambda patches=patches: patched_weights(model, patches), start)
        checks.append(SuperWeightCheck(condition=condition, weights_zeroed=count, **readout.fields(ref)))

    massive = [MassiveActivation(layer=i, max_abs=a.magnitude, channel=a.channel, token_position=a.token,
                                 max_abs_zeroed=b.magnitude, channel_zeroed=b.channel, token_position_zeroed=b.token)
               for i, (a, b) in enumerate(zip(residual, residual_zeroed))]
    return {"super_weights": rows, "super_weight_checks": checks, "down_proj_spikes": spikes,
            "massive_activations": massive, "reference": [ref.info(model_name(lm), dataset)]}


def _masked(patches: Sequence[Patch], patch: Patch) -> bool:
    """Whether ``patch``'s single entry is already zeroed by one of the mask patches."""
    for mask in patches:
        if mask.name == patch.name and not bool(mask.value[patch.index]):
            return True
    return False


@torch.inference_mode()
def _channel_max(model, inputs, mmap: ModuleMap, channel: int, from_layer: int, patches) -> float:
    """max |h[:, channel]| over the block outputs of layers ≥ ``from_layer`` on the detection input."""
    best = 0.0
    names = {id(m): n for n, m in model.named_modules()}

    def hook(_m, _a, output):
        nonlocal best
        value = float(block_output(output)[..., channel].abs().max())
        best = value if math.isnan(value) else max(best, value)

    hooks = [(names[id(b)], hook) for b in mmap.blocks[from_layer:]]
    device = next(model.parameters()).device
    with patched_weights(model, patches), forward_hooks(model, hooks):
        for ids in inputs:
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
    return best
