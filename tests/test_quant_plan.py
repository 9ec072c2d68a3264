"""quant plan / quant eval against independent references.

References here avoid the code under test: the knapsack is checked by enumerating every
assignment, the output-error proxy by a plain per-token loop over inputs captured with ordinary
forward pre-hooks, the fake-quantized weights by a numpy per-group loop, perplexity and KL by a
hand-quantized deep copy of the model.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny import tiny_model, tiny_tokenizer

from llmprobe.analyses import quant_plan as qp
from llmprobe.core.allocation import allocate
from llmprobe.core.calibration import prepare
from llmprobe.core.errors import LLMProbeError
from llmprobe.core.loading import LoadedModel, ModelSource
from llmprobe.core.modulemap import ModuleMap
from llmprobe.core.quant import quantize

N_WINDOWS, SEQLEN = 3, 16


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_lm(arch: str = "llama") -> LoadedModel:
    return LoadedModel(tiny_model(arch), tiny_tokenizer(), ModelSource("local", f"tiny-{arch}", f"tiny-{arch}"),
                       torch.float32, torch.device("cpu"))


def windows(seed: int = 1, n: int = N_WINDOWS, length: int = SEQLEN) -> torch.Tensor:
    return torch.randint(4, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def state_bytes(model) -> dict[str, bytes]:
    return {k: v.detach().clone().contiguous().view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


# -- the solver --------------------------------------------------------------------------------


def brute_force(costs, values, budget):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[i][j] for i, j in enumerate(combo))
        if cost > budget:
            continue
        value = sum(values[i][j] for i, j in enumerate(combo))
        if best is None or value < best:
            best = value
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocation_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    items = 6
    sizes = [rng.choice([64, 128, 192, 256, 384]) for _ in range(items)]
    bits = [2, 3, 4, 8]
    costs = [[n * b + n // 16 * 16 for b in bits] for n in sizes]
    # Values fall with bits but not convexly, and with noise, so greedy shortcuts can fail.
    values = [[rng.uniform(0.5, 2.0) * n * 4.0 ** -b + rng.uniform(0, 0.5) for b in bits] for n in sizes]
    low, high = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    for budget in (low, low + (high - low) // 7, (low + high) // 2, high - 1, high, high + 1000):
        optimum = brute_force(costs, values, budget)
        exact = allocate(costs, values, budget, method="dp")
        assert exact.cost <= budget
        assert exact.cost == sum(costs[i][j] for i, j in enumerate(exact.choice))
        assert exact.value == pytest.approx(optimum, rel=1e-12, abs=1e-12)
        approx = allocate(costs, values, budget, method="lagrangian")
        assert approx.cost <= budget
        assert approx.value >= optimum - 1e-12
        assert approx.lower_bound <= optimum + 1e-12


def test_allocation_lagrangian_exact_on_hull_breakpoints():
    # Convex per-item curves and a budget that lands on a breakpoint: the Lagrangian walk is optimal.
    costs = [[10, 20, 30], [10, 20, 30], [10, 20, 30]]
    values = [[9.0, 3.0, 1.0], [5.0, 2.0, 1.5], [7.0, 1.0, 0.5]]
    for budget in (30, 40, 50, 60, 70, 80, 90):
        assert allocate(costs, values, budget, method="lagrangian").value == pytest.approx(
            brute_force(costs, values, budget))


def test_allocation_rejects_budget_below_floor():
    with pytest.raises(LLMProbeError, match="below the smallest possible size"):
        allocate([[10, 20], [10, 20]], [[1.0, 0.0], [1.0, 0.0]], 19)


# -- sizes and the budget ----------------------------------------------------------------------


def test_format_bits_counts_scales():
    scheme = qp.Scheme(128, True)
    assert qp.format_bits((4, 256), "int4", scheme) == 4 * 256 * 4 + 4 * 2 * 16
    asym = qp.Scheme(128, False)
    assert qp.format_bits((4, 256), "int3", asym) == 4 * 256 * 3 + 4 * 2 * (16 + 3)
    per_channel = qp.Scheme(0, True)
    assert qp.format_bits((4, 256), "int8", per_channel) == 4 * 256 * 8 + 4 * 16
    assert qp.format_bits((4, 256), "fp16", scheme) == 4 * 256 * 16
    assert qp.format_bits((4, 256), "nf4", per_channel) == 4 * 256 * 4 + 16 * 16


def synthetic_sensitivity(sites, formats, seed=0):
    rng = random.Random(seed)
    return {s.name: {f: rng.uniform(0.1, 3.0) * s.in_features * s.out_features * 4.0 ** -qp.element_bits(f)
                     for f in formats} for s in sites}


@pytest.mark.parametrize("avg_bits", ["3", "3.1", "3.5", "4.3333", "5.0625", "6.7", "9", "9.5"])
def test_budget_met_exactly(avg_bits):
    lm = tiny_lm()
    sites = ModuleMap(lm.model).select()
    scheme = qp.Scheme(16, True)
    formats = qp.parse_candidates("2,3,4,8")
    options = {s.name: list(formats) for s in sites}
    budget = qp.check_budget(sites, options, scheme, avg_bits)
    params = sum(s.in_features * s.out_features for s in sites)
    assert budget == math.floor(Fraction(avg_bits) * params)
    out = qp.build_plan(sites, synthetic_sensitivity(sites, formats), options, scheme, avg_bits=avg_bits,
                        budget=budget, metric="test", candidates=formats)
    summary = out.tables["quant_plan_summary"][0]
    rows = out.tables["quant_plan"]
    total = sum(qp.format_bits(s, r.format, scheme) for s, r in zip(sites, rows))
    assert total == summary.plan_bits == sum(r.size_bits for r in rows) <= budget
    assert summary.plan_avg_bits == total / params
    # With integer costs the exact solver leaves less than one cheapest upgrade unspent.
    upgrades = [b - a for s in sites for a, b in itertools.pairwise(
        sorted(qp.format_bits(s, f, scheme) for f in formats))]
    if summary.plan_bits < sum(qp.format_bits(s, formats[-1], scheme) for s in sites):
        assert budget - summary.plan_bits < max(upgrades)
    # The document and the table agree.
    doc = out.documents["quant_plan"]
    assert doc["plan_bits"] == total and {m["module"]: m["format"] for m in doc["modules"]} == {
        r.module: r.format for r in rows}


def test_uniform_budget_gives_uniform_plan_when_it_is_best():
    lm = tiny_lm()
    sites = ModuleMap(lm.model).select()
    scheme = qp.Scheme(16, True)
    formats = qp.parse_candidates("2,4,8")
    params = sum(s.in_features * s.out_features for s in sites)
    uniform4 = sum(qp.format_bits(s, "int4", scheme) for s in sites)
    avg = Fraction(uniform4, params)
    # Same sensitivity shape for every module: no module is worth more than another per bit.
    sens = {s.name: {f: s.in_features * s.out_features * 4.0 ** -qp.element_bits(f) for f in formats}
            for s in sites}
    budget = qp.budget_bits(avg, params)
    assert budget == uniform4
    options = {s.name: list(formats) for s in sites}
    out = qp.build_plan(sites, sens, options, scheme, avg_bits=float(avg), budget=budget, metric="t",
                        candidates=formats)
    assert out.tables["quant_plan_summary"][0].plan_bits <= uniform4


# -- bad input ---------------------------------------------------------------------------------


def calibration(arch="llama", **kw):
    return prepare(tiny_lm(arch), windows=windows(), **kw)


def test_budget_below_smallest_candidate_is_one_line_error():
    calib = calibration()
    with pytest.raises(LLMProbeError, match="below the smallest plan possible") as info:
        qp.plan(calib, avg_bits=2.0, candidates="2,3,4,8", group_size=16)
    assert "\n" not in str(info.value) and "--avg-bits" in str(info.value)


@pytest.mark.parametrize("candidates, needle", [("2,int5x,8", "unknown format"), ("2,fp32", "not a weight"),
                                                ("1,4", "unsupported integer width"), ("", "empty")])
def test_unknown_format_is_error(candidates, needle):
    with pytest.raises(LLMProbeError, match=needle):
        qp.plan(calibration(), avg_bits=4, candidates=candidates, group_size=16)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(group_size=24), "does not divide"), (dict(group_size=-1), "non-negative"),
    (dict(metric="hessian"), "unknown --metric"), (dict(keep=["mlp.down_proj"]), "REGEX=FORMAT"),
    (dict(keep=["nomatch=int8"]), "no selected module"), (dict(keep=["down_proj=int9x"]), "unknown format"),
    (dict(avg_bits=-1), "positive"), (dict(avg_bits="x"), "must be a number")])
def test_bad_options(kwargs, needle):
    options = dict(avg_bits=4, candidates="2,4,8", group_size=16)
    options.update(kwargs)
    with pytest.raises(LLMProbeError, match=needle):
        qp.plan(calibration(), **options)


def test_bad_input_does_not_run_the_model(monkeypatch):
    calls = []
    monkeypatch.setattr(qp, "collect", lambda *a, **k: calls.append(1))
    with pytest.raises(LLMProbeError):
        qp.plan(calibration(), avg_bits=1.0, candidates="2,4", group_size=16)
    assert not calls


# -- sensitivity proxies -----------------------------------------------------------------------


def captured_inputs(model, ids) -> dict[str, list[torch.Tensor]]:
    """name -> inputs of every token, captured with plain pre-hooks (one window per pass)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    store: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            def hook(m, args, name=name):
                store.setdefault(name, []).extend(args[0].detach().reshape(-1, args[0].shape[-1]))
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in handles:
        h.remove()
    return store


def numpy_group_quant(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Symmetric per-group round-to-nearest, fp32, one group at a time (independent of core/quant)."""
    out = np.empty_like(w, dtype=np.float32)
    qmax = np.float32(2 ** (bits - 1) - 1)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[r, start:start + group].astype(np.float32)
            scale = np.float32(np.abs(g).max()) / qmax
            out[r, start:start + group] = g if scale == 0 else (
                np.clip(np.round(g / scale), -qmax, qmax) * scale).astype(np.float32)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_error_equals_plain_loop(arch):
    calib = calibration(arch)
    out = qp.plan(calib, avg_bits=5, candidates="2,4,8", group_size=16, metric="output")
    inputs = captured_inputs(calib.lm.model, calib.windows)
    rows = {(r.module, r.format): r.sensitivity for r in out.tables["quant_sensitivity"]}
    checked = 0
    for site in calib.sites:
        w = site.weight().double().numpy()  # [out, in]
        xs = inputs[site.name]
        for bits in (2, 4, 8):
            q = numpy_group_quant(w.astype(np.float32), bits, 16).astype(np.float64)
            delta = q - w
            total = 0.0
            for x in xs:
                y = delta @ x.double().numpy()
                total += float(y @ y)
            expected = total / len(xs)
            assert rows[(site.name, f"int{bits}")] == pytest.approx(expected, rel=1e-5), (site.name, bits)
            checked += 1
    assert checked == 3 * len(calib.sites)


def test_fisher_weighted_output_error_equals_plain_loop():
    calib = calibration()
    out = qp.plan(calib, avg_bits=5, candidates="2,8", group_size=16, fisher_weighted=True, metric="output")
    model = calib.lm.model
    site = calib.sites[-1]
    # Reference: ∂L/∂y of that module by autograd on a deep copy, L = window mean loss.
    ref = copy.deepcopy(model)
    module = dict(ref.named_modules())[site.name]
    outs, xs = [], []

    def hook(m, args, output):
        output.retain_grad()
        outs.append(output)
        xs.append(args[0].detach())
    handle = module.register_forward_hook(hook)
    grads = []
    for row in calib.windows:
        logits = ref(input_ids=row[None]).logits
        loss = F.cross_entropy(logits[0, :-1], row[1:])
        loss.backward()
        grads.append(outs[-1].grad.detach().reshape(-1, site.out_features))
    handle.remove()
    g = torch.cat(grads).double()
    fisher = (g ** 2).mean(dim=0)
    x = torch.cat([t.reshape(-1, site.in_features) for t in xs]).double()
    w = site.weight().double()
    delta = torch.from_numpy(numpy_group_quant(w.float().numpy(), 2, 16)).double() - w
    expected = float(((x @ delta.t()) ** 2 * fisher).sum(dim=1).mean())
    got = next(r.sensitivity for r in out.tables["quant_sensitivity"] if r.module == site.name and r.format == "int2")
    assert got == pytest.approx(expected, rel=1e-4)


def test_delta_loss_equals_hand_quantized_copy():
    calib = calibration()
    out = qp.plan(calib, avg_bits=5, candidates="2,8", group_size=16, metric="delta-loss")
    site = calib.sites[2]

    def loss(model):
        total, count = 0.0, 0
        with torch.no_grad():
            for row in calib.windows:
                logits = model(input_ids=row[None]).logits[0, :-1].double()
                total += float(F.cross_entropy(logits, row[1:], reduction="sum"))
                count += len(row) - 1
        return total / count

    ref = copy.deepcopy(calib.lm.model)
    base = loss(ref)
    module = dict(ref.named_modules())[site.name]
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(numpy_group_quant(module.weight.numpy(), 2, 16)))
    expected = loss(ref) - base
    got = next(r.sensitivity for r in out.tables["quant_sensitivity"] if r.module == site.name and r.format == "int2")
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_kl_metric_equals_hand_quantized_copy():
    """--metric kl: mean next-token KL(unquantized ‖ one module quantized) over the calibration
    windows' predicting positions, against a plain softmax loop on a hand-quantized copy."""
    calib = calibration()
    out = qp.plan(calib, avg_bits=5, candidates="2,8", group_size=16, metric="kl")
    site = calib.sites[2]

    def log_probs(model):
        with torch.no_grad():
            return [torch.log_softmax(model(input_ids=row[None]).logits[0, :-1].double(), dim=-1)
                    for row in calib.windows]

    base = log_probs(calib.lm.model)
    ref = copy.deepcopy(calib.lm.model)
    module = dict(ref.named_modules())[site.name]
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(numpy_group_quant(module.weight.numpy(), 2, 16)))
    quantized = log_probs(ref)
    total = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(base, quantized))
    expected = total / sum(p.shape[0] for p in base)
    rows = {(r.module, r.format): r.sensitivity for r in out.tables["quant_sensitivity"]}
    assert rows[(site.name, "int2")] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert all(value >= -1e-7 for value in rows.values())
    assert rows[(site.name, "int8")] < rows[(site.name, "int2")]


@pytest.mark.parametrize("metric", ["fgmp", "alpha", "kurtosis"])
def test_other_metrics_run_and_rank_bits(metric):
    calib = calibration()
    before = state_bytes(calib.lm.model)
    out = qp.plan(calib, avg_bits=4, candidates="2,4,8", group_size=16, metric=metric)
    rows = out.tables["quant_sensitivity"]
    assert all(math.isfinite(r.sensitivity) for r in rows)
    if metric != "alpha":   # alpha moves are not monotone in bits
        by = {(r.module, r.format): r.sensitivity for r in rows}
        for s in calib.sites:
            assert by[(s.name, "int2")] >= by[(s.name, "int8")]
    assert state_bytes(calib.lm.model) == before
    assert all(p.requires_grad for p in calib.lm.model.parameters())


def test_fgmp_equals_plain_fisher_loop():
    calib = calibration()
    out = qp.plan(calib, avg_bits=5, candidates="2,8", group_size=16, metric="fgmp")
    site = calib.sites[0]
    ref = copy.deepcopy(calib.lm.model)
    weight = dict(ref.named_parameters())[site.weight_name]
    fisher = torch.zeros_like(weight, dtype=torch.float64)
    for row in calib.windows:
        ref.zero_grad()
        logits = ref(input_ids=row[None]).logits
        F.cross_entropy(logits[0, :-1], row[1:]).backward()
        fisher += weight.grad.double() ** 2
    w = weight.detach()
    delta = torch.from_numpy(numpy_group_quant(w.numpy(), 2, 16)).double() - w.double()
    expected = float((fisher * delta ** 2).sum())
    got = next(r.sensitivity for r in out.tables["quant_sensitivity"] if r.module == site.name and r.format == "int2")
    assert got == pytest.approx(expected, rel=1e-4)


def test_layers_per_pass_gives_the_same_sensitivities():
    calib = calibration()
    one = qp.plan(calib, avg_bits=4, candidates="2,4,8", group_size=16, metric="output")
    chunked = qp.plan(calib, avg_bits=4, candidates="2,4,8", group_size=16, layers_per_pass=1, metric="output")
    a = [r.sensitivity for r in one.tables["quant_sensitivity"]]
    b = [r.sensitivity for r in chunked.tables["quant_sensitivity"]]
    assert a == pytest.approx(b, rel=1e-12)


def test_keep_pins_module_and_counts_it():
    calib = calibration()
    out = qp.plan(calib, avg_bits=4.5, candidates="2,3,4", group_size=16, keep=["down_proj=int8"])
    rows = out.tables["quant_plan"]
    downs = [r for r in rows if "down_proj" in r.module]
    assert downs and all(r.format == "int8" and r.pinned for r in downs)
    summary = out.tables["quant_plan_summary"][0]
    assert summary.plan_bits <= summary.budget_bits
    assert summary.plan_bits == sum(r.size_bits for r in rows)


def test_plan_beats_uniform_on_its_own_objective():
    calib = calibration()
    scheme = qp.Scheme(16, True)
    params = sum(s.in_features * s.out_features for s in calib.sites)
    uniform3 = Fraction(sum(qp.format_bits(s, "int3", scheme) for s in calib.sites), params)
    out = qp.plan(calib, avg_bits=uniform3, candidates="2,3,4,8", group_size=16)
    rows = out.tables["quant_sensitivity"]
    uniform = sum(r.sensitivity for r in rows if r.format == "int3")
    assert out.tables["quant_plan_summary"][0].total_sensitivity <= uniform * (1 + 1e-12)


def test_recipe_is_valid_yaml_targeting_modules_by_name():
    calib = calibration()
    out = qp.plan(calib, avg_bits=4, candidates="2,4,8,fp16", group_size=16)
    recipe = yaml.safe_load(out.documents["recipe"])
    modifier = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    planned = {r.module: r.format for r in out.tables["quant_plan"]}
    seen = {}
    for group in modifier["config_groups"].values():
        for target in group["targets"]:
            assert target.startswith("re:^") and target.endswith("$")
            name = target[4:-1].replace("\\.", ".")
            seen[name] = group["weights"]["num_bits"]
            assert group["weights"]["group_size"] == 16 and group["weights"]["strategy"] == "group"
    for name, fmt in planned.items():
        if fmt == "fp16":
            assert f"re:^{name.replace('.', chr(92) + '.')}$" in modifier["ignore"]
        else:
            assert seen[name] == qp.element_bits(fmt)


# -- eval --------------------------------------------------------------------------------------


def test_applied_weights_equal_core_quantizer_and_are_restored():
    for arch in ("llama", "gpt2"):
        lm = tiny_lm(arch)
        mmap = ModuleMap(lm.model)
        sites = mmap.select()
        scheme = qp.Scheme(16, False)
        rng = random.Random(3)
        plan = qp.AppliedPlan("t", "plan", {s.name: rng.choice(["int2", "int3", "int8", "nf4", "fp8_e4m3"])
                                            for s in sites}, scheme)
        originals = {s.name: s.weight().clone() for s in sites}
        before = state_bytes(lm.model)
        with qp.applied(lm.model, qp.quantized_weights(sites, plan)):
            for s in sites:
                fmt = plan.formats[s.name]
                if fmt.startswith("int"):
                    expected = quantize(originals[s.name], fmt, granularity="per-group", group_size=16,
                                        symmetric=False)
                else:
                    expected = qp.fake_quant(originals[s.name], fmt, scheme)
                assert torch.equal(s.weight(), expected), s.name
                if fmt == "int2":   # and the core quantizer agrees with the numpy loop, asymmetric aside
                    assert len(torch.unique(s.weight()[0, :16])) <= 4
        assert state_bytes(lm.model) == before


def test_int_fake_quant_matches_numpy_loop():
    lm = tiny_lm()
    site = ModuleMap(lm.model).select()[0]
    got = qp.fake_quant(site.weight(), "int3", qp.Scheme(16, True)).numpy()
    assert np.array_equal(got, numpy_group_quant(site.weight().numpy(), 3, 16))


def test_eval_ppl_and_kl_match_hand_quantized_copy():
    lm = tiny_lm()
    torch.manual_seed(0)
    ids = torch.randint(4, 512, (3 * SEQLEN + 5,), generator=torch.Generator().manual_seed(7))
    sites = ModuleMap(lm.model).select()
    plan = qp.AppliedPlan("p", "plan", {s.name: ("int2" if i % 2 else "int4") for i, s in enumerate(sites)},
                          qp.Scheme(16, True))
    before = state_bytes(lm.model)
    row = qp.evaluate(lm, ids, [plan], seqlen=SEQLEN, reference_cache_mb=0)["quant_eval"][0]
    assert state_bytes(lm.model) == before
    ref = copy.deepcopy(lm.model)
    quant = copy.deepcopy(lm.model)
    modules = dict(quant.named_modules())
    with torch.no_grad():
        for i, s in enumerate(sites):
            w = modules[s.name].weight
            w.copy_(torch.from_numpy(numpy_group_quant(w.numpy(), 2 if i % 2 else 4, 16)))
    nll = base = kl = 0.0
    n = 0
    with torch.no_grad():
        for k in range(3):
            window = ids[k * SEQLEN:(k + 1) * SEQLEN]
            p = F.log_softmax(ref(input_ids=window[None]).logits[0, :-1].double(), -1)
            q = F.log_softmax(quant(input_ids=window[None]).logits[0, :-1].double(), -1)
            base -= float(p[torch.arange(SEQLEN - 1), window[1:]].sum())
            nll -= float(q[torch.arange(SEQLEN - 1), window[1:]].sum())
            kl += float((p.exp() * (p - q)).sum())
            n += SEQLEN - 1
    assert row.tokens == n and row.windows == 3
    assert row.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert row.base_ppl == pytest.approx(math.exp(base / n), rel=1e-5)
    assert row.kl_mean == pytest.approx(kl / n, rel=1e-4, abs=1e-7)
    bits, params = qp.plan_bits(sites, plan)
    assert row.avg_bits == bits / params


def test_eval_with_reference_cache_gives_same_numbers():
    lm = tiny_lm()
    ids = torch.randint(4, 512, (4 * SEQLEN,), generator=torch.Generator().manual_seed(2))
    sites = ModuleMap(lm.model).select()
    plans = [qp.uniform_plan(sites, "int3", qp.Scheme(16, True)), qp.uniform_plan(sites, "4", qp.Scheme(16, True))]
    cached = qp.evaluate(lm, ids, plans, seqlen=SEQLEN, reference_cache_mb=100)["quant_eval"]
    fresh = qp.evaluate(lm, ids, plans, seqlen=SEQLEN, reference_cache_mb=0)["quant_eval"]
    for a, b in zip(cached, fresh):
        assert a.ppl == b.ppl and a.kl_mean == b.kl_mean


def test_plan_file_round_trip_and_sweep(tmp_path):
    calib = calibration()
    out = qp.plan(calib, avg_bits=4.5, candidates="2,3,4,8", group_size=16, keep=["layers.0.mlp.down_proj=int8"])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(out.documents["quant_plan"]))
    loaded = qp.load_plan(path)
    assert loaded.formats == {r.module: r.format for r in out.tables["quant_plan"]}
    ids = torch.randint(4, 512, (2 * SEQLEN,), generator=torch.Generator().manual_seed(3))
    before = state_bytes(calib.lm.model)
    rows = qp.sweep(calib.lm, ids, loaded, budgets=[4.0, 5.5], seeds=[0, 1], seqlen=SEQLEN)["quant_sweep"]
    assert state_bytes(calib.lm.model) == before
    kinds = [r.kind for r in rows]
    assert kinds.count("uniform") == 4 and kinds.count("plan") == 2 and kinds.count("random") == 4
    for r in rows:
        if r.kind != "uniform":
            assert r.avg_bits <= r.budget_avg_bits
    # The re-planned plan at the file's own budget is the file's plan.
    same = qp.replan(loaded, qp.resolve_sites(ModuleMap(calib.lm.model), loaded), 4.5)
    assert same.formats == loaded.formats
    pinned = [r for r in rows if r.kind == "uniform"]
    assert len({r.avg_bits for r in pinned}) == 4
    lines = qp.eval_summary_lines(rows)
    assert len(lines) == 3 and lines[1].startswith("@4 bits: plan ppl")
    assert qp.plan_summary_lines(out.tables)[0].startswith("plan: ")


def test_random_plans_differ_by_seed_and_fit():
    lm = tiny_lm()
    sites = ModuleMap(lm.model).select()
    scheme = qp.Scheme(16, True)
    a = qp.random_plan(sites, ["int2", "int4", "int8"], scheme, avg_bits=4, seed=0)
    b = qp.random_plan(sites, ["int2", "int4", "int8"], scheme, avg_bits=4, seed=1)
    assert a.formats != b.formats
    for p in (a, b):
        bits, params = qp.plan_bits(sites, p)
        assert bits <= qp.budget_bits(4, params)


def test_plan_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(LLMProbeError, match="not an llmprobe quant plan"):
        qp.load_plan(bad)
    with pytest.raises(LLMProbeError, match="no such file"):
        qp.load_plan(tmp_path / "missing.json")
    doc = {"llmprobe_quant_plan": 1, "group_size": 16, "symmetric": True,
           "modules": [{"module": "model.layers.9.mlp.up_proj", "format": "int4"}]}
    plan = qp.plan_from_document(doc)
    with pytest.raises(LLMProbeError, match="does not have"):
        qp.evaluate(tiny_lm(), torch.arange(4, 100), [plan], seqlen=SEQLEN)
    doc["modules"][0]["format"] = "int77"
    with pytest.raises(LLMProbeError, match="integer width"):
        qp.plan_from_document(doc)


def test_figures_are_made(tmp_path):
    from llmprobe.plots.quant import plan_figures, sweep_figures

    calib = calibration()
    out = qp.plan(calib, avg_bits=4, candidates="2,4,8", group_size=16)
    figures = plan_figures(out.tables)
    assert [stem for stem, _ in figures] == ["quant_plan_formats", "quant_sensitivity"]
    ids = torch.randint(4, 512, (2 * SEQLEN,), generator=torch.Generator().manual_seed(3))
    rows = qp.sweep(calib.lm, ids, qp.plan_from_document(out.documents["quant_plan"]), budgets=[4.5],
                    seeds=[0], seqlen=SEQLEN)
    (stem, fig), = sweep_figures(rows)
    fig.savefig(tmp_path / f"{stem}.png")
    assert (tmp_path / "quant_sweep.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(), "exactly one of"), (dict(uniform="4", random=True), "--uniform and --random"),
    (dict(uniform="4", do_sweep=True), "--sweep needs --plan"), (dict(random=True), "needs --avg-bits"),
    (dict(uniform="int4", sweep_budgets_="3,x"), "not a number"),
    (dict(uniform="int4", sweep_budgets_="3"), "only applies"),
    (dict(uniform="int99"), "integer width"), (dict(uniform="4", group_size=12), "does not divide"),
    (dict(random=True, avg_bits=1, group_size=16), "below the smallest")])
def test_eval_entry_point_errors(kwargs, needle):
    with pytest.raises(LLMProbeError, match=needle):
        qp.eval_plans(tiny_lm(), torch.arange(4, 200), seqlen=SEQLEN, **kwargs)


def test_eval_entry_point_uniform_and_random():
    lm = tiny_lm()
    ids = torch.randint(4, 512, (2 * SEQLEN,), generator=torch.Generator().manual_seed(5))
    before = state_bytes(lm.model)
    (u,) = qp.eval_plans(lm, ids, uniform="8", group_size=16, seqlen=SEQLEN, roles=["mlp"])["quant_eval"]
    assert u.kind == "uniform" and u.modules == 6 and u.avg_bits == 9.0 and u.kl_mean < 1e-3
    (r,) = qp.eval_plans(lm, ids, random=True, avg_bits=4, seed=2, group_size=16, seqlen=SEQLEN)["quant_eval"]
    assert r.kind == "random" and r.avg_bits <= 4
    assert state_bytes(lm.model) == before


# -- CLI and llmprobe.run (through the registry) -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("tiny-llama"))


def test_cli_plan_then_eval_sweep(tiny_dir, tmp_path, wikitext_path):
    from conftest import run_cli

    plan_out = tmp_path / "plan"
    result = run_cli("quant", "plan", "--model", str(tiny_dir), "--avg-bits", "4.5", "--group-size", "16",
                     "--dataset", str(wikitext_path), "--nsamples", "2", "--seqlen", "16", "--keep",
                     "layers.0.mlp.down_proj=int8", "--out", str(plan_out), "--plot")
    assert result.code == 0, result
    doc = json.loads((plan_out / "quant_plan.json").read_text())
    assert doc["plan_bits"] <= doc["budget_bits"]
    assert yaml.safe_load((plan_out / "recipe.yaml").read_text())["quant_stage"]
    assert (plan_out / "quant_plan.csv").is_file() and (plan_out / "quant_plan_formats.png").is_file()
    eval_out = tmp_path / "eval"
    result = run_cli("quant", "eval", "--model", str(tiny_dir), "--plan", str(plan_out / "quant_plan.json"),
                     "--sweep", "--budgets", "4.5", "--seeds", "0", "--dataset", str(wikitext_path), "--seqlen", "16",
                     "--max-windows", "2", "--out", str(eval_out), "--plot")
    assert result.code == 0, result
    assert (eval_out / "quant_sweep.csv").is_file() and (eval_out / "quant_sweep.png").is_file()


def test_run_api_uniform(tiny_dir, wikitext_path):
    import llmprobe

    result = llmprobe.run("quant.eval", model=str(tiny_dir), uniform="8", group_size=16,
                          dataset=str(wikitext_path), seqlen=16, max_windows=2)
    (row,) = result["quant_eval"]
    assert row.kind == "uniform" and row.kl_mean < 1e-2


@pytest.mark.parametrize("args, needle", [
    (["quant", "plan", "--avg-bits", "x"], "--avg-bits"),
    (["quant", "plan", "--avg-bits", "3", "--candidates", "2,int5x"], "unknown format"),
    (["quant", "plan", "--avg-bits", "2", "--group-size", "16", "--nsamples", "2", "--seqlen", "16"], "below"),
    (["quant", "eval", "--uniform", "4", "--random"], "exactly one of"),
    (["quant", "eval", "--uniform", "int99"], "integer width"),
])
def test_cli_bad_input_one_line(tiny_dir, wikitext_path, args, needle, tmp_path):
    from conftest import assert_one_line_error, run_cli

    result = run_cli(*args, "--model", str(tiny_dir), "--dataset", str(wikitext_path), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, needle)
