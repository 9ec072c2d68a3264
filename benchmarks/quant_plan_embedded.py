"""quant plan vs uniform vs random plans on the embedded SmolLM2-135M (docs/quant.md numbers).

Calibration windows are drawn from the second half of the WikiText-2 test text, evaluation
windows are the first windows of the first half, so the two never overlap.

    PYTHONPATH=src python benchmarks/quant_plan_embedded.py OUT_DIR [--metric output] [--nsamples 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmprobe.analyses import quant_plan as qp
from llmprobe.core.calibration import prepare
from llmprobe.core.data import calibration_windows, load_corpus, tokenize_corpus
from llmprobe.core.loading import load_model
from llmprobe.core.output import records_to_frame
from llmprobe.plots.quant import plan_figures, sweep_figures

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2-raw/wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--metric", default="output")
    parser.add_argument("--candidates", default="2,3,4,8")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--avg-bits", default="3.625")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budgets", default="")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", default="", help="other metrics, e.g. output+fisher,delta-loss,fgmp")
    parser.add_argument("--compare-nsamples", type=int, default=4, help="calibration windows for --compare")
    parser.add_argument("--compare-seqlen", type=int, default=128)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--reuse-plan", action="store_true", help="read OUT/quant_plan.json instead of planning")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    started = time.perf_counter()
    lm = load_model(None, dtype="fp32", device="cpu")
    ids = tokenize_corpus(load_corpus(str(WIKITEXT)), lm.tokenizer)
    half = len(ids) // 2
    calib_windows = calibration_windows(ids[half:], args.nsamples, args.seqlen, seed=0)
    calib = prepare(lm, windows=calib_windows)
    timings["load"] = time.perf_counter() - started

    if args.reuse_plan:
        document = json.loads((out / "quant_plan.json").read_text())
    else:
        document = make_plan(args, calib, out, timings)
    base = qp.plan_from_document(document)
    budgets = [float(b) for b in args.budgets.split(",") if b] or None
    if args.compare:
        compare(args, lm, ids, half, base, budgets, out, timings)
    if args.skip_sweep:
        return
    started = time.perf_counter()
    sweep = qp.sweep(lm, ids[:half], base, budgets=budgets, seeds=range(args.seeds), seqlen=args.seqlen,
                     max_windows=args.max_windows)
    timings["sweep"] = time.perf_counter() - started
    rows = sweep["quant_sweep"]
    records_to_frame(rows).to_csv(out / "quant_sweep.csv", index=False)
    for stem, fig in sweep_figures(sweep):
        fig.savefig(out / f"{stem}.png", dpi=110)
    (out / "timings.json").write_text(json.dumps(timings, indent=1))

    print(f"timings: {timings}")
    print(f"baseline ppl {rows[0].base_ppl:.3f}")
    print("| budget | plan ppl (bits) | uniform | random ppl: best / median / worst | plan KL | best random KL |")
    print("|---|---|---|---|---|---|")
    for budget in sorted({r.budget_avg_bits for r in rows if r.kind == "plan"}):
        planned = next(r for r in rows if r.kind == "plan" and r.budget_avg_bits == budget)
        randoms = sorted((r for r in rows if r.kind == "random" and r.budget_avg_bits == budget), key=lambda r: r.ppl)
        uniform = [r for r in rows if r.kind == "uniform" and r.avg_bits <= budget + 1e-12]
        best_uniform = min(uniform, key=lambda r: r.ppl) if uniform else None
        uni = f"{best_uniform.label}: {best_uniform.ppl:.2f} ({best_uniform.avg_bits:.3f})" if best_uniform else "-"
        mid = randoms[len(randoms) // 2]
        print(f"| {budget} | {planned.ppl:.2f} ({planned.avg_bits:.4f}) | {uni} | "
              f"{randoms[0].ppl:.2f} / {mid.ppl:.2f} / {randoms[-1].ppl:.2f} | {planned.kl_mean:.4f} | "
              f"{min(r.kl_mean for r in randoms):.4f} |")
    for r in rows:
        if r.kind == "uniform":
            print(f"uniform {r.label}: bits {r.avg_bits:.4f} ppl {r.ppl:.3f} KL {r.kl_mean:.4f}")


def make_plan(args, calib, out, timings) -> dict:
    started = time.perf_counter()
    result = qp.plan(calib, avg_bits=args.avg_bits, candidates=args.candidates, group_size=args.group_size,
                     metric=args.metric)
    timings["plan"] = time.perf_counter() - started
    (out / "quant_plan.json").write_text(json.dumps(result.documents["quant_plan"], indent=1))
    (out / "recipe.yaml").write_text(result.documents["recipe"])
    for name, rows in result.tables.items():
        records_to_frame(rows).to_csv(out / f"{name}.csv", index=False)
    for stem, fig in plan_figures(result.tables):
        fig.savefig(out / f"{stem}.png", dpi=110)

    return result.documents["quant_plan"]


def compare(args, lm, ids, half, base, budgets, out, timings) -> None:
    """Plans from other sensitivity metrics, re-allocated at the sweep's budgets and evaluated."""
    sites = qp.resolve_sites(qp.ModuleMap(lm.model), base)
    if budgets is None:
        budgets = qp.sweep_budgets(sites, base.candidates, base.scheme)
    windows = calibration_windows(ids[half:], args.compare_nsamples, args.compare_seqlen, seed=0)
    calib = prepare(lm, windows=windows)
    plans = []
    for spec in args.compare.split(","):
        metric, _, extra = spec.partition("+")
        started = time.perf_counter()
        result = qp.plan(calib, avg_bits=args.avg_bits, candidates=args.candidates, group_size=args.group_size,
                         metric=metric, fisher_weighted=extra == "fisher")
        timings[f"plan {spec}"] = time.perf_counter() - started
        (out / f"quant_plan_{spec}.json").write_text(json.dumps(result.documents["quant_plan"], indent=1))
        doc = qp.plan_from_document(result.documents["quant_plan"])
        for budget in budgets:
            p = qp.replan(doc, sites, budget)
            p.label = f"{spec} @{budget}"
            plans.append(p)
    started = time.perf_counter()
    rows = qp.evaluate(lm, ids[:half], plans, seqlen=args.seqlen, max_windows=args.max_windows)["quant_eval"]
    timings["compare eval"] = time.perf_counter() - started
    records_to_frame(rows).to_csv(out / "quant_compare.csv", index=False)
    for r in rows:
        print(f"{r.label}: bits {r.avg_bits:.4f} ppl {r.ppl:.3f} KL {r.kl_mean:.4f}")


if __name__ == "__main__":
    main()
