"""Activation statistics over calibration windows (the LMAnalyser analyses, done in one pass each).

Every function takes a :class:`~llmprobe.analyses.calibration.Calibration` (model, selected
modules, windows, token filter, rotation) and returns ``{table name: [records]}``. Per-module
rows name the module, its layer, role and input group; modules that read one tensor (q/k/v,
gate/up) are hooked once, so their rows carry identical numbers.

Conventions shared by every table:

* ``max|x|`` of a token is the largest absolute value over its features (LMAnalyser's "max
  magnitude", QFeP's token scale).
* Kurtosis is Fisher's *excess* kurtosis with the biased (population) moments, i.e.
  ``scipy.stats.kurtosis(v, fisher=True, bias=True)``; the column ``estimator`` says so.
* Aggregates over modules (per layer, per role) average over module rows, as LMAnalyser does.
* Token tables aggregate by token id over *samples*: one sample is one token position at one
  hooked input in the scope, so a role's scope over 30 layers gives 30 samples per position;
  ``occurrences`` counts the positions themselves.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ..core.calibration import Calibration
from ..core.collect import check_site, collect, unescape_token
from ..core.collectors import ChannelCollector, MomentCollector, TokenCollector
from ..core.errors import LLMProbeError
from ..core.modulemap import ROLES, LinearSite
from ..core.records import Record

Tables = dict[str, list[Record]]

from ..core.specs import KURTOSIS_ESTIMATOR as ESTIMATOR  # noqa: E402

RANK_BY = ("max", "mean")
DOWN_PROJ_ROLES = ("mlp.down", "mlp.fc2")


# -- records ---------------------------------------------------------------------------------


class MagnitudeModule(Record):
    """max|x| of one linear module's activations."""

    module: str
    layer: int | None
    role: str
    input_group: str
    tokens: int
    windows: int
    abs_max: float                 # max|x| over every token and feature of every window
    window_abs_max_mean: float     # per-window max|x| averaged over windows (LMAnalyser's number)


class MagnitudeSummary(Record):
    """max|x| aggregated over the modules of a layer, a role, or a role within a layer."""

    scope: str                     # "layer" | "role" | "role_layer"
    layer: int | None
    role: str | None
    modules: int
    abs_max: float                 # max over the modules' abs_max
    module_abs_max_mean: float     # mean over modules of abs_max
    window_abs_max_mean: float     # mean over modules of window_abs_max_mean (LMAnalyser)


class TokenMagnitude(Record):
    """Tokens (by id) whose activations peak highest, within one scope."""

    scope: str                     # "all" (every selected module) or a role ("a+b" for a shared input)
    rank: int
    token_id: int
    token_text: str
    occurrences: int               # token positions in the windows
    samples: int                   # occurrences × hooked inputs in the scope
    mean_max_abs: float            # mean over samples of the token's max|x|
    max_max_abs: float             # max over samples of the token's max|x|


class KurtosisModule(Record):
    """Excess kurtosis of one module's activations, two estimators side by side."""

    module: str
    layer: int | None
    role: str
    input_group: str
    estimator: str                 # "excess_fisher_biased": scipy kurtosis(fisher=True, bias=True)
    tokens: int
    windows: int
    windows_without_spread: int    # windows with zero variance, left out of the window mean
    kurtosis_window_mean: float    # kurtosis of all tokens×features of a window, mean over windows
    kurtosis_pooled: float         # kurtosis of all tokens×features of all windows together
    mean: float
    std: float
    skewness: float


class KurtosisSummary(Record):
    scope: str                     # "layer" | "role"
    layer: int | None
    role: str | None
    estimator: str
    modules: int
    kurtosis_window_mean: float    # mean over modules of kurtosis_window_mean
    kurtosis_pooled_mean: float    # mean over modules of kurtosis_pooled
    kurtosis_pooled_max: float     # max over modules of kurtosis_pooled


class TokenKurtosis(Record):
    """Tokens whose feature vectors are most heavy-tailed (excess kurtosis over features)."""

    scope: str                     # "role" | "layer" | "layer_role"
    layer: int | None
    role: str | None
    estimator: str
    rank: int
    token_id: int
    token_text: str
    occurrences: int
    samples: int
    mean_kurtosis: float
    max_kurtosis: float


class DownProjSpike(Record):
    """Top tokens (by id) at one layer's MLP down projection."""

    layer: int | None
    module: str
    role: str
    rank: int
    token_id: int
    token_text: str
    occurrences: int
    mean_max_abs: float
    max_max_abs: float
    peak_channel: int              # feature where this token's largest value sits


class DownProjSpikePosition(Record):
    """The largest single-token spikes at one layer's MLP down projection."""

    layer: int | None
    module: str
    role: str
    rank: int
    window: int
    position: int
    token_id: int
    token_text: str
    max_abs: float
    channel: int


class TokenOccurrence(Record):
    """max|x| at the k-th occurrence of the target token in a window, per module."""

    module: str
    layer: int | None
    role: str
    input_group: str
    occurrence: int                # 1 = first time the token appears in a window
    windows: int                   # windows with at least this many occurrences
    mean_max_abs: float
    max_max_abs: float


class TokenOccurrenceRole(Record):
    """As TokenOccurrence, pooled over every layer of a role (LMAnalyser's curves)."""

    role: str
    occurrence: int
    samples: int                   # windows × layers
    mean_max_abs: float
    max_max_abs: float


class TokenOccurrenceSummary(Record):
    target: str
    matched_token_ids: str         # ids counted as the target, ';'-separated
    matched_tokens: str            # their decoded text (repr), ';'-separated
    occurrences: int
    windows_with_token: int
    windows: int
    max_occurrence: int            # most occurrences in one window
    note: str


class PromptTokenMagnitude(Record):
    module: str
    layer: int | None
    role: str
    input_group: str
    position: int
    token_id: int
    token_text: str
    max_abs: float
    channel: int


class PromptTokenPeak(Record):
    """Where each prompt token's activations peak over all selected modules."""

    position: int
    token_id: int
    token_text: str
    max_abs: float
    module: str
    layer: int | None
    role: str
    channel: int


class MaxMedianModule(Record):
    """QFeP max-to-median ratio of per-token scales (arXiv 2405.14428)."""

    module: str
    layer: int | None
    role: str
    input_group: str
    tokens: int
    scale_max: float               # max over tokens of s = max|x| over features
    scale_median: float
    ratio: float                   # scale_max / scale_median


class MaxMedianLayer(Record):
    layer: int
    inputs: int                    # distinct hooked inputs pooled (q/k/v count once)
    tokens: int                    # scales pooled
    scale_max: float
    scale_median: float
    ratio: float


class ChannelNorm(Record):
    """One input channel of one module: Wanda's norm and SmoothQuant's scale."""

    module: str
    layer: int | None
    role: str
    input_group: str
    channel: int
    mean_sq: float                 # E[x_j²] over tokens
    sqrt_mean_sq: float            # sqrt(E[x_j²]): the factor in Wanda's |W|·||X_j||
    abs_max: float                 # max|x_j| over tokens: SmoothQuant's activation scale


class ChannelNormSummary(Record):
    module: str
    layer: int | None
    role: str
    input_group: str
    channels: int
    tokens: int
    mean_sq_mean: float            # mean over channels of E[x_j²]
    sqrt_mean_sq_max: float        # largest channel RMS
    abs_max: float                 # largest channel max|x|
    abs_max_median: float          # median over channels of max|x_j|
    outlier_ratio: float           # abs_max / abs_max_median: how far the worst channel stands out
    top_channels: str              # channels with the largest max|x|, ';'-separated


# -- plumbing --------------------------------------------------------------------------------


def check_top_k(top_k: int) -> int:
    if top_k < 1:
        raise LLMProbeError(f"--top-k must be at least 1; got {top_k}")
    return top_k


def check_rank_by(rank_by: str) -> str:
    if rank_by not in RANK_BY:
        raise LLMProbeError(f"unknown --rank-by '{rank_by}'; use one of {', '.join(RANK_BY)}")
    return rank_by


def _key_of(site_obj: LinearSite, site: str) -> str:
    # Must agree with collect.hook_plan: shared inputs are keyed by their input group.
    return site_obj.input_group if site == "input" else site_obj.name


def _run(calib: Calibration, collectors, *, site: str, batch_size: int,
         sites: Sequence[LinearSite] | None = None,
         description: str = "collect") -> dict[str, list[LinearSite]]:
    check_site(site)
    if batch_size < 1:
        raise LLMProbeError(f"--batch-size must be at least 1; got {batch_size}")
    chosen = list(sites if sites is not None else calib.sites)
    return collect(calib.lm.model, calib.mmap, chosen, calib.windows, collectors, site=site,
                   token_filter=calib.token_filter, rotate=calib.rotate, batch_size=batch_size,
                   description=description)


def _role_rank(role: str | None) -> int:
    return ROLES.index(role) if role in ROLES else len(ROLES)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _max(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.max(finite)) if finite else math.nan


class _Decoder:
    """Token id -> text, memoised (decoding the same frequent ids over and over is slow)."""

    def __init__(self, calib: Calibration):
        self.calib = calib
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self.cache:
            self.cache[token_id] = self.calib.decode(token_id)
        return self.cache[token_id]


def _by_token(ids: torch.Tensor, values: torch.Tensor, positions_per_sample: int) -> pd.DataFrame:
    """Aggregate samples by token id: samples, occurrences, mean and max (NaNs ignored)."""
    frame = pd.DataFrame({"token_id": ids.numpy().astype(np.int64),
                          "value": values.numpy().astype(np.float64)})
    frame = frame[np.isfinite(frame["value"])]
    grouped = frame.groupby("token_id")["value"].agg(["count", "mean", "max"]).reset_index()
    grouped["occurrences"] = grouped["count"] // max(1, positions_per_sample)
    return grouped


def _top_rows(grouped: pd.DataFrame, rank_by: str, top_k: int, min_count: int) -> pd.DataFrame:
    grouped = grouped[grouped["occurrences"] >= min_count]
    # Ties broken by token id so the table is the same on every run.
    return grouped.sort_values([rank_by, "token_id"], ascending=[False, True]).head(top_k)


def _module_fields(s: LinearSite, key: str) -> dict:
    return {"module": s.name, "layer": s.layer, "role": s.role, "input_group": key}


def _keys_by(key_sites: dict[str, list[LinearSite]], attribute: str) -> dict:
    """attribute value (layer or role) -> keys whose modules have it, in model order."""
    groups: dict = defaultdict(list)
    for key, members in key_sites.items():
        for value in dict.fromkeys(getattr(m, attribute) for m in members):
            groups[value].append(key)
    return groups


def _keys_by_roles(key_sites: dict[str, list[LinearSite]]) -> dict[str, list[str]]:
    """Role label -> keys. A shared input is one scope labelled by all its roles
    ("attn.q+attn.k+attn.v"), so token tables do not repeat identical blocks per role."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key, members in key_sites.items():
        roles = sorted(dict.fromkeys(m.role for m in members), key=_role_rank)
        groups["+".join(roles)].append(key)
    return dict(sorted(groups.items(), key=lambda item: _role_rank(item[0].split("+")[0])))


def _site_rows(calib: Calibration, key_sites: dict[str, list[LinearSite]], site: str):
    """(site, key) for every selected module that was hooked, in model order."""
    for s in calib.sites:
        key = _key_of(s, site)
        if key in key_sites:
            yield s, key


# -- magnitude -------------------------------------------------------------------------------


def magnitude(calib: Calibration, *, site: str = "input", top_k: int = 10, rank_by: str = "max",
              min_count: int = 1, batch_size: int = 1) -> Tables:
    """max|x| per module, per layer, per role, per role×layer, and the top tokens by id.

    ``rank_by="max"`` orders tokens by their largest max|x| (LMAnalyser's order), ``"mean"`` by
    their mean over samples (tokens that are *consistently* large).
    """
    check_top_k(top_k)
    check_rank_by(rank_by)
    moments, tokens = MomentCollector(), TokenCollector()
    key_sites = _run(calib, [moments, tokens], site=site, batch_size=batch_size, description="magnitude")

    modules = []
    for s, key in _site_rows(calib, key_sites, site):
        summary = moments.result(key)
        modules.append(MagnitudeModule(**_module_fields(s, key), tokens=summary.tokens,
                                       windows=summary.windows, abs_max=summary.abs_max,
                                       window_abs_max_mean=summary.window_abs_max_mean))

    def summarise(scope: str, rows: list[MagnitudeModule], layer=None, role=None) -> MagnitudeSummary:
        return MagnitudeSummary(scope=scope, layer=layer, role=role, modules=len(rows),
                                abs_max=_max([r.abs_max for r in rows]),
                                module_abs_max_mean=_mean([r.abs_max for r in rows]),
                                window_abs_max_mean=_mean([r.window_abs_max_mean for r in rows]))

    layers, roles, role_layers = _group_rows(modules)
    decode = _Decoder(calib)
    token_rows = []
    scopes = {"all": list(key_sites)}
    scopes.update(_keys_by_roles(key_sites))
    for scope, keys in scopes.items():
        tables = [tokens.result(k) for k in keys]
        ids = torch.cat([t.token_ids for t in tables])
        values = torch.cat([t.max_abs for t in tables])
        grouped = _by_token(ids, values, len(keys))
        for rank, row in enumerate(_top_rows(grouped, rank_by, top_k, min_count).itertuples(), start=1):
            token_rows.append(TokenMagnitude(scope=scope, rank=rank, token_id=int(row.token_id),
                                             token_text=decode(row.token_id),
                                             occurrences=int(row.occurrences), samples=int(row.count),
                                             mean_max_abs=float(row.mean), max_max_abs=float(row.max)))
    return {
        "magnitude_modules": modules,
        "magnitude_layers": [summarise("layer", rows, layer=layer) for layer, rows in layers.items()],
        "magnitude_roles": [summarise("role", rows, role=role) for role, rows in roles.items()],
        "magnitude_role_layers": [summarise("role_layer", rows, layer=layer, role=role)
                                  for (role, layer), rows in role_layers.items()],
        "magnitude_tokens": token_rows,
    }


def _group_rows(rows):
    """Module rows grouped by layer, by role and by (role, layer), each in a stable order.
    Modules outside the decoder blocks (layer None) join role groups only."""
    layers: dict = defaultdict(list)
    roles: dict = defaultdict(list)
    role_layers: dict = defaultdict(list)
    for row in rows:
        roles[row.role].append(row)
        if row.layer is not None:
            layers[row.layer].append(row)
            role_layers[(row.role, row.layer)].append(row)
    return (dict(sorted(layers.items())),
            dict(sorted(roles.items(), key=lambda item: _role_rank(item[0]))),
            dict(sorted(role_layers.items(), key=lambda item: (_role_rank(item[0][0]), item[0][1]))))


# -- kurtosis --------------------------------------------------------------------------------


def kurtosis(calib: Calibration, *, site: str = "input", batch_size: int = 1) -> Tables:
    """Excess kurtosis per module: the per-window mean (LMAnalyser) and the pooled estimate."""
    moments = MomentCollector()
    key_sites = _run(calib, [moments], site=site, batch_size=batch_size, description="kurtosis")
    modules = []
    for s, key in _site_rows(calib, key_sites, site):
        summary = moments.result(key)
        modules.append(KurtosisModule(
            **_module_fields(s, key), estimator=ESTIMATOR, tokens=summary.tokens, windows=summary.windows,
            windows_without_spread=summary.windows_without_spread,
            kurtosis_window_mean=summary.kurtosis_window_mean, kurtosis_pooled=summary.kurtosis_pooled,
            mean=summary.mean, std=summary.std, skewness=summary.skewness))

    def summarise(scope: str, rows: list[KurtosisModule], layer=None, role=None) -> KurtosisSummary:
        return KurtosisSummary(scope=scope, layer=layer, role=role, estimator=ESTIMATOR, modules=len(rows),
                               kurtosis_window_mean=_mean([r.kurtosis_window_mean for r in rows]),
                               kurtosis_pooled_mean=_mean([r.kurtosis_pooled for r in rows]),
                               kurtosis_pooled_max=_max([r.kurtosis_pooled for r in rows]))

    layers, roles, _ = _group_rows(modules)
    return {
        "kurtosis_modules": modules,
        "kurtosis_layers": [summarise("layer", rows, layer=layer) for layer, rows in layers.items()],
        "kurtosis_roles": [summarise("role", rows, role=role) for role, rows in roles.items()],
    }


# -- per-token kurtosis ----------------------------------------------------------------------


def spread_layers(available: Sequence[int], count: int = 3) -> list[int]:
    """``count`` layers evenly spread over ``available`` (first, middle, last for 3)."""
    available = sorted(set(available))
    if len(available) <= count:
        return available
    picks = np.linspace(0, len(available) - 1, count).round().astype(int)
    return sorted({available[i] for i in picks})


def token_kurtosis(calib: Calibration, *, site: str = "input",
                   layers: Sequence[int] | Literal["all"] | None = None, top_k: int = 10,
                   min_count: int = 1, batch_size: int = 1) -> Tables:
    """Top tokens by the excess kurtosis of their own feature vector, per role, per layer and per
    role within a layer.

    ``layers``: None picks first/middle/last of the selected layers (the table has one block
    per layer, so all 30+ layers would bury the signal); ``"all"`` takes every selected layer;
    a list takes exactly those (each must be among the selected modules' layers).
    """
    check_top_k(top_k)
    available = sorted({s.layer for s in calib.sites if s.layer is not None})
    if not available:
        raise LLMProbeError("token-kurtosis needs modules inside decoder layers; none are selected")
    if layers is None:
        chosen = spread_layers(available)
    elif layers == "all":
        chosen = available
    else:
        chosen = sorted({calib.mmap.num_layers + layer if layer < 0 else layer for layer in layers})
        missing = [layer for layer in chosen if layer not in available]
        if missing:
            raise LLMProbeError(f"layers {missing} have no selected module; selected layers are "
                                f"{available[0]}..{available[-1]}")
    sites = [s for s in calib.sites if s.layer in chosen]
    tokens = TokenCollector(kurtosis=True)
    key_sites = _run(calib, [tokens], site=site, batch_size=batch_size, sites=sites,
                     description="token kurtosis")
    decode = _Decoder(calib)
    rows: list[TokenKurtosis] = []

    def add(scope: str, keys: list[str], layer=None, role=None) -> None:
        tables = [tokens.result(k) for k in keys]
        grouped = _by_token(torch.cat([t.token_ids for t in tables]), torch.cat([t.kurtosis for t in tables]),
                            len(keys))
        for rank, row in enumerate(_top_rows(grouped, "mean", top_k, min_count).itertuples(), start=1):
            rows.append(TokenKurtosis(scope=scope, layer=layer, role=role, estimator=ESTIMATOR, rank=rank,
                                      token_id=int(row.token_id), token_text=decode(row.token_id),
                                      occurrences=int(row.occurrences), samples=int(row.count),
                                      mean_kurtosis=float(row.mean), max_kurtosis=float(row.max)))

    for role, keys in _keys_by_roles(key_sites).items():
        add("role", keys, role=role)
    by_layer = _keys_by(key_sites, "layer")
    for layer in sorted(by_layer):
        add("layer", by_layer[layer], layer=layer)
    for layer in sorted(by_layer):
        in_layer = {k: key_sites[k] for k in by_layer[layer]}
        for role, keys in _keys_by_roles(in_layer).items():
            add("layer_role", keys, layer=layer, role=role)
    return {"token_kurtosis": rows}


# -- down projection spikes ------------------------------------------------------------------


def down_proj_sites(calib: Calibration) -> list[LinearSite]:
    """The selected MLP down projections (``mlp.down`` / ``mlp.fc2``); an error if there are none."""
    sites = [s for s in calib.sites if s.role in DOWN_PROJ_ROLES]
    if not sites:
        raise LLMProbeError("no MLP down projection (role mlp.down or mlp.fc2) among the selected modules")
    return sites


def down_proj_spikes(calib: Calibration, *, site: str = "input", top_k: int = 5, rank_by: str = "mean",
                     min_count: int = 1, batch_size: int = 1) -> Tables:
    """Top tokens by max|x| at each layer's MLP down projection (``mlp.down`` / ``mlp.fc2``):
    by token id (``rank_by`` mean — LMAnalyser's order — or max) and the largest single spikes,
    with the channel they sit in (massive activations sit in a few fixed channels)."""
    check_top_k(top_k)
    check_rank_by(rank_by)
    sites = down_proj_sites(calib)
    tokens = TokenCollector(argmax_channel=True)
    key_sites = _run(calib, [tokens], site=site, batch_size=batch_size, sites=sites,
                     description="down-proj spikes")
    decode = _Decoder(calib)
    by_id, by_position = [], []
    for s, key in _site_rows(calib, key_sites, site):
        if s.role not in DOWN_PROJ_ROLES:
            continue
        table = tokens.result(key)
        grouped = _by_token(table.token_ids, table.max_abs, 1)
        # Channel of each token id's single largest value.
        frame = pd.DataFrame({"token_id": table.token_ids.numpy(), "value": table.max_abs.numpy(),
                              "channel": table.argmax_channel.numpy()})
        peak_channel = frame.loc[frame.groupby("token_id")["value"].idxmax()].set_index("token_id")["channel"]
        for rank, row in enumerate(_top_rows(grouped, rank_by, top_k, min_count).itertuples(), start=1):
            by_id.append(DownProjSpike(layer=s.layer, module=s.name, role=s.role, rank=rank,
                                       token_id=int(row.token_id), token_text=decode(row.token_id),
                                       occurrences=int(row.occurrences), mean_max_abs=float(row.mean),
                                       max_max_abs=float(row.max),
                                       peak_channel=int(peak_channel[row.token_id])))
        for rank, index in enumerate(tokens.top_tokens(key, top_k).tolist(), start=1):
            by_position.append(DownProjSpikePosition(
                layer=s.layer, module=s.name, role=s.role, rank=rank, window=int(table.window[index]),
                position=int(table.position[index]), token_id=int(table.token_ids[index]),
                token_text=decode(table.token_ids[index]), max_abs=float(table.max_abs[index]),
                channel=int(table.argmax_channel[index])))
    return {"down_proj_spikes": by_id, "down_proj_spike_positions": by_position}


# -- token occurrence ------------------------------------------------------------------------



def _token_stands_for(text: str, target: str, exact: bool) -> bool:
    if exact:
        return text == target
    if text in (target, " " + target):
        return True
    if target.isspace():
        # BPE merges runs of whitespace into one token ("\n\n\n" is one SmolLM2 token, "\n    "
        # a newline plus indentation): such a token is one position where the target occurs.
        core = text if target == " " else text.strip(" ")
        return bool(core) and len(core) % len(target) == 0 and core == target * (len(core) // len(target))
    return False


def match_token_ids(tokenizer, target: str, candidate_ids, *, exact: bool = False) -> dict[int, str]:
    """Token ids among ``candidate_ids`` that stand for ``target`` as written inside text.

    Matching looks at the decoded text of the tokens that really occur, never at
    ``encode(target)[0]`` (which for many tokenizers is a different token than the one used in
    running text, or only the first piece of a split target). A token matches when its text is
    the target, or, unless ``exact``:

    * the target after one space: byte-level BPE writes a word after a space as its own token
      ("Ġthe") distinct from the line-initial one ("the"); both are the word;
    * for a whitespace target ("\n", "\t"), a run of it, possibly with spaces around
      ("ĊĊĊ", "ĠĊ", "Ċ    "): tokenizers merge such runs, and SmolLM2 writes WikiText's line
      breaks only that way. One such token is one occurrence (one position in the window).
    """
    if target == "":
        raise LLMProbeError("--target-token is empty; give the token's text, e.g. '\\n' or 'the'")
    found = {}
    for token_id in sorted({int(i) for i in candidate_ids}):
        text = tokenizer.decode([token_id])
        if _token_stands_for(text, target, exact):
            found[token_id] = text
    return found


def token_occurrence(calib: Calibration, *, target_token: str, site: str = "input", exact: bool = False,
                     max_occurrence: int | None = None, batch_size: int = 1) -> Tables:
    """max|x| at the k-th occurrence of ``target_token`` within a window, per module and per role.

    Occurrences are numbered among the tokens that enter statistics (after --exclude-bos /
    --exclude-tokens). A token that never occurs gives a summary row with zero occurrences and
    empty per-occurrence tables; the model is then not run at all.
    """
    if max_occurrence is not None and max_occurrence < 1:
        raise LLMProbeError(f"--max-occurrence must be at least 1; got {max_occurrence}")
    target = unescape_token(target_token)
    windows = calib.windows
    kept = calib.token_filter.keep_mask(windows)
    matched = match_token_ids(calib.lm.tokenizer, target, torch.unique(windows[kept]).tolist(), exact=exact)
    hits = torch.isin(windows, torch.tensor(sorted(matched), dtype=torch.int64)) & kept if matched else \
        torch.zeros_like(windows, dtype=torch.bool)
    per_window = hits.sum(dim=1)
    occurrences = int(per_window.sum())
    if occurrences == 0:
        # Say how the tokenizer splits the target: a multi-token target can never match one token.
        tokenizer = calib.lm.tokenizer
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(target, add_special_tokens=False)]
        note = (f"{target!r} does not occur as a token in the {windows.shape[0]} calibration windows "
                f"(on its own the tokenizer writes it as {len(pieces)} token(s): {pieces!r})")
    else:
        note = f"{occurrences} occurrences of {target!r} in {int((per_window > 0).sum())} windows"
    summary = TokenOccurrenceSummary(
        target=target, matched_token_ids=";".join(str(i) for i in sorted(matched)),
        matched_tokens=";".join(repr(matched[i]) for i in sorted(matched)), occurrences=occurrences,
        windows_with_token=int((per_window > 0).sum()), windows=int(windows.shape[0]),
        max_occurrence=int(per_window.max()) if per_window.numel() else 0, note=note)
    if occurrences == 0:
        return {"token_occurrence": [], "token_occurrence_roles": [], "token_occurrence_summary": [summary]}

    tokens = TokenCollector(keep_ids=matched)
    key_sites = _run(calib, [tokens], site=site, batch_size=batch_size, description="token occurrence")
    per_key: dict[str, pd.DataFrame] = {}
    for key in key_sites:
        table = tokens.result(key)
        frame = pd.DataFrame({"window": table.window.numpy(), "position": table.position.numpy(),
                              "value": table.max_abs.numpy().astype(np.float64)})
        frame = frame.sort_values(["window", "position"], kind="stable")
        frame["occurrence"] = frame.groupby("window").cumcount() + 1
        if max_occurrence is not None:
            frame = frame[frame["occurrence"] <= max_occurrence]
        per_key[key] = frame

    module_rows = []
    for s, key in _site_rows(calib, key_sites, site):
        stats = per_key[key].groupby("occurrence")["value"].agg(["count", "mean", "max"])
        for occurrence, row in stats.iterrows():
            module_rows.append(TokenOccurrence(**_module_fields(s, key), occurrence=int(occurrence),
                                               windows=int(row["count"]), mean_max_abs=float(row["mean"]),
                                               max_max_abs=float(row["max"])))
    role_rows = []
    for role, keys in _keys_by_roles(key_sites).items():
        pooled = pd.concat([per_key[k] for k in keys]).groupby("occurrence")["value"]
        for occurrence, row in pooled.agg(["count", "mean", "max"]).iterrows():
            role_rows.append(TokenOccurrenceRole(role=role, occurrence=int(occurrence),
                                                 samples=int(row["count"]), mean_max_abs=float(row["mean"]),
                                                 max_max_abs=float(row["max"])))
    return {"token_occurrence": module_rows, "token_occurrence_roles": role_rows,
            "token_occurrence_summary": [summary]}


# -- one prompt ------------------------------------------------------------------------------


def prompt_windows(lm, text: str) -> torch.Tensor:
    """[1, L] ids of ``text`` as the model normally sees it (with the tokenizer's special
    tokens, e.g. a Llama BOS)."""
    if text is None or not text.strip():
        raise LLMProbeError("--text is empty; give the prompt to analyse, e.g. --text 'The quick brown fox'")
    ids = lm.tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise LLMProbeError("--text encodes to no tokens")
    if lm.max_length is not None and len(ids) > lm.max_length:
        raise LLMProbeError(f"--text is {len(ids)} tokens, above this model's maximum of {lm.max_length}")
    return torch.tensor([ids], dtype=torch.int64)


def prompt(calib: Calibration, *, site: str = "input", batch_size: int = 1) -> Tables:
    """Per-token max|x| (and its channel) at every selected module for the calibration's single
    window (build it with :func:`prompt_windows`)."""
    if calib.windows.shape[0] != 1:
        raise LLMProbeError("prompt analysis takes exactly one input sequence")
    tokens = TokenCollector(argmax_channel=True)
    key_sites = _run(calib, [tokens], site=site, batch_size=batch_size, description="prompt")
    decode = _Decoder(calib)
    rows = []
    for s, key in _site_rows(calib, key_sites, site):
        table = tokens.result(key)
        for i in range(table.max_abs.numel()):
            rows.append(PromptTokenMagnitude(**_module_fields(s, key), position=int(table.position[i]),
                                             token_id=int(table.token_ids[i]),
                                             token_text=decode(table.token_ids[i]),
                                             max_abs=float(table.max_abs[i]),
                                             channel=int(table.argmax_channel[i])))
    peaks: dict[int, PromptTokenMagnitude] = {}
    for row in rows:  # first module in model order wins ties, so the peak is reproducible
        best = peaks.get(row.position)
        if best is None or row.max_abs > best.max_abs:
            peaks[row.position] = row
    peak_rows = [PromptTokenPeak(position=p.position, token_id=p.token_id, token_text=p.token_text,
                                 max_abs=p.max_abs, module=p.module, layer=p.layer, role=p.role,
                                 channel=p.channel)
                 for _, p in sorted(peaks.items())]
    return {"prompt_tokens": rows, "prompt_token_peaks": peak_rows}


# -- max / median ----------------------------------------------------------------------------


def _ratio(top: float, median: float) -> float:
    if median > 0:
        return top / median
    return math.inf if top > 0 else math.nan


def max_median(calib: Calibration, *, site: str = "input", batch_size: int = 1) -> Tables:
    """QFeP's outlier measure: token scales S = {max|x| over features of each token};
    ratio = max(S) / median(S), per module and per layer (all of a layer's inputs pooled,
    each distinct input once)."""
    tokens = TokenCollector()
    key_sites = _run(calib, [tokens], site=site, batch_size=batch_size, description="max-median")
    modules = []
    for s, key in _site_rows(calib, key_sites, site):
        scales = tokens.result(key).max_abs.numpy().astype(np.float64)
        if scales.size:
            top, median = float(np.max(scales)), float(np.median(scales))
        else:
            top, median = math.nan, math.nan
        modules.append(MaxMedianModule(**_module_fields(s, key), tokens=int(scales.size), scale_max=top,
                                       scale_median=median, ratio=_ratio(top, median)))
    layers = []
    for layer, keys in sorted((k, v) for k, v in _keys_by(key_sites, "layer").items() if k is not None):
        scales = np.concatenate([tokens.result(k).max_abs.numpy().astype(np.float64) for k in keys])
        if not scales.size:
            continue
        top, median = float(np.max(scales)), float(np.median(scales))
        layers.append(MaxMedianLayer(layer=layer, inputs=len(keys), tokens=int(scales.size), scale_max=top,
                                     scale_median=median, ratio=_ratio(top, median)))
    return {"max_median_modules": modules, "max_median_layers": layers}


# -- channel norms ---------------------------------------------------------------------------


def norms(calib: Calibration, *, site: str = "input", top_channels: int = 5, batch_size: int = 1) -> Tables:
    """Per channel E[x²] (Wanda), sqrt(E[x²]) and max|x| (SmoothQuant), and a per-module summary."""
    channels = ChannelCollector()
    key_sites = _run(calib, [channels], site=site, batch_size=batch_size, description="norms")
    long_rows, summaries = [], []
    for s, key in _site_rows(calib, key_sites, site):
        result = channels.result(key)
        mean_sq = result.mean_sq.numpy()
        rms = np.sqrt(mean_sq)
        abs_max = result.abs_max.numpy().astype(np.float64)
        fields = _module_fields(s, key)
        long_rows.extend(ChannelNorm(**fields, channel=j, mean_sq=float(mean_sq[j]),
                                     sqrt_mean_sq=float(rms[j]), abs_max=float(abs_max[j]))
                         for j in range(mean_sq.size))
        order = np.argsort(-abs_max, kind="stable")[:top_channels]
        median = float(np.median(abs_max)) if abs_max.size else math.nan
        summaries.append(ChannelNormSummary(
            **fields, channels=int(mean_sq.size), tokens=result.tokens, mean_sq_mean=float(np.mean(mean_sq)),
            sqrt_mean_sq_max=float(np.max(rms)), abs_max=float(np.max(abs_max)), abs_max_median=median,
            outlier_ratio=_ratio(float(np.max(abs_max)), median),
            top_channels=";".join(str(int(j)) for j in order)))
    return {"norms_channels": long_rows, "norms_modules": summaries}


# -- registered analyses (declared in llmprobe.catalog.activations) ---------------------------


def _job_result(tables: Tables, **manifest):
    from ..session import Result

    return Result(tables=tables, manifest=manifest)


def magnitude_job(job):
    o = job.options
    return _job_result(magnitude(job.calibration, site=o.site, top_k=o.top_k, rank_by=o.rank_by,
                                 min_count=o.min_count, batch_size=o.batch_size))


def kurtosis_job(job):
    o = job.options
    return _job_result(kurtosis(job.calibration, site=o.site, batch_size=o.batch_size), estimator=ESTIMATOR)


def token_kurtosis_job(job):
    o = job.options
    everything = o.layers is not None and o.layers.strip().lower() == "all"
    chosen = "all" if everything else o.layer_list()
    tables = token_kurtosis(job.calibration, site=o.site, layers=chosen, top_k=o.top_k, min_count=o.min_count,
                            batch_size=o.batch_size)
    layers = sorted({r.layer for r in tables["token_kurtosis"] if r.layer is not None})
    return _job_result(tables, estimator=ESTIMATOR, token_kurtosis_layers=layers)


def prepare_down_proj_job(job):
    down_proj_sites(job.calibration)  # no down projection: fail before the output folder exists


def down_proj_spikes_job(job):
    o = job.options
    return _job_result(down_proj_spikes(job.calibration, site=o.site, top_k=o.top_k, rank_by=o.rank_by,
                                        min_count=o.min_count, batch_size=o.batch_size))


def token_occurrence_job(job):
    o = job.options
    tables = token_occurrence(job.calibration, target_token=o.target_token, site=o.site, exact=o.exact,
                              max_occurrence=o.max_occurrence, batch_size=o.batch_size)
    summary = tables["token_occurrence_summary"][0]
    result = _job_result(tables, target_token=unescape_token(o.target_token),
                         token_occurrence={"matched_token_ids": summary.matched_token_ids,
                                           "occurrences": summary.occurrences})
    result.notes.append(summary.note)
    return result


def prepare_prompt_job(job):
    ids = prompt_windows(job.lm, job.options.text)
    job.state["calibration"] = job.session.calibration(job.options, windows=ids)


def prompt_job(job):
    return _job_result(prompt(job.calibration, site=job.options.site))


def max_median_job(job):
    o = job.options
    return _job_result(max_median(job.calibration, site=o.site, batch_size=o.batch_size))


def norms_job(job):
    o = job.options
    return _job_result(norms(job.calibration, site=o.site, top_channels=o.top_channels, batch_size=o.batch_size))
