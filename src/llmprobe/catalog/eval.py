"""`llmprobe eval`: perplexity."""

from __future__ import annotations

from typing import Optional

from ..options import DeviceMapOptions, EvaluationOptions, OutputOptions, option
from ..registry import Analysis, Show, register, register_group

register_group("eval", "Evaluation: perplexity.")


class PerplexityOptions(DeviceMapOptions, EvaluationOptions, OutputOptions):
    stride: Optional[int] = option(None, "--stride", ge=1,
                                   help="Sliding-window protocol: each window scores only its last STRIDE tokens.")
    batch_size: int = option(1, "--batch-size", ge=1, help="Windows per forward pass.")


register(Analysis(
    name="eval.perplexity",
    help="Perplexity on a corpus: GPTQ/Wanda protocol (non-overlapping windows) or --stride sliding windows.",
    options=PerplexityOptions,
    needs=("evaluation", "model"),
    prepare="llmprobe.analyses.perplexity:prepare_job",
    compute="llmprobe.analyses.perplexity:perplexity_job",
    summary=(Show("perplexity", "perplexity",
                  ("protocol", "seqlen", "windows", "tokens", "nll_sum", "ppl", "bits_per_byte")),),
))
