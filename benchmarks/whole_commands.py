"""Whole commands, the way users run them: each contender is a fresh process, timed from start
to exit, against a whole baseline in a fresh process doing the same work without llmprobe.

* ``llmprobe --help`` / ``llmprobe --version`` (no baseline; goal <= 0.5 s).
* ``weights alpha-hill --precisions fp32`` with its default figures, on the embedded
  SmolLM2-135M, restricted (``--filter``) to the 211 stored matrices WeightWatcher analyses
  (210 block linears + the token embedding; its 212th layer is the tied lm_head, the same
  matrix) — against a script that imports WeightWatcher and transformers, loads the model from
  the safetensors checkpoint and calls ``WeightWatcher(model).analyze()`` (its defaults, no
  plots). Goal: llmprobe >= 5x faster.
* ``activations kurtosis --nsamples 16 --seqlen 256`` on WikiText-2 test — against a plain script
  that imports torch and transformers, loads the same checkpoint, tokenizes the same file and
  runs 16 forward passes of 256 tokens. Goal: <= 1.3x the plain script.

Both sides read the embedded model's cached safetensors conversion (``load_model`` builds it
once; a fresh cache would add the one-off conversion to llmprobe only). Contenders run in
interleaved rounds; the median of the rounds counts. Wall seconds and the child's CPU seconds
(user + system, less disturbed by other load) are both printed. Thread counts are pinned the
same for every process (``--threads``, default: the library defaults).

Run:  python benchmarks/whole_commands.py [--repeats 3] [--heavy-repeats 3] [--only help,alpha,kurtosis]
      [--json PATH]    (PYTHONPATH=src from a checkout)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
if not WIKITEXT.is_file():
    WIKITEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
# The matrices WeightWatcher's analyze() picks on SmolLM2 that are stored once each.
WW_MATRICES = r"^model\.(embed_tokens|layers\.\d+\.(self_attn|mlp)\.\w+_proj)\.weight$"

WEIGHTWATCHER_SCRIPT = """
import logging, sys
import weightwatcher
from transformers import AutoModelForCausalLM
import torch
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
details = weightwatcher.WeightWatcher(model=model).analyze()
print("layers", len(details))
"""

PLAIN_FORWARD_SCRIPT = """
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, data, nsamples, seqlen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = tokenizer(open(data, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
generator = torch.Generator().manual_seed(0)
starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=generator)
with torch.inference_mode():
    for start in starts.tolist():
        model(ids[start:start + seqlen][None])
print("forwards", nsamples)
"""


def llmprobe(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmprobe", *args]


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one fresh process; fails loudly on a non-zero exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def converted_checkpoint() -> str:
    """The embedded model's safetensors conversion (built now if absent, outside any timing)."""
    code = ("from llmprobe.core.loading import resolve_source; print(resolve_source(None).pretrained_dir())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="Rounds for --help/--version.")
    parser.add_argument("--heavy-repeats", type=int, default=3, help="Rounds for the model commands.")
    parser.add_argument("--only", default="help,alpha,kurtosis", help="Which comparisons to run.")
    parser.add_argument("--threads", type=int, default=None, help="Pin OMP/MKL/OpenBLAS threads for every process.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    only = set(args.only.split(","))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("LLMPROBE_PROGRESS", None)
    if args.threads:
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[variable] = str(args.threads)
    checkpoint = converted_checkpoint()
    scratch = Path(tempfile.mkdtemp(prefix="llmprobe-bench-"))

    contenders: dict[str, tuple[int, callable]] = {}
    counter = {"n": 0}

    def out_dir() -> str:
        counter["n"] += 1
        return str(scratch / f"run{counter['n']}")

    if "help" in only:
        contenders["llmprobe --help"] = (args.repeats, lambda: llmprobe("--help"))
        contenders["llmprobe --version"] = (args.repeats, lambda: llmprobe("--version"))
    if "alpha" in only:
        contenders["llmprobe weights alpha-hill --precisions fp32 (default figures)"] = (
            args.heavy_repeats, lambda: llmprobe("weights", "alpha-hill", "--precisions", "fp32", "--filter",
                                                 WW_MATRICES, "--out", out_dir()))
        contenders["weightwatcher: load + analyze()"] = (
            args.heavy_repeats, lambda: [sys.executable, "-c", WEIGHTWATCHER_SCRIPT, checkpoint])
    if "kurtosis" in only:
        contenders["llmprobe activations kurtosis --nsamples 16 --seqlen 256"] = (
            args.heavy_repeats, lambda: llmprobe("activations", "kurtosis", "--nsamples", "16", "--seqlen", "256",
                                                 "--dataset", str(WIKITEXT), "--out", out_dir()))
        contenders["plain script: load + 16 forwards"] = (
            args.heavy_repeats, lambda: [sys.executable, "-c", PLAIN_FORWARD_SCRIPT, checkpoint, str(WIKITEXT),
                                         "16", "256"])

    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    rounds = max(repeats for repeats, _ in contenders.values())
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")
    load_before = os.getloadavg()
    for round_index in range(rounds):  # interleaved: a busy minute hits every contender alike
        for name, (repeats, argv) in contenders.items():
            if round_index >= repeats:
                continue
            w, c = timed(argv(), env)
            wall[name].append(w)
            cpu[name].append(c)
            print(f"round {round_index + 1}: {name}: {w:.2f} s wall, {c:.2f} s cpu", flush=True)
    load_after = os.getloadavg()

    median = {name: statistics.median(values) for name, values in wall.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    rows = [{"command (fresh process)": name, "runs": len(wall[name]), "median wall s": round(median[name], 2),
             "median cpu s": round(median_cpu[name], 2)} for name in contenders]
    ratios = {}
    pairs = [("llmprobe weights alpha-hill --precisions fp32 (default figures)", "weightwatcher: load + analyze()",
              "weightwatcher / llmprobe alpha-hill (goal >= 5)", True),
             ("llmprobe activations kurtosis --nsamples 16 --seqlen 256", "plain script: load + 16 forwards",
              "llmprobe kurtosis / plain script (goal <= 1.3)", False)]
    for ours, theirs, label, inverse in pairs:
        if ours in median and theirs in median:
            ratios[label] = {"wall": (median[theirs] / median[ours]) if inverse else (median[ours] / median[theirs]),
                             "cpu": (median_cpu[theirs] / median_cpu[ours]) if inverse
                             else (median_cpu[ours] / median_cpu[theirs])}
    print(f"\nwhole commands, fresh processes, {started_at} UTC, {platform.node()} "
          f"({os.cpu_count()} cores), load average {load_before[0]:.1f} -> {load_after[0]:.1f}\n")
    print(markdown_table(rows))
    print()
    for label, ratio in ratios.items():
        print(f"{label}: {ratio['wall']:.2f}x wall, {ratio['cpu']:.2f}x cpu")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "started_at": started_at, "cores": os.cpu_count(), "load_average": [load_before, load_after],
            "python": platform.python_version(), "wall_s": wall, "cpu_s": cpu, "median_wall_s": median,
            "median_cpu_s": median_cpu, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
