"""``robustness adversarial``: input perturbations read out on the real next-token loss.

Every attack changes the *input* of one sequence (the ``--text`` prompt, or each evaluation
window) and compares the model on the attacked input with the model on the clean one:

* ``random``: ``budget`` positions chosen at random get random token ids (seeded; repeats);
* ``hotflip``: ``budget`` greedy HotFlip steps (Ebrahimi et al. 2018): with g_i the gradient of
  the loss with respect to the input embedding at position i, the swap (i, v) maximising the
  first-order loss increase ``(E_v − E_{x_i}) · g_i`` over every position not yet swapped and every
  vocabulary entry is made, then the gradient is recomputed;
* ``fgsm`` / ``pgd``: the input embeddings themselves are perturbed, each token within an L2 ball
  of radius ``ε · ‖e_i‖`` (ε relative to that token's embedding norm): FGSM takes one step of the
  full radius along the normalised gradient; PGD takes ``pgd_steps`` steps of ``2.5 ε / steps``
  each, projected back onto the ball;
* ``chars``: character edits of the decoded text at rate ``budget`` (each character, with that
  probability, gets one of insert / delete / substitute / transpose-with-next, drawn uniformly;
  inserted and substituted characters are lower-case letters), then re-tokenised (a leading BOS
  of the clean sequence is kept out of the edits and put back).

Loss for the token and embedding attacks is the shifted next-token NLL of the *clean* tokens
given the attacked input (the text the model should still predict), averaged over the positions;
KL(clean ‖ attacked) and greedy agreement are per position (``kl_mean``, ``top1_mean``) and at
the last position (``kl_final``, ``top1_final``: the next token after the sequence). Character
edits change the tokenisation, so positions no longer align: their loss is the attacked text's
own next-token loss, and only the last-position KL / agreement are reported (per-position
columns empty). Model weights are never modified (gradients are taken with respect to inputs).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence

import numpy as np
import torch

from ...core.errors import LLMProbeError
from ...core.loading import LoadedModel
from ...core.readouts import next_token_kl, token_nll, top1_agreement
from ...core.records import Record
from .common import Tables, check_positive, model_name

ATTACKS = ("random", "hotflip", "chars", "fgsm", "pgd")
DEFAULT_BUDGETS = {"random": (1, 4), "hotflip": (1, 4), "chars": (0.02, 0.1), "fgsm": (0.05, 0.2), "pgd": (0.05, 0.2)}
UNITS = {"random": "tokens", "hotflip": "tokens", "chars": "char_rate", "fgsm": "eps", "pgd": "eps"}
EDITS = ("insert", "delete", "substitute", "transpose")


class AdversarialRun(Record):
    """One attack at one budget on one sequence (one repeat)."""

    attack: str
    budget: float
    unit: str                   # tokens / char_rate / eps (relative to each embedding's L2 norm)
    sequence: int
    repeat: int
    seed: int
    changed: int                # tokens swapped, characters edited, or embeddings perturbed
    clean_loss: float
    loss: float
    delta_loss: float
    kl_mean: float | None       # per-position KL(clean ‖ attacked); None when positions do not align
    top1_mean: float | None
    kl_final: float
    top1_final: float           # 1.0 when the greedy next token after the sequence is unchanged
    finite: bool


class AdversarialSummary(Record):
    """Mean and sample std (ddof 1) over sequences and repeats of one (attack, budget)."""

    attack: str
    budget: float
    unit: str
    runs: int
    nonfinite_runs: int
    delta_loss_mean: float
    delta_loss_std: float
    kl_mean: float | None
    kl_final_mean: float
    top1_mean: float | None
    top1_final_mean: float


def _logits(model, ids=None, embeds=None) -> torch.Tensor:
    if embeds is not None:
        return model(inputs_embeds=embeds, use_cache=False).logits
    return model(input_ids=ids, use_cache=False).logits


def _clean_nll(logits, clean_ids) -> torch.Tensor:
    return token_nll(logits, clean_ids).mean()


def _compare(clean_logits, logits, clean_ids, aligned: bool, own_ids=None) -> dict:
    if aligned:
        loss = float(token_nll(logits, clean_ids).double().mean())
        kl = float(next_token_kl(clean_logits[:, :-1], logits[:, :-1]).double().mean())
        top1 = float(top1_agreement(clean_logits[:, :-1], logits[:, :-1]).double().mean())
    else:
        loss = float(token_nll(logits, own_ids).double().mean())
        kl, top1 = None, None
    kl_final = float(next_token_kl(clean_logits[:, -1:], logits[:, -1:]).double().mean())
    top1_final = float(top1_agreement(clean_logits[:, -1:], logits[:, -1:]).mean())
    return dict(loss=loss, kl_mean=kl, top1_mean=top1, kl_final=kl_final, top1_final=top1_final)


def random_swaps(ids: torch.Tensor, budget: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    attacked = ids.clone()
    length = ids.shape[1]
    positions = torch.randperm(length, generator=generator)[: min(budget, length)]
    for position in positions.tolist():
        current = int(attacked[0, position])
        new = int(torch.randint(vocab - 1, (1,), generator=generator))
        attacked[0, position] = new if new < current else new + 1   # never the same token
    return attacked, len(positions)


def hotflip(model, ids: torch.Tensor, budget: int) -> tuple[torch.Tensor, int]:
    """Greedy first-order token swaps that raise the clean-target loss most."""
    embedding = model.get_input_embeddings()
    matrix = embedding.weight.detach()
    attacked = ids.clone()
    swapped: set[int] = set()
    for _ in range(min(budget, ids.shape[1])):
        embeds = embedding(attacked).detach().requires_grad_(True)
        with torch.enable_grad():
            loss = _clean_nll(_logits(model, embeds=embeds), ids)
            (grad,) = torch.autograd.grad(loss, embeds)
        grad = grad[0].float()
        current = embeds[0].detach().float()
        score = grad @ matrix.float().T - (grad * current).sum(-1, keepdim=True)     # [L, V]
        score[torch.arange(score.shape[0]), attacked[0]] = -math.inf
        if swapped:
            score[sorted(swapped)] = -math.inf
        flat = int(score.argmax())
        position, token = divmod(flat, score.shape[1])
        attacked[0, position] = token
        swapped.add(position)
    return attacked, len(swapped)


def embedding_attack(model, ids: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """FGSM (steps=1, full radius) or PGD within per-token L2 balls of radius eps·‖e_i‖."""
    embedding = model.get_input_embeddings()
    clean = embedding(ids).detach()
    radius = eps * clean.norm(dim=-1, keepdim=True)
    step = radius if steps == 1 else 2.5 * radius / steps
    delta = torch.zeros_like(clean)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = _clean_nll(_logits(model, embeds=clean + delta), ids)
            (grad,) = torch.autograd.grad(loss, delta)
        direction = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        delta = delta.detach() + step * direction
        norm = delta.norm(dim=-1, keepdim=True)
        delta = delta * torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)   # project onto the ball
    return (clean + delta).detach()


def char_edits(text: str, rate: float, rng: random.Random) -> tuple[str, int]:
    chars = list(text)
    out: list[str] = []
    edits = 0
    i = 0
    while i < len(chars):
        if rng.random() < rate:
            edit = rng.choice(EDITS)
            edits += 1
            if edit == "insert":
                out.extend([rng.choice(string.ascii_lowercase), chars[i]])
            elif edit == "substitute":
                out.append(rng.choice(string.ascii_lowercase))
            elif edit == "transpose" and i + 1 < len(chars):
                out.extend([chars[i + 1], chars[i]])
                i += 1
            elif edit == "transpose":
                out.append(chars[i])
            # delete: append nothing
        else:
            out.append(chars[i])
        i += 1
    return "".join(out), edits


def check_adversarial_options(attacks: Sequence[str], budgets: dict | None, pgd_steps: int, repeats: int) -> None:
    for attack in attacks:
        if attack not in ATTACKS:
            raise LLMProbeError(f"unknown --attacks entry '{attack}'; use some of {', '.join(ATTACKS)}")
    if not attacks:
        raise LLMProbeError("--attacks needs at least one attack")
    check_positive(pgd_steps, "--pgd-steps")
    check_positive(repeats, "--repeats")
    for attack, values in (budgets or {}).items():
        for value in values:
            if UNITS.get(attack) == "tokens" and (not float(value).is_integer() or value < 1):
                raise LLMProbeError(f"--budgets for {attack} are token counts >= 1; got {value}")
            if UNITS.get(attack) == "char_rate" and not 0 < value <= 1:
                raise LLMProbeError(f"--rates must be in (0, 1]; got {value}")
            if UNITS.get(attack) == "eps" and not (math.isfinite(value) and value > 0):
                raise LLMProbeError(f"--eps values must be positive; got {value}")


def adversarial(lm: LoadedModel, sequences: Sequence[torch.Tensor], *, attacks: Sequence[str] = ATTACKS,
                token_budgets: Sequence[int] = (1, 4), rates: Sequence[float] = (0.02, 0.1),
                eps: Sequence[float] = (0.05, 0.2), pgd_steps: int = 10, repeats: int = 3, seed: int = 0,
                tokenizer=None) -> Tables:
    """Run each attack at each budget on each sequence (1-D token ids)."""
    budgets = {"random": list(token_budgets), "hotflip": list(token_budgets), "chars": list(rates),
               "fgsm": list(eps), "pgd": list(eps)}
    check_adversarial_options(list(attacks), {a: budgets[a] for a in attacks if a in budgets}, pgd_steps, repeats)
    model = lm.model if isinstance(lm, LoadedModel) else lm
    tokenizer = tokenizer or getattr(lm, "tokenizer", None)
    if "chars" in attacks and tokenizer is None:
        raise LLMProbeError("character edits need the model's tokenizer")
    if not sequences or any(s.numel() < 2 for s in sequences):
        raise LLMProbeError("adversarial attacks need sequences of at least 2 tokens")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    runs: list[AdversarialRun] = []
    for index, sequence in enumerate(sequences):
        ids = sequence.reshape(1, -1).to(device)
        with torch.inference_mode():
            clean_logits = _logits(model, ids)
        clean_loss = float(token_nll(clean_logits, ids).double().mean())
        for attack in attacks:
            deterministic = attack in ("hotflip", "fgsm", "pgd")
            for budget in budgets[attack]:
                for repeat in range(1 if deterministic else repeats):
                    run_seed = seed + repeat
                    generator = torch.Generator().manual_seed(run_seed * 1000003 + index)
                    own_ids = None
                    if attack == "random":
                        attacked, changed = random_swaps(ids.cpu(), int(budget), vocab, generator)
                        logits = _infer(model, ids=attacked.to(device))
                    elif attack == "hotflip":
                        attacked, changed = hotflip(model, ids, int(budget))
                        logits = _infer(model, ids=attacked)
                    elif attack in ("fgsm", "pgd"):
                        embeds = embedding_attack(model, ids, float(budget), 1 if attack == "fgsm" else pgd_steps)
                        changed = ids.shape[1]
                        logits = _infer(model, embeds=embeds)
                    else:
                        bos = getattr(tokenizer, "bos_token_id", None)
                        keep_bos = bos is not None and int(sequence[0]) == bos
                        text = tokenizer.decode(sequence[1:].tolist() if keep_bos else sequence.tolist())
                        edited, changed = char_edits(text, float(budget), random.Random(run_seed * 1000003 + index))
                        own_ids = tokenizer(edited, return_tensors="pt", add_special_tokens=False).input_ids
                        if keep_bos:  # the clean sequence began with BOS: so does the edited one
                            own_ids = torch.cat([torch.tensor([[bos]]), own_ids], dim=1)
                        own_ids = own_ids.to(device)
                        if own_ids.shape[1] < 2:
                            raise LLMProbeError("character edits left fewer than 2 tokens; use a longer --text")
                        logits = _infer(model, ids=own_ids)
                    result = _compare(clean_logits, logits, ids, attack != "chars", own_ids)
                    finite = all(v is None or math.isfinite(v) for v in result.values())
                    runs.append(AdversarialRun(attack=attack, budget=float(budget), unit=UNITS[attack], sequence=index,
                                               repeat=repeat, seed=run_seed, changed=int(changed),
                                               clean_loss=clean_loss, delta_loss=result["loss"] - clean_loss,
                                               finite=finite, **result))
    return {"adversarial_runs": runs, "adversarial_summary": summarize(runs),
            "model": [AdversarialModel(model=model_name(lm), sequences=len(sequences))]}


class AdversarialModel(Record):
    model: str
    sequences: int


def _infer(model, ids=None, embeds=None) -> torch.Tensor:
    with torch.inference_mode():
        return _logits(model, ids, embeds)


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(runs: Sequence[AdversarialRun]) -> list[AdversarialSummary]:
    rows = []
    for key in dict.fromkeys((r.attack, r.budget) for r in runs):
        group = [r for r in runs if (r.attack, r.budget) == key]
        deltas = [r.delta_loss for r in group]
        rows.append(AdversarialSummary(
            attack=key[0], budget=key[1], unit=group[0].unit, runs=len(group),
            nonfinite_runs=sum(not r.finite for r in group), delta_loss_mean=float(np.mean(deltas)),
            delta_loss_std=float(np.std(deltas, ddof=1)) if len(deltas) > 1 else math.nan,
            kl_mean=_mean_or_none([r.kl_mean for r in group]), kl_final_mean=float(np.mean([r.kl_final for r in group])),
            top1_mean=_mean_or_none([r.top1_mean for r in group]),
            top1_final_mean=float(np.mean([r.top1_final for r in group]))))
    return rows
