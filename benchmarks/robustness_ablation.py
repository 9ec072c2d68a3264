"""Prefix-reusing ablation sweep vs the naive sweep (one full forward per target).

    python benchmarks/robustness_ablation.py [--seqlen 64] [--windows 2] [--granularity matrix] [--threads 1]

On the embedded model: the full per-matrix zero-ablation sweep (every linear matrix of every
block) run twice over the same reference — once reusing the unmodified hidden states up to the
first modified block (per target alone, and batched over the targets of one block as the
command runs it), once with a full forward per target — checking that all give the same numbers
(|Δ loss|, |Δ KL| ≤ 1e-5 per target) and reporting the time ratio to the naive sweep (goal ≤ 0.6).
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--skip-per-target", action="store_true", help="time only naive and batched")
    parser.add_argument("--dataset", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else "wikitext2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llmprobe.analyses.robustness import ablation
    from llmprobe.analyses.robustness.readout import load_eval_windows
    from llmprobe.core.loading import load_model
    from llmprobe.core.reference import Reference

    lm = load_model(None, dtype="fp32", device="cpu")
    windows = load_eval_windows(lm.tokenizer, args.dataset, args.seqlen, args.windows)
    started = time.perf_counter()
    ref = Reference(lm.model, windows)
    reference_s = time.perf_counter() - started
    targets = ablation.ablation_targets(ref.mmap, args.granularity, "zero", None, None, None)

    # The sweeps are interleaved block by block, so that load from other processes on a shared
    # machine falls on all alike; each side's time is summed separately. "per target" reruns
    # blocks ℓ…end for each target alone (Reference.evaluate); "batched" is what `robustness
    # ablation` runs (Reference.evaluate_in_block: block ℓ per target, the rest once for all
    # targets of block ℓ, stacked as one batch).
    by_layer: dict[int, list] = {}
    for target in targets:
        by_layer.setdefault(target[2], []).append(target)
    naive, per_target, batched = [], [], []
    seconds = {"naive": 0.0, "per_target": 0.0, "batched": 0.0}
    for layer, group in by_layer.items():
        mods = [ablation._modification(lm.model, kind, "zero") for _n, _r, _l, kind, _p, _m in group]
        t0 = time.perf_counter()
        naive.extend(ref.evaluate(m, layer, use_prefix=False) for m in mods)
        t1 = time.perf_counter()
        if not args.skip_per_target:
            per_target.extend(ref.evaluate(m, layer) for m in mods)
        t2 = time.perf_counter()
        batched.extend(ref.evaluate_in_block(mods, layer))
        t3 = time.perf_counter()
        seconds["naive"] += t1 - t0
        seconds["per_target"] += t2 - t1
        seconds["batched"] += t3 - t2
    worst_loss = max(abs(a.mean_nll - b.mean_nll) for other in (per_target, batched) for a, b in zip(other, naive))
    worst_kl = max(abs(a.kl - b.kl) for other in (per_target, batched) for a, b in zip(other, naive))
    row = {"granularity": args.granularity, "targets": len(targets), "windows": args.windows, "seqlen": args.seqlen,
           "threads": args.threads, "reference_s": round(reference_s, 2), "naive_s": round(seconds["naive"], 2),
           "per_target_s": round(seconds["per_target"], 2) if per_target else "-",
           "per_target_ratio": round(seconds["per_target"] / seconds["naive"], 3) if per_target else "-",
           "batched_s": round(seconds["batched"], 2), "ratio": round(seconds["batched"] / seconds["naive"], 3),
           "max_abs_dloss": f"{worst_loss:.1e}", "max_abs_dkl": f"{worst_kl:.1e}",
           "prefix_cache_mb": round(ref.cache_mb, 1), "reference_logits": ref.reference_logits_mode,
           "load_avg_1min": round(os.getloadavg()[0], 2), "peak_rss_mb": round(self_peak_rss() / 2**20)}
    print(markdown_table([row]))
    if worst_loss > 1e-5 or worst_kl > 1e-5:
        raise SystemExit("prefix-reusing sweep differs from the naive sweep by more than 1e-5")


if __name__ == "__main__":
    main()
