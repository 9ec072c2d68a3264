"""Robustness analyses (noise, bit-flip, ablation) against hand-modified copies evaluated by a
plain Hugging Face loop, and the prefix-reusing sweep against the naive one."""

import copy
import math
import struct

import numpy as np
import pytest
import scipy.stats
import torch
from tiny import tiny_model

from llmprobe.analyses.robustness import ablation, bitflip, noise
from llmprobe.analyses.robustness.readout import spearman
from llmprobe.core.errors import LLMProbeError
from llmprobe.core.reference import Reference

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=3, seed=1)


@pytest.fixture(scope="module")
def windows():
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(4, 512, (24,), generator=generator) for _ in range(3)]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, saved):
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key  # bit-identical (NaN-free weights)


@torch.no_grad()
def plain_eval(reference_model, other_model, windows):
    """ppl, mean KL(ref ‖ other) and top-1 agreement with fp64 log-softmax, window by window."""
    nll, kl, agree, count = 0.0, 0.0, 0.0, 0
    for ids in windows:
        ref = torch.log_softmax(reference_model(ids[None]).logits[0].double(), -1)[:-1]
        out = torch.log_softmax(other_model(ids[None]).logits[0].double(), -1)[:-1]
        nll -= float(out[torch.arange(len(ids) - 1), ids[1:]].sum())
        kl += float((ref.exp() * (ref - out)).sum())
        agree += float((ref.argmax(-1) == out.argmax(-1)).double().sum())
        count += len(ids) - 1
    return math.exp(nll / count), kl / count, agree / count


def close(a, b, rel=1e-5):
    return abs(a - b) <= rel * max(abs(b), 1e-4)


# -- reference ---------------------------------------------------------------------------------


def test_reference_matches_plain_loop(model, windows):
    ref = Reference(model, windows)
    ppl, _, _ = plain_eval(model, model, windows)
    assert ref.prefix_ok and ref.head_ok
    assert close(ref.ppl, ppl)
    readout = ref.evaluate(None)
    assert readout.kl == 0.0 and readout.top1 == 1.0 and readout.nll_sum == ref.nll_sum


def test_reference_logit_modes_agree(model, windows):
    """Cached unmodified logits, logits recomputed from the head input, and a full unmodified
    forward per window must give the same readout."""
    patch = [bitflip.Patch("model.layers.1.mlp.up_proj.weight", "scale", None, 0.5)]
    results = {}
    for mode in ("cached", "head", "forward"):
        ref = Reference(model, windows, logits_cache_mb=256.0 if mode == "cached" else 0.0)
        if mode == "forward":
            ref.head_ok, ref.reference_logits_mode = False, "forward"
        assert ref.reference_logits_mode == mode
        out = ref.evaluate(lambda: bitflip.patched_weights(model, patch), 1)
        results[mode] = (out.nll_sum, out.kl, out.top1)
    assert results["cached"] == results["head"]
    assert results["forward"] == pytest.approx(results["head"], rel=1e-6)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = x + rng.normal(size=12)
    x[3] = x[4]  # a tie
    assert spearman(list(x), list(y)) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# -- noise -------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution,absolute", [("gaussian", False), ("uniform", True)])
def test_noise_equals_hand_perturbed_copy(model, windows, distribution, absolute):
    saved = state(model)
    sigma, seed = 0.3, 7
    tables = noise.noise_sweep(model, windows, sigmas=[sigma], distribution=distribution, absolute=absolute,
                               roles=["mlp.down", "attn.q"], repeats=2, seed=seed)
    assert_unchanged(model, saved)
    runs = tables["noise_runs"]
    assert [r.repeat for r in runs] == [0, 1]
    for run in runs:
        hand = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(seed + run.repeat)
        with torch.no_grad():
            for name, param in hand.named_parameters():  # model order
                if name.endswith(("mlp.down_proj.weight", "self_attn.q_proj.weight")):
                    if distribution == "gaussian":
                        eps = torch.randn(param.shape, generator=generator)
                    else:
                        eps = (torch.rand(param.shape, generator=generator) * 2 - 1) * math.sqrt(3)
                    scale = sigma if absolute else sigma * float(np.std(param.double().numpy()))
                    param += eps * scale
        ppl, kl, agree = plain_eval(model, hand, windows)
        assert close(run.ppl, ppl) and close(run.kl, kl, 1e-3) and run.top1_agreement == pytest.approx(agree)
        assert run.kl > 0
    summary = tables["noise_summary"][0]
    assert summary.ppl_mean == pytest.approx(np.mean([r.ppl for r in runs]))
    assert summary.ppl_std == pytest.approx(np.std([r.ppl for r in runs], ddof=1))


def test_noise_per_target_and_zero_sigma(model, windows):
    saved = state(model)
    tables = noise.noise_sweep(model, windows, sigmas=[0.0, 0.5], roles=["mlp.up"], per_target=True, repeats=1)
    assert_unchanged(model, saved)
    runs = tables["noise_runs"]
    assert {r.target for r in runs} == {f"model.layers.{i}.mlp.up_proj" for i in range(3)}
    for run in runs:
        if run.sigma == 0.0:
            assert run.kl == 0.0 and run.delta_ppl == 0.0
        else:
            assert run.kl > 0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sigmas=[-0.1]), "--sigmas"), (dict(sigmas=[]), "--sigmas"), (dict(distribution="cauchy"), "--distribution"),
    (dict(repeats=0), "--repeats"), (dict(roles=["attn.qkv"]), "no linear matrix"), (dict(regex="("), "regex")])
def test_noise_bad_input(model, windows, kwargs, needle):
    with pytest.raises(LLMProbeError, match=needle.replace("(", r"\(")):
        noise.noise_sweep(model, windows, **kwargs)


# -- bit flips -------------------------------------------------------------------------------


def flip_by_struct(value: float, bit: int, dtype: torch.dtype) -> float:
    """Flip ``bit`` of ``value`` stored as ``dtype`` with struct / numpy views (independent of torch)."""
    if dtype == torch.float32:
        (word,) = struct.unpack("<I", struct.pack("<f", value))
        return struct.unpack("<f", struct.pack("<I", word ^ (1 << bit)))[0]
    if dtype == torch.float16:
        word = np.array([value], dtype=np.float16).view(np.uint16)[0]
        return float(np.array([word ^ (1 << bit)], dtype=np.uint16).view(np.float16)[0])
    # bfloat16: the top half of the float32 word
    (word,) = struct.unpack("<I", struct.pack("<f", value))
    top = (word >> 16) ^ (1 << bit)
    return struct.unpack("<f", struct.pack("<I", top << 16))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bit_flip_equals_struct_flip(model, windows, dtype):
    typed = copy.deepcopy(model).to(dtype)
    saved = state(typed)
    target, row, col = "model.layers.1.mlp.down_proj", 5, 17
    width = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}[dtype]
    bits = [width - 1, width - 3, 3]
    tables = bitflip.bit_flip(typed, windows, targets=[(target, row, col)], bits=bits)
    assert_unchanged(typed, saved)
    for flip in tables["bit_flips"]:
        value = float(typed.get_parameter(target + ".weight").detach()[row, col])
        expected = flip_by_struct(value, flip.bit, dtype)
        assert flip.value_before == value and flip.value_after == expected
        hand = copy.deepcopy(typed)
        with torch.no_grad():
            hand.get_parameter(target + ".weight")[row, col] = expected
        if dtype == torch.float32:
            ppl, kl, _ = plain_eval(typed, hand, windows)
            assert close(flip.ppl, ppl) and abs(flip.kl - kl) < 1e-6
        else:  # half precision: compare against the same model evaluated by the reference readout
            ref = Reference(hand, windows)
            assert flip.loss == pytest.approx(ref.mean_nll, rel=1e-6)
    roles = {f.bit: f.bit_role for f in tables["bit_flips"]}
    assert roles[width - 1] == "sign" and roles[width - 3] == "exponent" and roles[3] == "mantissa"


def test_bit_flip_random_sweep_and_nonfinite(model, windows):
    saved = state(model)
    tables = bitflip.bit_flip(model, windows, bits=[31, 30, 0], count=2, seed=3, roles=["mlp.down"])
    assert_unchanged(model, saved)
    flips = tables["bit_flips"]
    assert len(flips) == 6 and {f.role for f in flips} == {"mlp.down"}
    again = bitflip.bit_flip(model, windows, bits=[31, 30, 0], count=2, seed=3, roles=["mlp.down"])["bit_flips"]
    assert [(f.target, f.weight_row, f.weight_col) for f in flips] == [(f.target, f.weight_row, f.weight_col) for f in again]
    positions = {p.bit: p for p in tables["bit_positions"]}
    assert positions[31].flips == 2 and positions[31].bit_role == "sign"
    # 1.5 with the top exponent bit flipped is NaN (exponent all ones, mantissa non-zero): the
    # non-finite loss must be reported and counted, not dropped.
    with torch.no_grad():
        big = copy.deepcopy(model)
        big.model.layers[2].mlp.down_proj.weight[0, 0] = 1.5
    tables = bitflip.bit_flip(big, windows, targets=[("model.layers.2.mlp.down_proj", 0, 0)], bits=[30])
    flip = tables["bit_flips"][0]
    assert math.isnan(flip.value_after)
    assert not flip.finite and flip.nonfinite_windows == len(windows) and not math.isfinite(flip.loss)
    assert tables["bit_positions"][0].nonfinite == 1


@pytest.mark.parametrize("kwargs,needle", [
    (dict(targets=[("model.layers.9.mlp.down_proj", 0, 0)]), "no linear module"),
    (dict(targets=[("model.layers.0.mlp.down_proj", 99, 0)]), "--index"),
    (dict(bits=[32]), "--bits"), (dict(bits=[-1]), "--bits"), (dict(count=0), "--count")])
def test_bit_flip_bad_input(model, windows, kwargs, needle):
    with pytest.raises(LLMProbeError, match=needle):
        bitflip.bit_flip(model, windows, **kwargs)


def test_parse_index():
    assert bitflip.parse_index("3, 4") == (3, 4)
    with pytest.raises(LLMProbeError, match="--index"):
        bitflip.parse_index("3")


# -- ablation --------------------------------------------------------------------------------


def test_matrix_ablation_equals_hand_zeroed_copy(model, windows):
    saved = state(model)
    tables = ablation.ablation(model, windows, granularity="matrix", layers=[1], similarity=False)
    assert_unchanged(model, saved)
    rows = tables["ablation"]
    assert len(rows) == 7 and [r.rank for r in rows] == list(range(1, 8))
    assert all(a.delta_ppl >= b.delta_ppl for a, b in zip(rows, rows[1:]))
    for row in rows:
        hand = copy.deepcopy(model)
        with torch.no_grad():
            hand.get_parameter(row.target + ".weight").zero_()
        ppl, kl, agree = plain_eval(model, hand, windows)
        assert close(row.ppl, ppl) and close(row.kl, kl, 1e-3) and row.top1_agreement == pytest.approx(agree)


def test_mean_and_layer_ablation_equal_hand_copies(model, windows):
    saved = state(model)
    rows = ablation.ablation(model, windows, granularity="layer", mode="mean", layers=[0], similarity=False)["ablation"]
    assert_unchanged(model, saved)
    assert {r.target for r in rows} == {"model.layers.0.attn", "model.layers.0.mlp"}
    for row in rows:
        hand = copy.deepcopy(model)
        family = "self_attn" if row.role == "attn" else "mlp"
        with torch.no_grad():
            for name, param in hand.named_parameters():
                if name.startswith(f"model.layers.0.{family}.") and name.endswith("proj.weight"):
                    param.fill_(float(param.double().mean()))
        ppl, kl, _ = plain_eval(model, hand, windows)
        assert close(row.ppl, ppl) and close(row.kl, kl, 1e-3)
        assert row.matrices == (4 if row.role == "attn" else 3)


def test_block_skip_equals_model_without_that_block(model, windows):
    saved = state(model)
    tables = ablation.ablation(model, windows, granularity="block", span=1)
    assert_unchanged(model, saved)
    assert not any(model._forward_hooks for model in model.modules())
    for row in tables["ablation"]:
        hand = copy.deepcopy(model)
        del hand.model.layers[row.layer]
        ppl, kl, _ = plain_eval(model, hand, windows)
        assert close(row.ppl, ppl) and close(row.kl, kl, 1e-3)
    agreement = {a.metric: a for a in tables["similarity_agreement"]}
    sims = tables["block_similarity"]
    assert agreement["block_influence"].spearman_delta_ppl == pytest.approx(
        spearman([s.block_influence for s in sims], [s.block_delta_ppl for s in sims]))


@torch.no_grad()
def test_block_similarity_matches_hidden_states(model, windows):
    sims = ablation.block_similarity(model, windows, span=2)
    cos_sum = [0.0, 0.0]
    angle_sum, last_sum, tokens = [0.0], [0.0], 0
    for ids in windows:
        hs = model(ids[None], output_hidden_states=True).hidden_states  # hs[l] = input of block l (l < 3)
        h = [x[0].double() for x in hs[:3]]
        tokens += len(ids)
        for layer in range(2):
            cos_sum[layer] += float(torch.nn.functional.cosine_similarity(h[layer], h[layer + 1], dim=-1).sum())
        cos = torch.nn.functional.cosine_similarity(h[0], h[2], dim=-1)
        angle = torch.arccos(cos.clamp(-1, 1)) / math.pi
        angle_sum[0] += float(angle.sum())
        last_sum[0] += float(angle[-1])
    for layer in range(2):
        assert sims[layer].block_influence == pytest.approx(1 - cos_sum[layer] / tokens, abs=1e-6)
    assert sims[0].angular_distance == pytest.approx(angle_sum[0] / tokens, abs=1e-6)
    assert sims[0].angular_distance_last == pytest.approx(last_sum[0] / len(windows), abs=1e-6)
    assert math.isnan(sims[2].angular_distance)  # block 2 + span 2 runs past the end


@pytest.mark.parametrize("granularity", ["matrix", "block"])
def test_prefix_sweep_equals_naive_sweep(model, windows, granularity):
    ref = Reference(model, windows)
    assert ref.prefix_ok
    targets = ablation.ablation_targets(ref.mmap, granularity, "zero", None, None, None)
    for name, _role, layer, kind, _p, _m in targets:
        fast = ref.evaluate(ablation._modification(model, kind, "zero"), layer)
        slow = ref.evaluate(ablation._modification(model, kind, "zero"), layer, use_prefix=False)
        assert abs(fast.mean_nll - slow.mean_nll) < 1e-5 and abs(fast.kl - slow.kl) < 1e-5, name
        assert fast.top1 == slow.top1


@pytest.mark.parametrize("granularity", ["matrix", "layer", "block"])
def test_block_batched_sweep_equals_naive_sweep(model, windows, granularity):
    """evaluate_in_block (one block rerun per target, the rest batched over targets, the head in
    chunks) gives what full forwards per target give."""
    ref = Reference(model, windows, logits_chunk_mb=0.01)   # tiny chunks: several head calls
    assert ref.prefix_ok and ref.batch_ok
    targets = ablation.ablation_targets(ref.mmap, granularity, "zero", None, None, None)
    by_layer = {}
    for target in targets:
        by_layer.setdefault(target[2], []).append(target)
    for layer, group in by_layer.items():
        batched = ref.evaluate_in_block([ablation._modification(model, t[3], "zero") for t in group], layer)
        for target, fast in zip(group, batched):
            slow = ref.evaluate(ablation._modification(model, target[3], "zero"), layer, use_prefix=False)
            assert abs(fast.mean_nll - slow.mean_nll) < 1e-5 and abs(fast.kl - slow.kl) < 1e-5, target[0]
            assert fast.top1 == slow.top1 and fast.tokens == slow.tokens
            assert fast.window_losses == pytest.approx(slow.window_losses, abs=1e-5)
    # evaluate_many: any order of blocks, a pair outside the blocks (None: full forward) included
    shuffled = list(reversed(targets))
    pairs = [(ablation._modification(model, t[3], "zero"), t[2]) for t in shuffled]
    pairs.insert(1, (ablation._modification(model, shuffled[0][3], "zero"), None))
    many = ref.evaluate_many(pairs)
    expected = [ref.evaluate(m, layer, use_prefix=False) for m, layer in pairs]
    assert [r.mean_nll for r in many] == pytest.approx([r.mean_nll for r in expected], abs=1e-5)
    assert [r.kl for r in many] == pytest.approx([r.kl for r in expected], abs=1e-5)


def test_block_batched_sweep_with_recomputed_reference_equals_naive(model, windows):
    """No logit cache (reference recomputed from the head once per window): the batched sweep
    still equals full forwards per target."""
    ref = Reference(model, windows, logits_cache_mb=0.0)
    assert ref.reference_logits_mode == "head" and ref.batch_ok
    targets = ablation.ablation_targets(ref.mmap, "matrix", "zero", None, None, None)
    many = ref.evaluate_many([(ablation._modification(model, t[3], "zero"), t[2]) for t in targets])
    for target, fast in zip(targets, many):
        slow = ref.evaluate(ablation._modification(model, target[3], "zero"), target[2], use_prefix=False)
        assert abs(fast.mean_nll - slow.mean_nll) < 1e-5 and abs(fast.kl - slow.kl) < 1e-5, target[0]
        assert fast.top1 == slow.top1


def test_prefix_cache_falls_back_when_over_budget(model, windows):
    ref = Reference(model, windows, cache_budget_mb=0.0)
    assert not ref.prefix_ok and ref.block_inputs == []
    assert ref.info("m", "d").prefix_cache is False


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mode="one"), "--mode"), (dict(granularity="head"), "--granularity"),
    (dict(granularity="block", mode="mean"), "--mode mean"), (dict(span=0), "--span"), (dict(span=9), "--span"),
    (dict(layers=[7]), "out of range"), (dict(roles=["attn.qkv"]), "no linear matrix")])
def test_ablation_bad_input(model, windows, kwargs, needle):
    with pytest.raises(LLMProbeError, match=needle):
        ablation.ablation(model, windows, **kwargs)


# -- figures -----------------------------------------------------------------------------------


def test_figures_draw_with_nonfinite_values(model, windows, tmp_path):
    from llmprobe.plots import robustness as plots

    tables = ablation.ablation(model, windows, granularity="matrix", layers=[0, 2])
    tables["ablation"][0].delta_ppl = math.inf   # a broken target must still draw
    figures = plots.ablation_figures(tables)
    figures += plots.ablation_figures(ablation.ablation(model, windows, granularity="block"))
    figures += plots.noise_figures(noise.noise_sweep(model, windows, sigmas=[0.1, 0.5], repeats=2))
    flips = bitflip.bit_flip(model, windows, bits=[31, 30, 22, 0], count=2)
    flips["bit_flips"][0].delta_loss = math.nan
    figures += plots.bit_flip_figures(flips)
    stems = [stem for stem, _ in figures]
    assert stems == ["ablation_ranking", "ablation_heatmap_delta_ppl", "ablation_heatmap_kl", "block_similarity",
                     "ablation_ranking", "block_similarity", "noise_curves", "bit_positions"]
    for stem, figure in figures:
        figure.savefig(tmp_path / f"{stem}.png")
