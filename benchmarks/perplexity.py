"""Perplexity throughput vs a bare batched forward pass, and embedded-model load times.

    python benchmarks/perplexity.py [--seqlen 512] [--windows 8] [--batch-size 4] [--device cpu]

Measures, in one run on the embedded model:
* bare: ``model(input_ids)`` over the same windows, batched, inference mode — the floor;
* llmprobe: ``llmprobe.analyses.perplexity.perplexity`` over those windows;
* the ratio llmprobe / bare (target ≤ 1.1);
* first load (GGUF → safetensors conversion, cache emptied) and second load (from cache),
  each in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def load_times() -> dict:
    """Load the embedded model twice in fresh processes with an empty cache."""
    import subprocess

    # Imports (torch, transformers) are process start-up, timed apart from load_model() itself.
    # transformers imports its model classes lazily, on first use: the import step triggers them
    # (Auto classes, the Llama modules) so that load_model() is timed on reading config, weights
    # and tokenizer alone. Both are reported; their sum is what a fresh CLI process pays.
    code = ("import time; t=time.perf_counter(); import torch, transformers; "
            "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer; "
            "import transformers.models.llama.modeling_llama, transformers.models.llama.configuration_llama; "
            "from llmprobe.core.loading import load_model; i=time.perf_counter()-t; t=time.perf_counter(); "
            "load_model(None, dtype='fp32', device='cpu'); print(i, time.perf_counter()-t)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LLMPROBE_CACHE": cache, "LLMPROBE_PROGRESS": "0"}
        times = []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            times.append([float(v) for v in out.stdout.strip().splitlines()[-1].split()])
    return {"import_s": min(t[0] for t in times), "first_load_s": times[0][1],
            "second_load_s": min(t[1] for t in times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else "wikitext2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-load", action="store_true", help="skip the load-time measurement")
    parser.add_argument("--load-only", action="store_true", help="only the load-time measurement")
    args = parser.parse_args()

    if args.load_only:
        times = load_times()
        print(markdown_table([{"step": "imports: torch, transformers (Llama classes), llmprobe",
                               "seconds": times["import_s"]},
                              {"step": "first load_model() (GGUF conversion)", "seconds": times["first_load_s"]},
                              {"step": "later load_model() (cached safetensors)", "seconds": times["second_load_s"]}]))
        return
    from llmprobe.analyses.perplexity import perplexity
    from llmprobe.core.data import eval_windows, load_corpus, tokenize_corpus
    from llmprobe.core.loading import load_model

    dtype = "fp32" if args.device == "cpu" else "bf16"
    lm = load_model(None, dtype=dtype, device=args.device)
    ids = tokenize_corpus(load_corpus(args.dataset), lm.tokenizer)
    windows = torch.stack([w.input_ids for w in eval_windows(ids, args.seqlen, max_windows=args.windows)])

    def bare():
        with torch.inference_mode():
            for start in range(0, len(windows), args.batch_size):
                lm.model(input_ids=windows[start:start + args.batch_size].to(lm.device), use_cache=False)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()

    def ours():
        perplexity(lm, ids, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.windows)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()

    bare()  # warm-up (allocator, kernels)
    t_bare = best_of(bare, args.repeats)
    t_ours = best_of(ours, args.repeats)
    tokens = windows.numel()
    rows = [{"path": "bare forward", "seconds": t_bare, "tokens_per_s": tokens / t_bare, "ratio": 1.0},
            {"path": "llmprobe perplexity", "seconds": t_ours, "tokens_per_s": tokens / t_ours,
             "ratio": t_ours / t_bare}]
    print(f"## perplexity: {args.windows} windows x {args.seqlen} tokens, batch {args.batch_size}, "
          f"{lm.device}, torch threads {torch.get_num_threads()}\n")
    print(markdown_table(rows))
    if not args.skip_load:
        times = load_times()
        print("\n## embedded model load (fresh processes, empty cache)\n")
        print(markdown_table([{"step": "imports: torch, transformers (Llama classes), llmprobe", "seconds": times["import_s"]},
                              {"step": "first load_model() (GGUF conversion)", "seconds": times["first_load_s"]},
                              {"step": "later load_model() (cached safetensors)", "seconds": times["second_load_s"]}]))
    print(f"\nmeasured {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
