"""Perplexity: the GPTQ/Wanda protocol, or the sliding-window protocol with ``stride``.

Protocol (SPEC §4): the corpus rows are joined with "\\n\\n" and tokenized once; windows of
``seqlen`` tokens are cut without overlap and the tail is dropped. Each window is scored with
the shifted next-token loss (targets 1..L-1 predicted from their prefixes), so a window of L
tokens contributes L-1 scored tokens. ppl = exp(Σ NLL / scored tokens).

Unlike the GPTQ reference script, the mean is over the tokens actually scored (L-1 per window,
not L): the reported NLL sum and token count make the number reproducible by hand.

With ``stride`` S each window scores only its last S tokens, given up to ``seqlen`` tokens of
context (the Hugging Face perplexity guide's protocol); the first window scores all of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core import progress
from ..core.data import Window, eval_windows
from ..core.errors import LLMProbeError
from ..core.loading import LoadedModel
from ..core.readouts import nll_sum
from ..core.records import Record


class PerplexityResult(Record):
    """One perplexity evaluation."""

    model: str
    dataset: str
    protocol: str            # "non-overlapping" (GPTQ/Wanda) or "sliding"
    seqlen: int
    stride: int | None
    windows: int
    tokens: int              # scored target tokens
    nll_sum: float           # Σ -ln p(target), nats
    mean_nll: float          # nll_sum / tokens
    ppl: float               # exp(mean_nll)
    bytes: int               # UTF-8 bytes of the scored targets' text
    bits_per_byte: float     # nll_sum / ln 2 / bytes
    dtype: str
    device: str


def check_seqlen(seqlen: int, max_length: int | None) -> int:
    if seqlen <= 0:
        raise LLMProbeError(f"--seqlen must be a positive number of tokens; got {seqlen}")
    if max_length is not None and seqlen > max_length:
        raise LLMProbeError(f"--seqlen {seqlen} is above this model's maximum of {max_length} tokens")
    return seqlen


def default_seqlen(max_length: int | None, wanted: int = 2048) -> int:
    return min(wanted, max_length) if max_length else wanted


def _batches(windows: Sequence[Window], batch_size: int) -> list[list[Window]]:
    # Only windows of the same length can share a batch (the last sliding window may be short);
    # no padding ever enters the loss.
    batches: list[list[Window]] = []
    for window in windows:
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0].input_ids) == len(window.input_ids):
            batches[-1].append(window)
        else:
            batches.append([window])
    return batches


@torch.inference_mode()
def window_nll(model: torch.nn.Module, input_ids: torch.Tensor, n_scored: Sequence[int]) -> tuple[float, int]:
    """Σ NLL (fp64 accumulate, fp32 softmax) and count of scored targets for a batch [B, L].

    ``n_scored[b]`` is how many of window b's last positions are targets; position 0 never is
    (it has no prefix).
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    logits = model(input_ids=input_ids, use_cache=False).logits
    return nll_sum(logits, input_ids, list(n_scored))


def perplexity(lm: LoadedModel, ids: torch.Tensor, *, seqlen: int, stride: int | None = None,
               batch_size: int = 1, max_windows: int | None = None, dataset: str = "") -> PerplexityResult:
    """Perplexity of ``lm`` on the token stream ``ids`` (1-D)."""
    if batch_size <= 0:
        raise LLMProbeError(f"--batch-size must be positive; got {batch_size}")
    if max_windows is not None and max_windows <= 0:
        raise LLMProbeError(f"--max-windows must be positive; got {max_windows}")
    check_seqlen(seqlen, lm.max_length)
    windows = eval_windows(ids, seqlen, stride=stride, max_windows=max_windows)
    nll_sum, tokens, nbytes = 0.0, 0, 0
    for batch in progress.track(_batches(windows, batch_size), "perplexity"):
        stacked = torch.stack([w.input_ids for w in batch])
        n_scored = [w.n_scored for w in batch]
        total, count = window_nll(lm.model, stacked, n_scored)
        nll_sum += total
        tokens += count
        for w, scored in zip(batch, n_scored):
            first_target = max(1, len(w.input_ids) - scored)
            nbytes += len(lm.tokenizer.decode(w.input_ids[first_target:]).encode("utf-8"))
    mean = nll_sum / tokens
    return PerplexityResult(
        model=lm.source.display, dataset=dataset, protocol="sliding" if stride else "non-overlapping",
        seqlen=seqlen, stride=stride, windows=len(windows), tokens=tokens, nll_sum=nll_sum, mean_nll=mean,
        ppl=math.exp(mean), bytes=nbytes, bits_per_byte=nll_sum / math.log(2) / max(nbytes, 1),
        dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device))


# -- registered analysis (declared in llmprobe.catalog.eval) ----------------------------------


def prepare_job(job):
    """The window length: given (checked against the model's maximum) or the protocol's default."""
    seqlen, max_length = job.options.seqlen, job.lm.max_length
    job.state["seqlen"] = check_seqlen(seqlen, max_length) if seqlen is not None else default_seqlen(max_length)


def perplexity_job(job):
    from ..session import Result

    o = job.options
    corpus, ids = job.evaluation
    result = perplexity(job.lm, ids, seqlen=job.state["seqlen"], stride=o.stride, batch_size=o.batch_size,
                        max_windows=o.max_windows, dataset=corpus.name)
    from ..core.data import eval_windows_manifest

    windows = eval_windows(ids, job.state["seqlen"], stride=o.stride, max_windows=o.max_windows)
    return Result(tables={"perplexity": [result]},
                  manifest={"seqlen": job.state["seqlen"],
                            "windows": eval_windows_manifest(ids, windows, job.state["seqlen"])})
