"""Super-weight search on a tiny llama with planted super weights, found at their exact coordinates."""

import copy
import math

import pytest
import torch
from test_robustness import assert_unchanged, close, plain_eval, state
from tiny import tiny_model, tiny_tokenizer

from llmprobe.analyses.robustness import superweights as sw
from llmprobe.core.errors import LLMProbeError

torch.set_num_threads(1)

# (layer, row, col): the planted super weights
PLANTED = [(0, 7, 11), (3, 20, 40)]


def plant(model, layer, row, col, position=3):
    """Make input channel ``col`` of layer ``layer``'s down projection fire hard on token
    ``position`` of the default prompt (gate and up rows along that token's MLP input) and let
    only W_down[row, col] read it, with a large value."""
    mlp = model.model.layers[layer].mlp
    captured = []
    ids = tiny_tokenizer()(sw.DEFAULT_TEXT, return_tensors="pt").input_ids
    handle = mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0][0, position].detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    direction = captured[0] / captured[0].norm()
    with torch.no_grad():
        mlp.gate_proj.weight[col] = 2 * direction
        mlp.up_proj.weight[col] = 2 * direction
        mlp.down_proj.weight[:, col] = 0
        mlp.down_proj.weight[row, col] = 4.0


@pytest.fixture(scope="module")
def planted():
    model = tiny_model("llama", num_layers=5, seed=2)
    for layer, row, col in PLANTED:
        plant(model, layer, row, col)
    return model


@pytest.fixture(scope="module")
def windows():
    generator = torch.Generator().manual_seed(9)
    return [torch.randint(4, 512, (20,), generator=generator) for _ in range(2)]


def test_planted_super_weights_found_at_exact_coordinates(planted, windows):
    saved = state(planted)
    tables = sw.super_weights(planted, windows, text="Apple Inc. is a worldwide tech company.",
                              tokenizer=tiny_tokenizer(), outlier_fraction=1e-3)
    assert_unchanged(planted, saved)
    found = sorted((r.layer, r.weight_row, r.weight_col) for r in tables["super_weights"])
    assert found == PLANTED
    for row in tables["super_weights"]:
        assert row.module == f"model.layers.{row.layer}.mlp.down_proj" and row.value == 4.0
        assert abs(row.output_spike) > 50 and abs(row.input_spike) > 50
        assert row.residual_max > row.residual_max_zeroed
        hand = copy.deepcopy(planted)
        with torch.no_grad():
            hand.model.layers[row.layer].mlp.down_proj.weight[row.weight_row, row.weight_col] = 0
        ppl, kl, _ = plain_eval(planted, hand, windows)
        assert close(row.ppl, ppl) and close(row.kl, kl, 1e-3)
    spikes = tables["down_proj_spikes"]
    assert {(s.layer, s.spike) for s in spikes if s.iteration == 0} == {(0, True), (1, False), (2, False), (3, True), (4, False)}
    assert max(s.iteration for s in spikes) == 1  # the second search found nothing new
    assert len(tables["massive_activations"]) == 5
    from llmprobe.plots.robustness import super_weight_figures

    (stem, figure), = super_weight_figures(tables)
    assert stem == "super_weight_spikes" and len(figure.axes) == 2


def test_outlier_control_equals_hand_copy(planted, windows):
    tables = sw.super_weights(planted, windows, tokenizer=tiny_tokenizer(), outlier_fraction=1e-3)
    checks = {c.condition: c for c in tables["super_weight_checks"]}
    assert set(checks) == {"super_weights_zeroed", "outliers_zeroed_super_weights_kept",
                           "outliers_and_super_weights_zeroed"}
    for condition, keep_super in (("outliers_zeroed_super_weights_kept", True),
                                  ("outliers_and_super_weights_zeroed", False)):
        hand = copy.deepcopy(planted)
        zeroed = 0
        with torch.no_grad():
            for name, param in hand.named_parameters():
                if not name.endswith("weight") or param.dim() != 2:
                    continue
                count = int(param.numel() * 1e-3)
                if count == 0:
                    continue
                order = param.abs().flatten().argsort(descending=True)[:count]
                for flat in order.tolist():
                    r, c = divmod(flat, param.shape[1])
                    layer = name.split(".")[2] if "layers" in name else None
                    is_super = "down_proj" in name and (int(layer), r, c) in PLANTED
                    if keep_super and is_super:
                        continue
                    param[r, c] = 0
                    zeroed += 1
            if not keep_super:
                for layer, r, c in PLANTED:
                    w = hand.model.layers[layer].mlp.down_proj.weight
                    if w[r, c] != 0:
                        w[r, c] = 0
                        zeroed += 1
        ppl, kl, _ = plain_eval(planted, hand, windows)
        assert checks[condition].weights_zeroed == zeroed
        assert close(checks[condition].ppl, ppl) and close(checks[condition].kl, kl, 1e-3)


def test_relative_threshold(planted):
    inputs = sw.detection_inputs(tiny_tokenizer(), sw.DEFAULT_TEXT, None)
    found, spikes = sw.find_super_weights(planted, inputs, relative=100.0)
    assert sorted((site.layer, row, col) for _, site, row, col, _, _ in found) == PLANTED
    assert spikes[0].input_threshold == pytest.approx(
        100.0 * sorted(s.input_max for s in spikes if s.iteration == 0)[2])


def test_nothing_found_on_a_plain_model(windows):
    model = tiny_model("llama", num_layers=2, seed=3)
    saved = state(model)
    tables = sw.super_weights(model, windows, tokenizer=tiny_tokenizer())
    assert tables["super_weights"] == [] and all(not s.spike for s in tables["down_proj_spikes"])
    assert_unchanged(model, saved)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(threshold=0), "--threshold"), (dict(threshold=math.nan), "--threshold"), (dict(relative=0.5), "--relative"),
    (dict(max_iterations=0), "--max-iterations"), (dict(outlier_fraction=1.5), "--outlier-fraction"),
    (dict(text="  "), "--text")])
def test_super_weights_bad_input(planted, windows, kwargs, needle):
    with pytest.raises(LLMProbeError, match=needle):
        sw.super_weights(planted, windows, tokenizer=tiny_tokenizer(), **kwargs)


def test_detection_on_windows_takes_the_max_over_windows(planted, windows):
    """Detecting on several windows: each layer's peak is the largest over all of them."""
    sites = sw.down_sites(sw.ModuleMap(planted))
    together, _ = sw.scan(planted, windows, sites)
    for site in sites:
        alone = [sw.scan(planted, [w], [site])[0][site.name] for w in windows]
        assert together[site.name][0].magnitude == max(a[0].magnitude for a in alone)
        assert together[site.name][1].magnitude == max(a[1].magnitude for a in alone)
    tables = sw.super_weights(planted, windows, detect_windows=torch.stack(windows), tokenizer=tiny_tokenizer())
    assert len(tables["down_proj_spikes"]) >= 5
