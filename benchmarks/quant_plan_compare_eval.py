"""Evaluate plans written by quant_plan_embedded.py --compare (other metrics) at given budgets on
the same evaluation windows as the sweep:

    python benchmarks/quant_plan_compare_eval.py 3.25,4.25 output+fisher,fgmp,kurtosis
"""
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(2)
from llmprobe.analyses import quant_plan as qp
from llmprobe.core.data import load_corpus, tokenize_corpus
from llmprobe.core.loading import load_model
from llmprobe.core.modulemap import ModuleMap
from llmprobe.core.output import records_to_frame

lm = load_model(None, dtype="fp32", device="cpu")
ids = tokenize_corpus(load_corpus("/work/shared/data/wikitext-2-raw/wiki.test.raw"), lm.tokenizer)
half = len(ids) // 2
plans = []
for spec in sys.argv[2].split(","):
    doc = qp.plan_from_document(json.loads(Path(f"/tmp/quant_run/compare/quant_plan_{spec}.json").read_text()))
    sites = qp.resolve_sites(ModuleMap(lm.model), doc)
    for b in [float(x) for x in sys.argv[1].split(",")]:
        p = qp.replan(doc, sites, b)
        p.label = f"{spec} @{b}"
        plans.append(p)
rows = qp.evaluate(lm, ids[:half], plans, seqlen=256, max_windows=8)["quant_eval"]
records_to_frame(rows).to_csv("/tmp/quant_run/compare/quant_compare.csv", index=False)
for r in rows:
    print(f"{r.label}: bits {r.avg_bits:.4f} ppl {r.ppl:.3f} KL {r.kl_mean:.4f} "
          f"top1 {r.top1_agreement:.4f}", flush=True)
