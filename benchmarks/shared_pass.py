"""The combined activation pass of `report run` against a bare forward over the same windows.

`report run` folds the collection passes of magnitude, kurtosis, max-median, quant-error and
norms into one forward pass (core.collect.SharedPass). This times that one pass (with every
collector of the five analyses attached) against a bare `model(input_ids)` over the same
calibration windows, best of N, in one process. Goal: <= 1.3x.

A forward-only collection pass stops when the model reaches its output head (core.collect:
every hooked module has run, and nothing needs the logits). So that the statistics' own cost
stays visible, a third timing runs the same pass with no statistic at all: hooks only, stopping
at the head. "statistics / empty pass" is what the statistics themselves cost.

    python benchmarks/shared_pass.py [--nsamples 16] [--seqlen 256] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import markdown_table

import llmprobe
from llmprobe import registry
from llmprobe.core.collect import SharedPass, collect

ANALYSES = ["activations.magnitude", "activations.kurtosis", "activations.max-median", "activations.quant-error",
            "activations.norms"]
WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dataset", default=str(WIKITEXT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"nsamples": args.nsamples, "seqlen": args.seqlen, "dataset": args.dataset}
    session = llmprobe.Session(dtype="fp32", device="cpu")
    calib = session.calibration(registry.get("activations.kurtosis").options.parse(options))
    windows = calib.windows

    def bare() -> None:
        with torch.inference_mode():
            for window in windows:
                session.lm.model(input_ids=window[None], use_cache=False)

    def empty() -> None:
        collect(session.lm.model, calib.mmap, calib.sites, windows, [], description="empty pass")

    def shared() -> SharedPass:
        folded = SharedPass()
        with folded.active():
            for name in ANALYSES:
                with folded.recording(name):
                    session.run(name, **options)
            started = time.perf_counter()
            folded.run()
            folded.seconds = time.perf_counter() - started
        return folded

    bare()  # warm-up
    bare_times, empty_times, shared_times = [], [], []
    for _ in range(args.repeats):  # interleaved, so background load falls on all alike
        for run, times in ((bare, bare_times), (empty, empty_times)):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        shared_times.append(shared().seconds)
    row = {"windows": f"{args.nsamples} x {args.seqlen}", "analyses": len(ANALYSES), "threads": args.threads,
           "bare forward s": min(bare_times), "empty pass s": min(empty_times), "shared pass s": min(shared_times),
           "ratio": min(shared_times) / min(bare_times),
           "statistics / empty pass": min(shared_times) / min(empty_times)}
    print(markdown_table([row]))
    # The machine may be shared: say how loaded it was, and every round, not only the best.
    print("rounds, bare s:", ", ".join(f"{t:.2f}" for t in bare_times))
    print("rounds, empty s:", ", ".join(f"{t:.2f}" for t in empty_times))
    print("rounds, shared s:", ", ".join(f"{t:.2f}" for t in shared_times))
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
