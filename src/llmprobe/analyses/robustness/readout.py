"""Robustness-side pieces of the readout: the readout columns every robustness table carries,
the evaluation windows, and Spearman's rank correlation. The readout itself (the unmodified
model run once, modified models against it, prefix reuse) is ``core.reference``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...core.data import eval_windows, load_corpus, tokenize_corpus
from ...core.errors import LLMProbeError
from ...core.records import Record


class ReadoutColumns(Record):
    """Readout columns shared by every robustness table (declared here once, mixed in)."""

    loss: float                 # mean next-token NLL of the modified model (nats)
    delta_loss: float           # loss − reference loss
    ppl: float                  # exp(loss)
    delta_ppl: float            # ppl − reference ppl
    ppl_ratio: float            # ppl / reference ppl
    kl: float                   # mean per-token KL(unmodified ‖ modified), nats
    top1_agreement: float       # fraction of positions whose argmax token is unchanged
    nonfinite_windows: int      # windows whose summed loss is inf or NaN (kept, not dropped)
    finite: bool                # loss and KL both finite


def load_eval_windows(tokenizer, dataset: str, seqlen: int, max_windows: int | None) -> list[torch.Tensor]:
    """The GPTQ-protocol evaluation windows (non-overlapping, tail dropped) as 1-D id tensors."""
    if seqlen < 2:
        raise LLMProbeError(f"--seqlen must be at least 2 tokens; got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise LLMProbeError(f"--max-windows must be positive; got {max_windows}")
    corpus = load_corpus(dataset, purpose="eval")
    ids = tokenize_corpus(corpus, tokenizer)
    return [w.input_ids for w in eval_windows(ids, seqlen, max_windows=max_windows)]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant
    or fewer than two finite pairs exist."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 2:
        return math.nan
    rx = _ranks([a for a, _ in pairs])
    ry = _ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return math.nan
    return cov / math.sqrt(vx * vy)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
