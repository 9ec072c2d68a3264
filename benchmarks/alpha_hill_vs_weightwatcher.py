"""`weights alpha-hill` against WeightWatcher and a plain SVD loop, on the embedded SmolLM2-135M.

One run, same process, same weights, same thread count:

* **llmprobe** — ``alpha_hill_analysis(precisions=("fp32",), fit="hill")`` over every 2-D weight
  WeightWatcher analyses (its layer list is read from its own output and turned into our regex),
  no plots. Default settings: fp32 weights, spectra in fp64 arithmetic (batched Gram
  eigenvalues). Also timed: ``--spectrum-dtype fp32`` and ``--fit powerlaw`` (the fit comparable
  to WeightWatcher's alpha).
* **WeightWatcher** — ``WeightWatcher(model=...).analyze()`` with its defaults (power-law fit with
  its own powerlaw package, no plots, no randomization, no MP fit), on the model loaded by
  ``llmprobe.loading.load_model()``. Its defaults analyse Linear and Embedding layers with
  8 <= #evals <= 15000 and N <= 50000, which on SmolLM2 is the 210 block linears, the token
  embedding and the tied lm_head (the same matrix again; llmprobe reads the checkpoint, where
  it is stored once, so it decomposes 211 matrices to WeightWatcher's 212).
* **plain SVD loop** — ``torch.linalg.svdvals`` of each fp32 matrix in a Python loop (reference
  floor for "one decomposition per matrix", no estimator).

Model loading and building the module map are excluded from every timing (reported apart).
Threads are pinned (``--threads``, default 1) *before* numpy/torch are imported, so all three
contenders use the same BLAS/LAPACK thread count; on a shared, oversubscribed machine a
multi-threaded LAPACK spin-waits and every timing becomes noise.

Run:  .venv/bin/python benchmarks/alpha_hill_vs_weightwatcher.py [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="BLAS/LAPACK/torch threads for every contender.")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # must happen before numpy / torch load their BLAS
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(ARGS.threads)

import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, timer  # noqa: E402

from llmprobe.analyses.alpha_hill import alpha_hill_analysis  # noqa: E402
from llmprobe.weightsource import WeightSource  # noqa: E402


def run_weightwatcher(model: torch.nn.Module):
    import weightwatcher

    # WeightWatcher logs every layer at INFO/WARNING; keep the benchmark output readable
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = weightwatcher.WeightWatcher(model=model)
    return watcher.analyze()


def plain_svd_loop(ws: WeightSource, names: list[str]) -> None:
    for name in names:
        torch.linalg.svdvals(ws.get(name).to(torch.float32))


def correlations(ours: np.ndarray, theirs: np.ndarray) -> dict:
    from scipy import stats

    finite = np.isfinite(ours) & np.isfinite(theirs)
    ours, theirs = ours[finite], theirs[finite]
    difference = np.abs(ours - theirs)
    return {
        "matrices": int(finite.sum()),
        "pearson": float(stats.pearsonr(ours, theirs)[0]),
        "spearman": float(stats.spearmanr(ours, theirs)[0]),
        "median_abs_diff": float(np.median(difference)),
        "max_abs_diff": float(difference.max()),
        "within_1pct": float(np.mean(difference <= 0.01 * np.abs(theirs))),
    }


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from llmprobe.loading import load_model

    timings: dict[str, float] = {}
    with timer(timings, "load_model (excluded)"):
        loaded = load_model(None, dtype="fp32", device="cpu", with_tokenizer=False)
    with timer(timings, "open weight source + module map (excluded)"):
        ws = WeightSource.open(None)
        ws.module_map  # noqa: B018 - built once, cached on the source

    with timer(timings, "weightwatcher analyze()"):
        watched = run_weightwatcher(loaded.model)
    ww_modules = list(dict.fromkeys(str(name) for name in watched["longname"]))
    stored = set(ws.names())
    names = [f"{module}.weight" for module in ww_modules if f"{module}.weight" in stored]
    skipped = [module for module in ww_modules if f"{module}.weight" not in stored]
    regex = "^(?:" + "|".join(re.escape(name) for name in names) + ")$"

    with timer(timings, "llmprobe alpha-hill fp32 (hill, fp64 spectra)"):
        hill_rows, _ = alpha_hill_analysis(ws, ("fp32",), regex=regex, device="cpu", fit="hill")
    with timer(timings, "llmprobe alpha-hill fp32 (hill, --spectrum-dtype fp32)"):
        alpha_hill_analysis(ws, ("fp32",), regex=regex, device="cpu", fit="hill", spectrum_dtype="fp32")
    with timer(timings, "llmprobe alpha-hill fp32 (--fit powerlaw)"):
        law_rows, _ = alpha_hill_analysis(ws, ("fp32",), regex=regex, device="cpu", fit="powerlaw")
    with timer(timings, "plain svdvals loop (fp32)"):
        plain_svd_loop(ws, names)

    ours_law = {row.layer_name.removesuffix(".weight"): row.alpha_fp32 for row in law_rows}
    ours_hill = {row.layer_name.removesuffix(".weight"): row.alpha_fp32 for row in hill_rows}
    ww_alpha = dict(zip((str(n) for n in watched["longname"]), watched["alpha"].astype(float)))
    shared = [module for module in ww_alpha if module in ours_law]
    theirs = np.array([ww_alpha[m] for m in shared])
    comparison = {
        "powerlaw_vs_ww": correlations(np.array([ours_law[m] for m in shared]), theirs),
        "hill_vs_ww": correlations(np.array([ours_hill[m] for m in shared]), theirs),
    }

    headline = timings["llmprobe alpha-hill fp32 (hill, fp64 spectra)"]
    ww_time = timings["weightwatcher analyze()"]
    report = {
        "threads": args.threads,
        "torch": torch.__version__,
        "matrices_llmprobe": len(hill_rows),
        "layers_weightwatcher": len(watched),
        "ww_layers_not_stored_separately": skipped,
        "timings_s": timings,
        "speedup_vs_weightwatcher": ww_time / headline,
        "speedup_powerlaw_vs_weightwatcher": ww_time / timings["llmprobe alpha-hill fp32 (--fit powerlaw)"],
        "ratio_vs_plain_svd_loop": timings["plain svdvals loop (fp32)"] / headline,
        "alpha_comparison": comparison,
    }

    print(f"\nweights alpha-hill vs WeightWatcher on SmolLM2-135M ({args.threads} thread(s), torch {torch.__version__})")
    print(f"llmprobe: {len(hill_rows)} matrices; WeightWatcher: {len(watched)} layers"
          + (f" (of which {', '.join(skipped)} is tied to a stored matrix)" if skipped else ""))
    print()
    print(markdown_table([{"contender": key, "seconds": value} for key, value in timings.items()]))
    print()
    print(f"speed-up, llmprobe hill fp32 vs WeightWatcher analyze(): {report['speedup_vs_weightwatcher']:.1f}x")
    print(f"speed-up, llmprobe --fit powerlaw vs WeightWatcher analyze(): "
          f"{report['speedup_powerlaw_vs_weightwatcher']:.1f}x")
    print(f"plain svdvals loop / llmprobe hill fp32: {report['ratio_vs_plain_svd_loop']:.2f}x")
    print()
    print(markdown_table([{"comparison": key, **value} for key, value in comparison.items()]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(ARGS)
