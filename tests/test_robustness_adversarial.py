"""Adversarial input attacks on a tiny llama: HotFlip's choice against a one-hot gradient
computed independently, embedding attacks inside their balls, readouts against a plain loop."""

import math
import random

import pytest
import torch
from test_robustness import assert_unchanged, state
from tiny import tiny_model, tiny_tokenizer

from llmprobe.analyses.robustness import adversarial as adv
from llmprobe.core.errors import LLMProbeError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=2, seed=4)


@pytest.fixture(scope="module")
def ids():
    return tiny_tokenizer()("The tower is 324 metres tall, about the same height as an 81-storey building.",
                            return_tensors="pt").input_ids


def clean_target_loss(model, attacked, clean):
    with torch.no_grad():
        logp = torch.log_softmax(model(attacked).logits[0].double(), -1)[:-1]
    return float(-logp[torch.arange(clean.shape[1] - 1), clean[0, 1:]].mean())


def test_hotflip_first_swap_matches_one_hot_gradient(model, ids):
    matrix = model.get_input_embeddings().weight.detach()
    one_hot = torch.nn.functional.one_hot(ids[0], matrix.shape[0]).double().requires_grad_(True)
    model64 = tiny_model("llama", num_layers=2, seed=4).double()
    logits = model64(inputs_embeds=(one_hot @ matrix.double())[None]).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    (grad,) = torch.autograd.grad(loss, one_hot)
    score = grad - grad.gather(1, ids[0][:, None])   # first-order change of swapping x_i -> v
    score[torch.arange(len(ids[0])), ids[0]] = -math.inf
    position, token = divmod(int(score.argmax()), score.shape[1])
    attacked, changed = adv.hotflip(model, ids, 1)
    assert changed == 1
    assert attacked[0, position] == token and int((attacked != ids).sum()) == 1
    attacked3, changed3 = adv.hotflip(model, ids, 3)
    assert changed3 == 3 and int((attacked3 != ids).sum()) == 3
    assert clean_target_loss(model, attacked3, ids) > clean_target_loss(model, ids, ids)


def test_embedding_attacks_stay_in_their_balls(model, ids):
    clean = model.get_input_embeddings()(ids).detach()
    radius = 0.1 * clean.norm(dim=-1)
    fgsm = adv.embedding_attack(model, ids, 0.1, 1)
    pgd = adv.embedding_attack(model, ids, 0.1, 8)
    # the last token predicts nothing scored: its gradient, hence its perturbation, is zero
    assert torch.allclose((fgsm - clean).norm(dim=-1)[:, :-1], radius[:, :-1], rtol=1e-4)
    assert bool(((pgd - clean).norm(dim=-1) <= radius * (1 + 1e-4)).all())
    with torch.no_grad():
        losses = [float(adv._clean_nll(model(inputs_embeds=e).logits, ids)) for e in (clean, fgsm, pgd)]
    assert losses[1] > losses[0] and losses[2] > losses[0]


def test_random_swaps_and_char_edits():
    ids = torch.arange(10, 30)[None]
    attacked, changed = adv.random_swaps(ids, 5, 512, torch.Generator().manual_seed(0))
    assert changed == 5 and int((attacked != ids).sum()) == 5
    text = "abcdefghij" * 5
    assert adv.char_edits(text, 1e-9, random.Random(0)) == (text, 0)
    edited, edits = adv.char_edits(text, 0.5, random.Random(0))
    assert edits > 5 and edited != text


def test_adversarial_readouts_equal_plain_loop(model, ids):
    saved = state(model)
    tables = adv.adversarial(model, [ids[0]], attacks=["random", "hotflip", "chars", "fgsm", "pgd"],
                             token_budgets=[2], rates=[0.1], eps=[0.05], pgd_steps=3, repeats=2, seed=1,
                             tokenizer=tiny_tokenizer())
    assert_unchanged(model, saved)
    assert all(p.grad is None for p in model.parameters())
    runs = tables["adversarial_runs"]
    assert [r.attack for r in runs] == ["random", "random", "hotflip", "chars", "chars", "fgsm", "pgd"]
    clean = clean_target_loss(model, ids, ids)
    for run in runs:
        assert run.clean_loss == pytest.approx(clean, rel=1e-6)
    first = runs[0]
    attacked, _ = adv.random_swaps(ids, 2, 512, torch.Generator().manual_seed(1 * 1000003 + 0))
    assert first.loss == pytest.approx(clean_target_loss(model, attacked, ids), rel=1e-6)
    assert runs[3].kl_mean is None and runs[3].top1_mean is None and runs[3].kl_final >= 0
    summary = {(s.attack, s.budget): s for s in tables["adversarial_summary"]}
    assert summary[("random", 2.0)].runs == 2
    assert summary[("random", 2.0)].delta_loss_mean == pytest.approx((runs[0].delta_loss + runs[1].delta_loss) / 2)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(attacks=["gcg"]), "--attacks"), (dict(attacks=[]), "--attacks"),
    (dict(attacks=["random"], token_budgets=[0]), "--budgets"), (dict(attacks=["chars"], rates=[2.0]), "--rates"),
    (dict(attacks=["pgd"], eps=[-1.0]), "--eps"), (dict(pgd_steps=0), "--pgd-steps")])
def test_adversarial_bad_input(model, ids, kwargs, needle):
    with pytest.raises(LLMProbeError, match=needle):
        adv.adversarial(model, [ids[0]], tokenizer=tiny_tokenizer(), **kwargs)
