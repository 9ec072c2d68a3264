"""Pruning on the embedded model: time against a bare forward, perplexity per method, peak memory.

    python benchmarks/prune.py [--nsamples 16] [--seqlen 256] [--eval-windows 16] [--eval-seqlen 512]
                               [--skip-time] [--skip-ppl] [--skip-memory] [--threads 1]

* time: wanda (with and without the reconstruction error) and sparsegpt, layer-sequential over
  the calibration windows, against a bare batched forward of the same windows (inference mode,
  same batch size). Goals: wanda <= 3x, sparsegpt <= 5x.
* perplexity: dense, then 50 % unstructured and 2:4 for magnitude, wanda and sparsegpt.
  Only wiki.test.raw is available offline: calibration windows come from the first half of its
  tokens, evaluation windows from the second half (no overlap).
* memory: peak RSS of fresh processes that (a) load the model and run one bare forward over
  the calibration windows (the baseline: every weight page touched), (b) the same and keep a
  second copy of the model (what "load twice" costs), (c) load it and prune it with wanda in
  place (restore=False), (d) the same with restore=True (keeps the dense copy of the pruned
  matrices), (e) sparsegpt in place.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import child_peak_rss, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

SETUP = """
import torch
torch.set_num_threads({threads})
from llmprobe.core.loading import load_model
from llmprobe.core.data import load_corpus, tokenize_corpus, calibration_windows
lm = load_model(None, dtype="fp32", device="cpu")
ids = tokenize_corpus(load_corpus({data!r}), lm.tokenizer)
windows = calibration_windows(ids[: len(ids) // 2], {nsamples}, {seqlen}, 0)
"""


def _windows(lm, nsamples: int, seqlen: int):
    from llmprobe.core.data import calibration_windows, load_corpus, tokenize_corpus

    ids = tokenize_corpus(load_corpus(str(DATA)), lm.tokenizer)
    half = len(ids) // 2
    return calibration_windows(ids[:half], nsamples, seqlen, 0), ids[half:]


def bench_time(lm, windows, batch_size: int) -> list[dict]:
    from llmprobe.analyses.prune import prune_run

    def bare():
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_size):
                lm.model(input_ids=windows[start:start + batch_size], use_cache=False)

    bare()  # warm-up
    started = time.perf_counter()
    bare()
    bare_s = time.perf_counter() - started
    rows = [{"run": "bare forward", "seconds": bare_s, "ratio": 1.0}]
    for label, kwargs in (("wanda (reconstruction error)", dict(method="wanda")),
                          ("wanda (no reconstruction error)", dict(method="wanda", reconstruction=False)),
                          ("sparsegpt", dict(method="sparsegpt"))):
        tables, _ = prune_run(lm, sparsity=0.5, windows=windows, batch_size=batch_size, **kwargs)
        seconds = tables["prune_summary"][0].prune_seconds
        rows.append({"run": label, "seconds": seconds, "ratio": seconds / bare_s})
    return rows


def bench_ppl(lm, windows, eval_ids, eval_seqlen: int, eval_windows: int, batch_size: int) -> list[dict]:
    from llmprobe.analyses.perplexity import perplexity
    from llmprobe.analyses.prune import prune_run

    dense = perplexity(lm, eval_ids, seqlen=eval_seqlen, max_windows=eval_windows).ppl
    rows = [{"method": "dense", "pattern": "-", "achieved_sparsity": 0.0, "mean_recon_error": None, "ppl": dense}]
    for pattern in (dict(sparsity=0.5), dict(nm="2:4")):
        for method in ("magnitude", "wanda", "sparsegpt"):
            tables, _ = prune_run(lm, method=method, windows=windows, eval_ids=eval_ids, eval_seqlen=eval_seqlen,
                                  max_windows=eval_windows, evaluate_dense=False, batch_size=batch_size, **pattern)
            s = tables["prune_summary"][0]
            rows.append({"method": method, "pattern": s.pattern, "achieved_sparsity": s.achieved_sparsity,
                         "mean_recon_error": s.mean_reconstruction_error, "ppl": s.ppl_pruned})
    return rows


def bench_memory(args) -> list[dict]:
    setup = SETUP.format(threads=args.threads, data=str(DATA), nsamples=args.nsamples, seqlen=args.seqlen)
    # The checkpoint is memory-mapped: weights count in RSS once touched. The baseline therefore
    # runs one bare forward over the calibration windows (every weight read, one forward's
    # activations), and the differences to it are what pruning adds.
    forward = ("with torch.inference_mode():\n"
               "    for i in range(0, windows.shape[0], 8): lm.model(input_ids=windows[i:i + 8], use_cache=False)\n")
    cases = {
        "load model + bare forward": forward,
        "load model + bare forward + second copy": forward + "import copy; twin = copy.deepcopy(lm.model)",
        "wanda, in place (restore=False)": "from llmprobe.analyses.prune import prune_run\n"
        "prune_run(lm, method='wanda', sparsity=0.5, windows=windows, restore=False)",
        "wanda, restore=True": "from llmprobe.analyses.prune import prune_run\n"
        "prune_run(lm, method='wanda', sparsity=0.5, windows=windows, restore=True)",
        "sparsegpt, in place (restore=False)": "from llmprobe.analyses.prune import prune_run\n"
        "prune_run(lm, method='sparsegpt', sparsity=0.5, windows=windows, restore=False)",
    }
    rows = []
    for label, code in cases.items():
        peak, _ = child_peak_rss(setup + code, env={"LLMPROBE_PROGRESS": "0"})
        rows.append({"process": label, "peak_rss_mib": peak / 2 ** 20})
    base = rows[0]["peak_rss_mib"]
    for row in rows:
        row["over_baseline_mib"] = row["peak_rss_mib"] - base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"settings": vars(args) | {"json": str(args.json) if args.json else None}}
    if not (args.skip_time and args.skip_ppl):
        from llmprobe.core.loading import load_model

        lm = load_model(None, dtype="fp32", device="cpu")
        windows, eval_ids = _windows(lm, args.nsamples, args.seqlen)
        if not args.skip_time:
            results["time"] = bench_time(lm, windows, args.batch_size)
            print(markdown_table(results["time"]), "\n", flush=True)
        if not args.skip_ppl:
            results["perplexity"] = bench_ppl(lm, windows, eval_ids, args.eval_seqlen, args.eval_windows,
                                              args.batch_size)
            print(markdown_table(results["perplexity"]), "\n", flush=True)
    if not args.skip_memory:
        results["memory"] = bench_memory(args)
        print(markdown_table(results["memory"]), "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
