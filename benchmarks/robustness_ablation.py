"""Prefix-reusing ablation sweep vs the naive sweep (one full forward per target).

    python benchmarks/robustness_ablation.py [--seqlen 64] [--windows 2] [--granularity matrix] [--threads 1]

On the embedded model: the full per-matrix zero-ablation sweep (every linear matrix of every
block) run twice over the same reference — once reusing the unmodified hidden states up to the
first modified block, once with a full forward per target — checking that both give the same
numbers (|Δ loss|, |Δ KL| ≤ 1e-5 per target) and reporting the time ratio (goal ≤ 0.6).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, self_peak_rss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--granularity", default="matrix", choices=("matrix", "layer", "block"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else "wikitext2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llmprobe.analyses.robustness import ablation
    from llmprobe.analyses.robustness.readout import Reference, load_eval_windows
    from llmprobe.core.loading import load_model

    lm = load_model(None, dtype="fp32", device="cpu")
    windows = load_eval_windows(lm.tokenizer, args.dataset, args.seqlen, args.windows)
    started = time.perf_counter()
    ref = Reference(lm.model, windows)
    reference_s = time.perf_counter() - started
    targets = ablation.ablation_targets(ref.mmap, args.granularity, "zero", None, None, None)

    # The two sweeps are interleaved target by target, so that load from other processes on a
    # shared machine falls on both alike; each side's time is summed separately.
    naive, fast = [], []
    naive_s = fast_s = 0.0
    for _name, _role, layer, kind, _p, _m in targets:
        for use_prefix, out in ((False, naive), (True, fast)):
            t0 = time.perf_counter()
            out.append(ref.evaluate(ablation._modification(lm.model, kind, "zero"), layer, use_prefix=use_prefix))
            elapsed = time.perf_counter() - t0
            if use_prefix:
                fast_s += elapsed
            else:
                naive_s += elapsed
    worst_loss = max(abs(a.mean_nll - b.mean_nll) for a, b in zip(fast, naive))
    worst_kl = max(abs(a.kl - b.kl) for a, b in zip(fast, naive))
    row = {"granularity": args.granularity, "targets": len(targets), "windows": args.windows, "seqlen": args.seqlen,
           "threads": args.threads, "reference_s": round(reference_s, 2), "naive_s": round(naive_s, 2),
           "prefix_s": round(fast_s, 2), "ratio": round(fast_s / naive_s, 3),
           "max_abs_dloss": f"{worst_loss:.1e}", "max_abs_dkl": f"{worst_kl:.1e}",
           "prefix_cache_mb": round(ref.cache_mb, 1), "reference_logits": ref.reference_logits_mode,
           "peak_rss_mb": round(self_peak_rss() / 2**20)}
    print(markdown_table([row]))
    if worst_loss > 1e-5 or worst_kl > 1e-5:
        raise SystemExit("prefix-reusing sweep differs from the naive sweep by more than 1e-5")


if __name__ == "__main__":
    main()
