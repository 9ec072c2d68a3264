"""Readouts: the one next-token loss of the package, and divergences between two models'
next-token distributions. Perplexity, Fisher, robustness, pruning and quantization all read
their numbers through these functions, so "loss" means the same thing everywhere:

    loss at position t = -log softmax(logits[t])[ids[t + 1]]   (logits in fp32, sums in fp64)

Position 0 is never a target (it has no prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-target next-token NLL, shape [B, L-1], fp32: logits [B, L, V] predict ids [B, L] shifted by one."""
    b, length, vocab = logits.shape
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1).to(logits.device),
                           reduction="none").view(b, length - 1)


def window_mean_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ over windows of each window's mean next-token loss (differentiable; used by gradients)."""
    return token_nll(logits, ids).mean(dim=1).sum()


def nll_sum(logits: torch.Tensor, ids: torch.Tensor, n_scored: list[int] | None = None) -> tuple[float, int]:
    """Σ NLL in fp64 and the number of targets. ``n_scored[b]``: only window b's last n targets count
    (the sliding-window protocol); default: every target."""
    per_token = token_nll(logits, ids)
    length = ids.shape[1]
    if n_scored is None:
        return float(per_token.double().sum()), int(per_token.numel())
    total, count = 0.0, 0
    for b, scored in enumerate(n_scored):
        first_target = max(1, length - scored)
        part = per_token[b, first_target - 1:]
        total += float(part.double().sum())
        count += int(part.numel())
    return total, count


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ other) of the next-token distributions at every position, shape [B, L], fp32
    softmax, computed from log-probabilities (no vocab-sized probability tensor is kept)."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    return kl_from_logprobs(ref, F.log_softmax(logits.float(), dim=-1))


def kl_from_logprobs(reference: torch.Tensor, other: torch.Tensor,
                     reference_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``next_token_kl`` from log-probabilities the caller already has (``reference_probs``:
    exp(reference), when kept); the same numbers. Σ p (log p − log q) term by term rather than
    Σ p log p − Σ p log q: the difference of two sums of ~3 nats each would lose the KL of small
    perturbations (1e-6 nats) to fp32 rounding."""
    probs = reference.exp() if reference_probs is None else reference_probs
    return (probs * (reference - other)).sum(dim=-1)


def nll_from_logprobs(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``token_nll`` from the next-token log-probabilities ``log_softmax(logits[:, :-1])`` the
    caller already has: the same numbers (cross-entropy is log-softmax then the target's entry),
    without a second log-softmax over the vocabulary."""
    targets = ids[:, 1:].to(logprobs.device).expand(logprobs.shape[0], -1)
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """1.0 where both distributions put their highest probability on the same token, shape [B, L]."""
    return (reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)).float()
