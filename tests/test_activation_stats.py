"""Activation statistics against an independent reference.

The reference captures every linear module's input (or output) with a plain PyTorch hook, one
window at a time, and computes each statistic with numpy/scipy. llmprobe's ModuleMap is used
only to name which modules share an input (to know which rows are one "sample"), never to
produce a number. Every statistic must agree to 1e-5 relative.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from functools import cache

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from conftest import assert_one_line_error
from tiny import BOS_ID, save_tiny_model_dir
from torch import nn

from llmprobe.analyses import activation_stats as stats
from llmprobe.core.calibration import prepare
from llmprobe.core.collect import Batch, collect
from llmprobe.core.collectors import ChannelCollector, MomentCollector, Moments, TokenCollector
from llmprobe.core.loading import load_model
from llmprobe.core.modulemap import ModuleMap

# Two shared CPU cores: one intra-op thread is much faster than two threads fighting.
torch.set_num_threads(1)

RTOL = 1e-5
ATOL = 1e-9
ARCHS = ("llama", "gpt2", "opt", "falcon")
WINDOWS, LENGTH = 3, 20


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_stats")
    return {arch: save_tiny_model_dir(arch, root / arch) for arch in ("llama", "gpt2", "opt", "falcon")}


@cache
def _lm(path: str):
    return load_model(path, dtype="fp32", device="cpu")


@pytest.fixture
def tiny_lm(tiny_dirs):
    return lambda arch: _lm(str(tiny_dirs[arch]))


def make_windows(seed: int = 0, with_bos: bool = True) -> torch.Tensor:
    # Random ids stay below 300 so the ids planted below (300, 301) occur exactly where placed.
    ids = torch.randint(4, 300, (WINDOWS, LENGTH), generator=torch.Generator().manual_seed(seed))
    # A few tokens repeat so per-token aggregation has counts above one.
    ids[:, 5] = 300
    ids[1, 11] = 300
    ids[2, 3] = 301
    if with_bos:
        ids[:, 0] = BOS_ID
        ids[1, 7] = BOS_ID  # a BOS in the middle of a window, also dropped by --exclude-bos
    return ids


# -- the independent reference --------------------------------------------------------------------


def linear_names(model: nn.Module) -> list[str]:
    """Every Linear / Conv1D except the output head, found without llmprobe."""
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and module is not head]


def capture(model: nn.Module, windows: torch.Tensor, names, site: str = "input"):
    """name -> [per window: float64 array [L, F]] with plain hooks, one window per forward."""
    captured = {name: [] for name in names}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def store(tensor, name=name):
            captured[name].append(tensor.detach().reshape(-1, tensor.shape[-1]).double().numpy().copy())

        if site == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, store=store: store(args[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, store=store: store(out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window.unsqueeze(0), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def keep_masks(windows: torch.Tensor, exclude_bos=False, exclude_ids=()) -> list[np.ndarray]:
    masks = []
    for row in windows.numpy():
        keep = np.ones(len(row), dtype=bool)
        if exclude_bos:
            keep[0] = False
            keep &= row != BOS_ID
        for token in exclude_ids:
            keep &= row != token
        masks.append(keep)
    return masks


def reference(lm, windows, *, site="input", exclude_bos=False, exclude_ids=(), rotate=False):
    """name -> list of per-window [kept tokens, F] arrays, plus per-window kept ids/positions."""
    raw = capture(lm.model, windows, linear_names(lm.model), site)
    masks = keep_masks(windows, exclude_bos, exclude_ids)
    acts = {}
    for name, chunks in raw.items():
        acts[name] = []
        for chunk, keep in zip(chunks, masks):
            x = chunk[keep]
            if rotate:
                n = x.shape[1]
                x = x @ (scipy.linalg.hadamard(n) / math.sqrt(n)).T
            acts[name].append(x)
    ids = [row[keep] for row, keep in zip(windows.numpy(), masks)]
    positions = [np.arange(windows.shape[1])[keep] for keep in masks]
    return acts, ids, positions


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, dtype=float), np.asarray(expected, dtype=float),
                               rtol=rtol, atol=atol)


def groups_of(lm, site="input") -> dict[str, str]:
    """module -> the key its statistics are collected under (shared inputs share one key)."""
    mmap = ModuleMap(lm.model)
    return {s.name: (s.input_group if site == "input" else s.name) for s in mmap.linears}


def token_frame(acts, ids, positions, modules, group_of, value=lambda x: np.abs(x).max(axis=1)):
    """Rows (token_id, window, position, key, value) over the distinct keys of ``modules``."""
    keys = {}
    for name in modules:
        keys.setdefault(group_of[name], name)
    rows = []
    for key, name in keys.items():
        for w, chunk in enumerate(acts[name]):
            for token, pos, v in zip(ids[w], positions[w], value(chunk)):
                rows.append((int(token), w, int(pos), key, float(v)))
    return rows, len(keys)


def by_token(rows):
    out = defaultdict(list)
    for token, _, _, _, v in rows:
        if not math.isnan(v):
            out[token].append(v)
    return out


def per_row_kurtosis(x):
    return scipy.stats.kurtosis(x, axis=1, fisher=True, bias=True)


# -- magnitude and kurtosis on four architectures -------------------------------------------------


def check_magnitude(tables, acts, ids, positions, group_of, top_k):
    modules = tables["magnitude_modules"]
    assert {r.module for r in modules} == set(acts)
    for row in modules:
        chunks = acts[row.module]
        close(row.abs_max, max(np.abs(c).max() for c in chunks))
        close(row.window_abs_max_mean, np.mean([np.abs(c).max() for c in chunks]))
        assert row.tokens == sum(len(c) for c in chunks)
        assert row.windows == len(chunks)
    by_layer = defaultdict(list)
    by_role = defaultdict(list)
    for row in modules:
        peak = max(np.abs(c).max() for c in acts[row.module])
        window_mean = np.mean([np.abs(c).max() for c in acts[row.module]])
        by_layer[row.layer].append((peak, window_mean))
        by_role[row.role].append((peak, window_mean))
    for row in tables["magnitude_layers"]:
        values = np.array(by_layer[row.layer])
        close([row.abs_max, row.module_abs_max_mean, row.window_abs_max_mean],
              [values[:, 0].max(), values[:, 0].mean(), values[:, 1].mean()])
    assert len(tables["magnitude_roles"]) == len(by_role)
    for row in tables["magnitude_roles"]:
        values = np.array(by_role[row.role])
        close([row.abs_max, row.module_abs_max_mean, row.window_abs_max_mean],
              [values[:, 0].max(), values[:, 0].mean(), values[:, 1].mean()])
    for row in tables["magnitude_role_layers"]:
        peaks = [max(np.abs(c).max() for c in acts[m.module]) for m in modules
                 if m.role == row.role and m.layer == row.layer]
        close(row.abs_max, max(peaks))
    # Tokens, scope "all": samples over the distinct inputs, ranked by max.
    rows, n_keys = token_frame(acts, ids, positions, list(acts), group_of)
    agg = by_token(rows)
    expected = sorted(agg, key=lambda t: (-max(agg[t]), t))[:top_k]
    got = [r for r in tables["magnitude_tokens"] if r.scope == "all"]
    assert [r.token_id for r in got] == expected
    for r in got:
        close([r.mean_max_abs, r.max_max_abs], [np.mean(agg[r.token_id]), max(agg[r.token_id])])
        assert r.samples == len(agg[r.token_id]) and r.occurrences == len(agg[r.token_id]) // n_keys
    # Role scopes (a shared input's scope is labelled with all its roles).
    for scope in {r.scope for r in tables["magnitude_tokens"]} - {"all"}:
        members = [m.module for m in modules if m.role in scope.split("+")]
        agg = by_token(token_frame(acts, ids, positions, members, group_of)[0])
        got = [r for r in tables["magnitude_tokens"] if r.scope == scope]
        assert [r.token_id for r in got] == sorted(agg, key=lambda t: (-max(agg[t]), t))[:top_k]
        for r in got:
            close([r.mean_max_abs, r.max_max_abs], [np.mean(agg[r.token_id]), max(agg[r.token_id])])


def check_kurtosis(tables, acts):
    modules = tables["kurtosis_modules"]
    assert {r.module for r in modules} == set(acts)
    expected_window = {}
    expected_pooled = {}
    for row in modules:
        chunks = acts[row.module]
        per_window = [scipy.stats.kurtosis(c.ravel(), fisher=True, bias=True) for c in chunks]
        pooled = np.concatenate([c.ravel() for c in chunks])
        expected_window[row.module] = np.mean(per_window)
        expected_pooled[row.module] = scipy.stats.kurtosis(pooled, fisher=True, bias=True)
        assert row.estimator == "excess_fisher_biased"
        close(row.kurtosis_window_mean, expected_window[row.module])
        close(row.kurtosis_pooled, expected_pooled[row.module])
        close([row.mean, row.std, row.skewness],
              [pooled.mean(), pooled.std(), scipy.stats.skew(pooled, bias=True)])
    for row in tables["kurtosis_layers"]:
        names = [m.module for m in modules if m.layer == row.layer]
        close([row.kurtosis_window_mean, row.kurtosis_pooled_mean, row.kurtosis_pooled_max],
              [np.mean([expected_window[n] for n in names]), np.mean([expected_pooled[n] for n in names]),
               np.max([expected_pooled[n] for n in names])])
    for row in tables["kurtosis_roles"]:
        names = [m.module for m in modules if m.role == row.role]
        close([row.kurtosis_window_mean, row.kurtosis_pooled_mean],
              [np.mean([expected_window[n] for n in names]), np.mean([expected_pooled[n] for n in names])])


@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_and_kurtosis_match_reference(tiny_lm, arch):
    lm = tiny_lm(arch)
    windows = make_windows()
    calib = prepare(lm, windows=windows, seqlen=LENGTH)
    acts, ids, positions = reference(lm, windows)
    check_magnitude(stats.magnitude(calib, top_k=6), acts, ids, positions, groups_of(lm), top_k=6)
    check_kurtosis(stats.kurtosis(calib, batch_size=2), acts)


def test_output_site_matches_reference(tiny_lm):
    lm = tiny_lm("llama")
    windows = make_windows()
    calib = prepare(lm, windows=windows, seqlen=LENGTH)
    acts, ids, positions = reference(lm, windows, site="output")
    check_kurtosis(stats.kurtosis(calib, site="output"), acts)
    check_magnitude(stats.magnitude(calib, site="output", top_k=4), acts, ids, positions,
                    groups_of(lm, "output"), top_k=4)


def test_exclude_bos_and_tokens_remove_tokens(tiny_lm):
    lm = tiny_lm("llama")
    windows = make_windows()
    excluded = [300, 301]
    calib = prepare(lm, windows=windows, seqlen=LENGTH, exclude_bos=True,
                    exclude_tokens=[str(t) for t in excluded])
    acts, ids, positions = reference(lm, windows, exclude_bos=True, exclude_ids=excluded)
    kept = sum(len(i) for i in ids)
    assert kept == WINDOWS * LENGTH - WINDOWS - 1 - (WINDOWS + 1) - 1  # BOS ×4, 300 ×4, 301 ×1
    tables = stats.magnitude(calib, top_k=50)
    check_magnitude(tables, acts, ids, positions, groups_of(lm), top_k=50)
    assert all(r.tokens == kept for r in tables["magnitude_modules"])
    assert not {BOS_ID, *excluded} & {r.token_id for r in tables["magnitude_tokens"]}
    check_kurtosis(stats.kurtosis(calib), acts)
    # The statistics really change when the tokens come back.
    full = stats.kurtosis(prepare(lm, windows=windows, seqlen=LENGTH))["kurtosis_modules"]
    assert any(abs(a.kurtosis_pooled - b.kurtosis_pooled) > 1e-3
               for a, b in zip(full, stats.kurtosis(calib)["kurtosis_modules"]))


def test_exclude_tokens_by_text(tiny_lm):
    lm = tiny_lm("llama")
    windows = make_windows()
    text = lm.tokenizer.decode([300])
    # The token as the tokenizer spells it (byte-level "Ġ..." form), not an id.
    spelled = lm.tokenizer.convert_ids_to_tokens(300)
    calib = prepare(lm, windows=windows, seqlen=LENGTH, exclude_tokens=[spelled])
    assert 300 in calib.token_filter.exclude_ids, text
    acts, _ids, _positions = reference(lm, windows, exclude_ids=[300])
    check_kurtosis(stats.kurtosis(calib), acts)


def test_hadamard_rotation_equals_reference_on_rotated_inputs(tiny_lm):
    lm = tiny_lm("llama")
    windows = make_windows()
    calib = prepare(lm, windows=windows, seqlen=LENGTH, rotate="hadamard")
    acts, ids, positions = reference(lm, windows, rotate=True)
    check_kurtosis(stats.kurtosis(calib), acts)
    check_magnitude(stats.magnitude(calib, top_k=5), acts, ids, positions, groups_of(lm), top_k=5)
    check_norms(stats.norms(calib), acts)


# -- the other analyses ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_token_kurtosis_matches_reference(tiny_lm, arch):
    lm = tiny_lm(arch)
    windows = make_windows()
    calib = prepare(lm, windows=windows, seqlen=LENGTH, exclude_bos=True)
    acts, ids, positions = reference(lm, windows, exclude_bos=True)
    group_of = groups_of(lm)
    layer_of = {s.name: s.layer for s in ModuleMap(lm.model).linears}
    role_of = {s.name: s.role for s in ModuleMap(lm.model).linears}
    rows = stats.token_kurtosis(calib, layers=[1], top_k=4)["token_kurtosis"]
    assert rows and {r.layer for r in rows if r.layer is not None} == {1}
    for scope in ("role", "layer", "layer_role"):
        for label in {(r.layer, r.role) for r in rows if r.scope == scope}:
            layer, role = label
            members = [n for n in acts if layer_of[n] == 1 and (layer is None or layer_of[n] == layer)
                       and (role is None or role_of[n] in role.split("+"))]
            agg = by_token(token_frame(acts, ids, positions, members, group_of, per_row_kurtosis)[0])
            expected = sorted(agg, key=lambda t: (-np.mean(agg[t]), t))[:4]
            got = [r for r in rows if r.scope == scope and (r.layer, r.role) == label]
            assert [r.token_id for r in got] == expected
            for r in got:
                close([r.mean_kurtosis, r.max_kurtosis], [np.mean(agg[r.token_id]), max(agg[r.token_id])])


def test_token_kurtosis_default_layers_are_a_spread(tiny_dirs, tmp_path):
    deep = save_tiny_model_dir("llama", tmp_path / "deep", num_layers=7)
    lm = load_model(str(deep), dtype="fp32", device="cpu")
    calib = prepare(lm, windows=make_windows(), seqlen=LENGTH)
    rows = stats.token_kurtosis(calib, top_k=2)["token_kurtosis"]
    assert {r.layer for r in rows if r.layer is not None} == {0, 3, 6}
    rows = stats.token_kurtosis(calib, layers="all", top_k=1)["token_kurtosis"]
    assert {r.layer for r in rows if r.layer is not None} == set(range(7))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_down_proj_spikes_match_reference(tiny_lm, arch):
    lm = tiny_lm(arch)
    windows = make_windows()
    calib = prepare(lm, windows=windows, seqlen=LENGTH)
    acts, ids, positions = reference(lm, windows)
    tables = stats.down_proj_spikes(calib, top_k=3)
    down = [s for s in ModuleMap(lm.model).linears if s.role in ("mlp.down", "mlp.fc2")]
    assert {r.module for r in tables["down_proj_spikes"]} == {s.name for s in down}
    for s in down:
        chunks = acts[s.name]
        agg = defaultdict(list)
        spikes = []
        for w, chunk in enumerate(chunks):
            peaks = np.abs(chunk).max(axis=1)
            for token, pos, peak, channel in zip(ids[w], positions[w], peaks, np.abs(chunk).argmax(axis=1)):
                agg[int(token)].append(peak)
                spikes.append((peak, w, int(pos), int(token), int(channel)))
        got = [r for r in tables["down_proj_spikes"] if r.module == s.name]
        assert [r.token_id for r in got] == sorted(agg, key=lambda t: (-np.mean(agg[t]), t))[:3]
        for r in got:
            close([r.mean_max_abs, r.max_max_abs], [np.mean(agg[r.token_id]), max(agg[r.token_id])])
            assert r.occurrences == len(agg[r.token_id])
        top = sorted(spikes, key=lambda t: -t[0])[:3]
        got = [r for r in tables["down_proj_spike_positions"] if r.module == s.name]
        assert [(r.window, r.position, r.token_id, r.channel) for r in got] == [t[1:] for t in top]
        close([r.max_abs for r in got], [t[0] for t in top])


def test_token_occurrence_matches_reference(tiny_lm):
    lm = tiny_lm("llama")
    windows = make_windows()
    calib = prepare(lm, windows=windows, seqlen=LENGTH)
    target = lm.tokenizer.decode([300])
    matching = {i for i in range(len(lm.tokenizer)) if lm.tokenizer.decode([i]) == target}
    acts, ids, _positions = reference(lm, windows)
    tables = stats.token_occurrence(calib, target_token=target, exact=True)
    summary = tables["token_occurrence_summary"][0]
    hits = [np.isin(row, list(matching)) for row in ids]
    assert summary.occurrences == sum(int(h.sum()) for h in hits) >= 4
    assert summary.max_occurrence == max(int(h.sum()) for h in hits)
    for row in tables["token_occurrence"]:
        values = [np.abs(acts[row.module][w][np.flatnonzero(h)[row.occurrence - 1]]).max()
                  for w, h in enumerate(hits) if h.sum() >= row.occurrence]
        assert row.windows == len(values)
        close([row.mean_max_abs, row.max_max_abs], [np.mean(values), np.max(values)])
    occurrences = {r.occurrence for r in tables["token_occurrence"]}
    assert occurrences == set(range(1, summary.max_occurrence + 1))
    for row in tables["token_occurrence_roles"]:
        group_of = groups_of(lm)
        keys = {group_of[n]: n for n in acts if ModuleMap(lm.model).site(n).role in row.role.split("+")}
        values = [np.abs(acts[name][w][np.flatnonzero(h)[row.occurrence - 1]]).max()
                  for name in keys.values() for w, h in enumerate(hits) if h.sum() >= row.occurrence]
        close([row.mean_max_abs, row.max_max_abs], [np.mean(values), np.max(values)])
        assert row.samples == len(values)


def test_token_occurrence_absent_token_reports_zero(tiny_lm):
    lm = tiny_lm("llama")
    calib = prepare(lm, windows=make_windows(), seqlen=LENGTH)
    tables = stats.token_occurrence(calib, target_token="Zebra-never-here")
    summary = tables["token_occurrence_summary"][0]
    assert summary.occurrences == 0 and summary.windows_with_token == 0
    assert "does not occur" in summary.note
    assert tables["token_occurrence"] == []


def test_token_matching_handles_escapes_and_space_variants(embedded):
    tokenizer = embedded.tokenizer
    newline = stats.unescape_token("\\n")
    assert newline == "\n"
    candidates = tokenizer.encode("a\nb \n c the\n\n\nthe - --", add_special_tokens=False)
    matched = stats.match_token_ids(tokenizer, newline, candidates)
    # SmolLM2 writes a newline as the byte-level token "Ċ", after a space as "ĠĊ", and merges a
    # run of newlines into one token ("ĊĊ" here; WikiText's paragraph breaks become "ĊĊĊ").
    assert {tokenizer.convert_ids_to_tokens(i) for i in matched} == {"Ċ", "ĠĊ", "ĊĊ"}
    assert set(stats.match_token_ids(tokenizer, newline, candidates, exact=True).values()) == {"\n"}
    # Runs count only for whitespace targets: "--" is not an occurrence of "-".
    assert set(stats.match_token_ids(tokenizer, "-", candidates).values()) == {" -"}
    # A word matches at the start of a line and after a space, unless --exact.
    assert set(stats.match_token_ids(tokenizer, "the", candidates).values()) == {"the", " the"}
    assert set(stats.match_token_ids(tokenizer, "the", candidates, exact=True).values()) == {"the"}


def test_prompt_matches_reference(tiny_lm):
    lm = tiny_lm("gpt2")
    ids = stats.prompt_windows(lm, "The quick brown fox jumps over the lazy dog.")
    calib = prepare(lm, windows=ids, seqlen=ids.shape[1])
    acts, _kept, _positions = reference(lm, ids)
    tables = stats.prompt(calib)
    rows = tables["prompt_tokens"]
    assert len(rows) == len(acts) * ids.shape[1]
    for row in rows:
        x = acts[row.module][0][row.position]
        close(row.max_abs, np.abs(x).max())
        assert row.channel == int(np.abs(x).argmax()) and row.token_id == int(ids[0, row.position])
    for peak in tables["prompt_token_peaks"]:
        close(peak.max_abs, max(np.abs(acts[n][0][peak.position]).max() for n in acts))


def test_prompt_rejects_empty_text(tiny_lm):
    from llmprobe.core.errors import LLMProbeError

    with pytest.raises(LLMProbeError, match="empty"):
        stats.prompt_windows(tiny_lm("llama"), "   ")


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_max_median_matches_reference(tiny_lm, arch):
    lm = tiny_lm(arch)
    windows = make_windows()
    calib = prepare(lm, windows=windows, seqlen=LENGTH, exclude_bos=True)
    acts, _, _ = reference(lm, windows, exclude_bos=True)
    tables = stats.max_median(calib)
    for row in tables["max_median_modules"]:
        scales = np.concatenate([np.abs(c).max(axis=1) for c in acts[row.module]])
        close([row.scale_max, row.scale_median, row.ratio],
              [scales.max(), np.median(scales), scales.max() / np.median(scales)])
    group_of = groups_of(lm)
    layer_of = {s.name: s.layer for s in ModuleMap(lm.model).linears}
    for row in tables["max_median_layers"]:
        keys = {group_of[n]: n for n in acts if layer_of[n] == row.layer}
        scales = np.concatenate([np.abs(c).max(axis=1) for n in keys.values() for c in acts[n]])
        assert row.inputs == len(keys) and row.tokens == scales.size
        close([row.scale_max, row.scale_median, row.ratio],
              [scales.max(), np.median(scales), scales.max() / np.median(scales)])


def check_norms(tables, acts):
    long_rows = defaultdict(dict)
    for row in tables["norms_channels"]:
        long_rows[row.module][row.channel] = row
    assert set(long_rows) == set(acts)
    for name, chunks in acts.items():
        x = np.concatenate(chunks)
        rows = [long_rows[name][j] for j in range(x.shape[1])]
        close([r.mean_sq for r in rows], (x ** 2).mean(axis=0))
        close([r.sqrt_mean_sq for r in rows], np.sqrt((x ** 2).mean(axis=0)))
        close([r.abs_max for r in rows], np.abs(x).max(axis=0))
    for summary in tables["norms_modules"]:
        x = np.concatenate(acts[summary.module])
        channel_max = np.abs(x).max(axis=0)
        close([summary.abs_max, summary.abs_max_median, summary.mean_sq_mean, summary.outlier_ratio],
              [channel_max.max(), np.median(channel_max), (x ** 2).mean(),
               channel_max.max() / np.median(channel_max)])
        assert int(summary.top_channels.split(";")[0]) == int(channel_max.argmax())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_norms_match_reference(tiny_lm, arch):
    lm = tiny_lm(arch)
    windows = make_windows()
    calib = prepare(lm, windows=windows, seqlen=LENGTH)
    acts, _, _ = reference(lm, windows)
    check_norms(stats.norms(calib, batch_size=3), acts)


# -- collectors: numerics and memory ---------------------------------------------------------------


def _batch(x: torch.Tensor, window: int) -> Batch:
    n = x.shape[0]
    return Batch(x=x, token_ids=torch.zeros(n, dtype=torch.int64), window=torch.full((n,), window),
                 position=torch.arange(n))


def test_moments_are_exact_with_a_large_mean():
    # |mean| / std = 1e5: raw power sums would cancel catastrophically in fp64.
    generator = np.random.default_rng(0)
    chunks = [(1e5 + generator.standard_t(5, size=(64, 16))).astype(np.float32) for _ in range(4)]
    collector = MomentCollector()
    for w, chunk in enumerate(chunks):
        collector.update("k", _batch(torch.from_numpy(chunk), w))
    result = collector.result("k")
    values = [c.astype(np.float64) for c in chunks]
    close(result.kurtosis_pooled, scipy.stats.kurtosis(np.concatenate(values).ravel(), bias=True), rtol=1e-9)
    close(result.kurtosis_window_mean, np.mean([scipy.stats.kurtosis(v.ravel(), bias=True) for v in values]),
          rtol=1e-9)
    close(result.std, np.concatenate(values).std(), rtol=1e-9)


def _exact_moments(part: np.ndarray) -> Moments:
    centred = part - part.mean()
    return Moments(part.size, part.mean(), (centred ** 2).sum(), (centred ** 3).sum(), (centred ** 4).sum())


def test_moment_merge_is_independent_of_the_split():
    values = np.random.default_rng(1).lognormal(size=1000)
    whole = _exact_moments(values)
    pieces = Moments()
    for start, stop in [(0, 1), (1, 10), (10, 400), (400, 1000)]:
        pieces = pieces.merge(_exact_moments(values[start:stop]))
    close([pieces.n, pieces.mean, pieces.m2, pieces.m3, pieces.m4],
          [whole.n, whole.mean, whole.m2, whole.m3, whole.m4], rtol=1e-10)
    close(pieces.excess_kurtosis, scipy.stats.kurtosis(values, bias=True), rtol=1e-10)


def test_collector_memory_does_not_grow_with_windows(tiny_lm):
    lm = tiny_lm("llama")
    mmap = ModuleMap(lm.model)
    sizes = {}
    for count in (2, 6):
        windows = torch.randint(4, 512, (count, LENGTH), generator=torch.Generator().manual_seed(count))
        collectors = (MomentCollector(), ChannelCollector(),
                      TokenCollector(kurtosis=True, argmax_channel=True))
        collect(lm.model, mmap, mmap.select(), windows, collectors, batch_size=2)
        for c in collectors:
            c.result(c.keys()[0])  # finishing must not change the comparison
        sizes[count] = [c.state_nbytes() for c in collectors]
    assert sizes[2][0] == sizes[6][0] > 0
    assert sizes[2][1] == sizes[6][1] > 0
    # Per-token scalars are the one thing that grows: exactly in proportion to the tokens.
    assert sizes[6][2] == 3 * sizes[2][2]
    keys = len(mmap.input_groups(mmap.select()))
    # int32 id/window/position once, then per key fp32 max|x|, fp32 kurtosis and int32 channel.
    per_token = 3 * 4 + keys * (4 + 4 + 4)
    assert sizes[2][2] == 2 * LENGTH * per_token


# -- CLI: end to end on the embedded model -------------------------------------------------------


def _run(cli, wikitext_path, tmp_path, *args, data=True):
    out = tmp_path / "out"
    extra = ["--dataset", str(wikitext_path), "--nsamples", "2", "--seqlen", "48"] if data else []
    result = cli("activations", *args, *extra, "--out", str(out), "--quiet")
    assert result.code == 0, result
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    return out, result, manifest


def _png_ok(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_magnitude(cli, wikitext_path, tmp_path, embedded):
    out, result, manifest = _run(cli, wikitext_path, tmp_path, "magnitude", "--plot", "--top-k", "5")
    for table in ("magnitude_modules", "magnitude_layers", "magnitude_roles", "magnitude_role_layers",
                  "magnitude_tokens"):
        assert (out / f"{table}.csv").is_file() and (out / f"{table}.json").is_file()
    for figure in ("magnitude_per_layer", "magnitude_per_role", "magnitude_role_layers",
                   "magnitude_top_tokens"):
        _png_ok(out / f"{figure}.png")
    layers = json.loads((out / "magnitude_layers.json").read_text())
    assert [row["layer"] for row in layers] == list(range(30))
    assert manifest["nsamples"] == 2 and manifest["seqlen"] == 48 and manifest["dataset"]["text_sha256"]
    assert "max|x| per layer" in result.stdout


@pytest.mark.slow
def test_cli_kurtosis_json_and_rotation(cli, wikitext_path, tmp_path, embedded):
    out = tmp_path / "k"
    result = cli("activations", "kurtosis", "--dataset", str(wikitext_path), "--nsamples", "2",
                 "--seqlen", "48", "--layers", "0,29", "--rotate", "hadamard", "--exclude-bos", "--json",
                 "--out", str(out), "--quiet")
    assert result.code == 0, result
    rows = json.loads(result.stdout)
    assert [row["layer"] for row in rows] == [0, 29]
    modules = json.loads((out / "kurtosis_modules.json").read_text())
    assert {m["estimator"] for m in modules} == {"excess_fisher_biased"}
    assert all(m["tokens"] == 2 * 47 for m in modules)  # first token of each window dropped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rotation"] == "hadamard" and manifest["exclude_bos"] is True


@pytest.mark.slow
def test_cli_token_kurtosis(cli, wikitext_path, tmp_path, embedded):
    out, _, manifest = _run(cli, wikitext_path, tmp_path, "token-kurtosis", "--roles", "mlp.down", "--plot")
    rows = json.loads((out / "token_kurtosis.json").read_text())
    assert {row["layer"] for row in rows if row["layer"] is not None} == {0, 14, 29}
    assert manifest["token_kurtosis_layers"] == [0, 14, 29]
    _png_ok(out / "token_kurtosis_by_role.png")
    _png_ok(out / "token_kurtosis_by_layer.png")


@pytest.mark.slow
def test_cli_down_proj_spikes(cli, wikitext_path, tmp_path, embedded):
    out, _, _ = _run(cli, wikitext_path, tmp_path, "down-proj-spikes", "--plot", "--top-k", "3",
                     "--layers", "16-29")
    rows = json.loads((out / "down_proj_spikes.json").read_text())
    assert {row["layer"] for row in rows} == set(range(16, 30))
    assert {row["role"] for row in rows} == {"mlp.down"}
    spikes = json.loads((out / "down_proj_spike_positions.json").read_text())
    assert len(spikes) == 14 * 3
    # 14 layers: one figure of 12 panels and one of 2.
    assert sorted(p.name for p in out.glob("down_proj_spikes*.png")) == ["down_proj_spikes_1.png",
                                                                          "down_proj_spikes_2.png"]
    _png_ok(out / "down_proj_spikes_1.png")


def test_token_panels_split_over_figures_for_many_layers():
    from llmprobe.plots.activations import token_bar_panels

    groups = {f"layer {i}": [(" tok", 1.0 + i, 2)] for i in range(30)}
    figures = token_bar_panels(groups, title="spikes", xlabel="max|x|")
    assert [len([ax for ax in f.axes if ax.get_visible()]) for f in figures] == [12, 12, 6]


@pytest.mark.slow
def test_cli_token_occurrence_newline(cli, wikitext_path, tmp_path, embedded):
    out, _, _ = _run(cli, wikitext_path, tmp_path, "token-occurrence", "--target-token", "\\n",
                     "--roles", "mlp.down", "--plot")
    summary = json.loads((out / "token_occurrence_summary.json").read_text())[0]
    assert summary["target"] == "\n" and summary["occurrences"] > 0
    roles = json.loads((out / "token_occurrence_roles.json").read_text())
    assert roles and roles[0]["occurrence"] == 1
    _png_ok(out / "token_occurrence.png")


@pytest.mark.slow
def test_cli_token_occurrence_absent_token(cli, wikitext_path, tmp_path, embedded):
    out, _, _ = _run(cli, wikitext_path, tmp_path, "token-occurrence", "--target-token", "Zyzzyvaqq",
                     "--roles", "mlp.down")
    summary = json.loads((out / "token_occurrence_summary.json").read_text())[0]
    assert summary["occurrences"] == 0


@pytest.mark.slow
def test_cli_prompt(cli, tmp_path, embedded):
    out, _, _ = _run(cli, None, tmp_path, "prompt", "--text", "The quick brown fox jumps over the lazy dog.",
                     "--plot", data=False)
    rows = json.loads((out / "prompt_tokens.json").read_text())
    assert {row["layer"] for row in rows} == set(range(30))
    peaks = json.loads((out / "prompt_token_peaks.json").read_text())
    assert len(peaks) == len(embedded.tokenizer.encode("The quick brown fox jumps over the lazy dog."))
    _png_ok(out / "prompt_heatmap.png")
    _png_ok(out / "prompt_lines.png")


@pytest.mark.slow
def test_cli_max_median(cli, wikitext_path, tmp_path, embedded):
    out, _, _ = _run(cli, wikitext_path, tmp_path, "max-median", "--plot")
    layers = json.loads((out / "max_median_layers.json").read_text())
    assert len(layers) == 30 and all(row["ratio"] >= 1 for row in layers)
    _png_ok(out / "max_median_per_layer.png")


@pytest.mark.slow
def test_cli_norms(cli, wikitext_path, tmp_path, embedded):
    out, _, _ = _run(cli, wikitext_path, tmp_path, "norms", "--layers", "3", "--plot")
    channels = json.loads((out / "norms_channels.json").read_text())
    assert len(channels) == 6 * 576 + 1536  # q, k, v, o, gate, up read 576 channels; down reads 1536
    _png_ok(out / "norms_channel_profile.png")


# -- CLI: bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("bad_input") / "llama")


@pytest.mark.parametrize("args, needle", [
    (["magnitude", "--roles", "attn.zz"], "unknown role"),
    (["kurtosis", "--layers", "7"], "out of range"),
    (["max-median", "--filter", "(unclosed"], "bad regex"),
    (["norms", "--rotate", "fourier"], "--rotate"),
    (["magnitude", "--nsamples", "100000"], "--nsamples"),
    (["kurtosis", "--site", "middle"], "--site"),
    (["magnitude", "--rank-by", "median"], "--rank-by"),
    (["token-kurtosis", "--top-k", "0"], "--top-k"),
])
def test_cli_bad_input_is_one_line(cli, wikitext_path, tiny_model_dir, tmp_path, args, needle):
    command, *options = args
    # The option under test comes last so it overrides the defaults given here.
    result = cli("activations", command, "--model", str(tiny_model_dir), "--dataset", str(wikitext_path),
                 "--seqlen", "32", "--nsamples", "2", "--out", str(tmp_path / "out"), "--quiet", *options)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_cli_empty_prompt_is_one_line(cli, tiny_model_dir, tmp_path):
    result = cli("activations", "prompt", "--text", "  ", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "empty")


def test_cli_down_proj_without_down_projection(cli, wikitext_path, tiny_model_dir, tmp_path):
    result = cli("activations", "down-proj-spikes", "--model", str(tiny_model_dir),
                 "--dataset", str(wikitext_path), "--seqlen", "32", "--nsamples", "2", "--filter", "q_proj",
                 "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "down projection")


def test_cli_tiny_model_end_to_end_with_plots(cli, wikitext_path, tiny_model_dir, tmp_path):
    """Every command on a tiny model in one go: tables and figures are written, runs complete."""
    # A small slice of WikiText keeps tokenization out of the test's time.
    small = tmp_path / "small.txt"
    small.write_text("".join(wikitext_path.read_text(encoding="utf-8").splitlines(keepends=True)[:60]))
    for command, extra in [("magnitude", []), ("kurtosis", []), ("token-kurtosis", ["--layers", "all"]),
                           ("down-proj-spikes", []), ("token-occurrence", ["--target-token", "the"]),
                           ("max-median", []), ("norms", [])]:
        out = tmp_path / command
        result = cli("activations", command, *extra, "--model", str(tiny_model_dir),
                     "--dataset", str(small), "--seqlen", "32", "--nsamples", "2", "--plot",
                     "--plot-format", "svg", "--out", str(out), "--quiet")
        assert result.code == 0, (command, result)
        assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
        assert list(out.glob("*.svg")), command
