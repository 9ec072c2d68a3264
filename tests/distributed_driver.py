"""Runs a set of analyses in one Session, each into OUT/<name>; launched by tests/test_distributed.py
under ``torchrun --nproc-per-node 2`` (and usable in one process for the reference).

    python tests/distributed_driver.py MODEL_DIR DATA_FILE OUT [--fail-rank R] [--only a,b]

``--fail-rank R``: rank R's forward pass raises (a rank that fails mid-run).
``--die-rank R``: rank R exits abruptly (os._exit) in its forward pass, with no Python error.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from llmprobe import Session
from llmprobe.core import distributed


def analyses(model: str, data: str) -> dict[str, dict]:
    calibration = {"dataset": data, "nsamples": 5, "seqlen": 24, "seed": 3, "dtype": "fp32", "device": "cpu"}
    return {
        "activations.kurtosis": dict(calibration),
        "activations.magnitude": {**calibration, "top_k": 4},
        "activations.quant-error": {**calibration, "bits": 4},
        "activations.norms": dict(calibration),
        "activations.top-token-error": {**calibration, "top_k": 3},
        "weights.alpha-hill": {"plot": False, "device": "cpu"},
        "weights.stats": {},
        "weights.spectrum": {"device": "cpu"},
        "eval.perplexity": {"dataset": data, "seqlen": 24, "max_windows": 7, "batch_size": 2,
                            "dtype": "fp32", "device": "cpu"},
    }


def guard_writes() -> None:
    """Ranks other than 0 must write nothing: make every writer of the package fail there."""
    from llmprobe.core import output

    def refuse(*args, **kwargs):
        raise AssertionError(f"rank {distributed.rank()} tried to write")

    output.atomic_write_bytes = refuse
    output.RunOutput.__init__ = refuse


def run_all(model: str, data: str, out: str, only: str | None = None, fail_rank: int | None = None,
            die_rank: int | None = None) -> None:
    todo = analyses(model, data)
    if only:
        todo = {name: todo[name] for name in only.split(",")}
    with Session(model, dtype="fp32", device="cpu") as session:
        if distributed.rank() in (fail_rank, die_rank):
            die = distributed.rank() == die_rank

            def broken(module, inputs):
                if die:
                    os._exit(7)
                raise RuntimeError(f"injected failure on rank {distributed.rank()}")

            session.lm.model.register_forward_pre_hook(broken)
        for name, values in todo.items():
            values = {k: v for k, v in values.items() if k not in ("dtype", "device") or name.startswith("weights")}
            session.run(name, out=os.path.join(out, name), **values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--die-rank", type=int, default=None)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per rank (the test compares with a one-thread run)
    distributed.init_from_env()
    if not distributed.is_main():
        guard_writes()
    run_all(args.model, args.data, args.out, args.only, args.fail_rank, args.die_rank)
    print(f"rank {distributed.rank()} of {distributed.world_size()} done", file=sys.stderr)


if __name__ == "__main__":
    main()
