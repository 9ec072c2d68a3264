"""Run every benchmark in turn and print their tables (the figures for docs/benchmarks.md).

    python benchmarks/run_all.py [--quick]

WeightWatcher is optional: its comparison runs only where ``weightwatcher`` is installed
(``pip install weightwatcher`` into the benchmark environment; llmprobe never imports it).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not figures to record")
    args = parser.parse_args()
    runs = [
        ["perplexity.py", *(["--windows", "2", "--seqlen", "128", "--skip-load"] if args.quick else [])],
        ["activations.py", *(["--windows", "4", "--seqlen", "128", "--rss-windows", "4", "8"] if args.quick else [])],
        ["weights_memory.py", *(["--hidden", "512", "--intermediate", "1408", "--layers", "2", "--vocab", "8000"]
                                if args.quick else [])],
    ]
    if importlib.util.find_spec("weightwatcher") is not None:
        runs.append(["alpha_hill_vs_weightwatcher.py", *(["--repeats", "1"] if args.quick else [])])
    else:
        print("weightwatcher is not installed: skipping the WeightWatcher comparison\n")
    failed = []
    for script, *options in runs:
        print(f"\n# benchmarks/{script} {' '.join(options)}\n", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *options]).returncode != 0:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
