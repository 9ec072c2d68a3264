"""quant plan (default metric kl) against uniform, heuristic and random plans of the same size, at
several budgets, on the embedded SmolLM2-135M (the docs/quant.md table).

The sensitivities are measured once (``--sensitivities FILE`` reuses a saved JSON), then plans
are allocated at each budget from them, and every plan is evaluated on evaluation windows that do
not overlap the calibration windows (calibration: second half of the WikiText-2 test text;
evaluation: the first windows of the first half).

    PYTHONPATH=src python benchmarks/quant_plan_budgets.py [--nsamples 2 --seqlen 128]
        [--candidates 2,3,4,5,6,8] [--budgets 3.25,3.75,4.25,5.25] [--seeds 3] [--sensitivities FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from llmprobe.analyses import quant_plan as qp
from llmprobe.core.calibration import prepare
from llmprobe.core.data import calibration_windows, load_corpus, tokenize_corpus
from llmprobe.core.loading import load_model

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2-raw/wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", default="kl")
    parser.add_argument("--candidates", default="2,3,4,5,6,8")
    parser.add_argument("--group-size", type=int, default=64, help="128 does not divide SmolLM2's 576")
    parser.add_argument("--nsamples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--budgets", default="3.25,3.75,4.25,5.25")
    parser.add_argument("--uniform", default="int3,int4,int5")
    parser.add_argument("--heuristics", default="kurtosis,output", help="other metrics planned at each budget")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sensitivities", help="JSON of a previous run's measured sensitivities (read, or written)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(None, dtype="fp32", device="cpu")
    ids = tokenize_corpus(load_corpus(str(WIKITEXT)), lm.tokenizer)
    half = len(ids) // 2
    calib = prepare(lm, windows=calibration_windows(ids[half:], args.nsamples, args.seqlen, seed=0))
    sites = list(calib.sites)
    scheme = qp.check_scheme(args.group_size, True)
    formats = qp.parse_candidates(args.candidates)
    options = qp._options(sites, formats, {})
    budgets = [float(b) for b in args.budgets.split(",")]

    saved = Path(args.sensitivities) if args.sensitivities else None
    if saved is not None and saved.is_file():
        measured = json.loads(saved.read_text())
    else:
        started = time.perf_counter()
        result = qp.plan(calib, avg_bits=budgets[0], candidates=formats, group_size=args.group_size,
                         metric=args.metric, measure_windows=0)
        measured = {}
        for row in result.tables["quant_sensitivity"]:
            measured.setdefault(row.module, {})[row.format] = row.sensitivity
        print(f"{args.metric} sensitivities: {time.perf_counter() - started:.1f} s "
              f"({args.nsamples} x {args.seqlen} tokens, load {os.getloadavg()[0]:.2f})", flush=True)
        if saved is not None:
            saved.write_text(json.dumps(measured))

    sensitivities = {args.metric: measured}
    for metric in [m for m in args.heuristics.split(",") if m]:
        result = qp.plan(calib, avg_bits=budgets[0], candidates=formats, group_size=args.group_size, metric=metric)
        sensitivities[metric] = {}
        for row in result.tables["quant_sensitivity"]:
            sensitivities[metric].setdefault(row.module, {})[row.format] = row.sensitivity

    plans = []
    for budget in budgets:
        bits = qp.check_budget(sites, options, scheme, budget)
        for metric, sens in sensitivities.items():
            out = qp.build_plan(sites, sens, options, scheme, avg_bits=budget, budget=bits, metric=metric,
                                candidates=formats)
            plan = qp.plan_from_document(out.documents["quant_plan"])
            plan.label = f"{metric} @{budget}"
            plans.append(plan)
            print(plan.label, out.tables["quant_plan_summary"][0].formats, flush=True)
        for seed in range(args.seeds):
            plan = qp.random_plan(sites, formats, scheme, avg_bits=budget, seed=seed)
            plan.label = f"random s{seed} @{budget}"
            plans.append(plan)
    plans += [qp.uniform_plan(sites, fmt, scheme) for fmt in args.uniform.split(",") if fmt]

    started = time.perf_counter()
    rows = qp.evaluate(lm, ids[:half], plans, seqlen=args.eval_seqlen, max_windows=args.eval_windows)["quant_eval"]
    print(f"evaluation: {time.perf_counter() - started:.1f} s, load {os.getloadavg()[0]:.2f}")
    print(f"unquantized ppl {rows[0].base_ppl:.3f} on {rows[0].tokens} tokens")
    print("| plan | bits/param | ppl | KL | top-1 agreement |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.label} | {r.avg_bits:.4f} | {r.ppl:.2f} | {r.kl_mean:.4f} | {r.top1_agreement:.3f} |", flush=True)


if __name__ == "__main__":
    main()
