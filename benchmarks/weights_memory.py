"""Peak memory of the weight commands on a multi-GB sharded checkpoint: ~ one tensor, not the model.

    python benchmarks/weights_memory.py                       # ~2.2 GB fp32 llama, 4 shards
    python benchmarks/weights_memory.py --hidden 1024 --intermediate 2816 --layers 4 --vocab 16000  # quick
    python benchmarks/weights_memory.py --layers 16 --shards 8 --keep /tmp/ckpt   # bigger, kept

Builds a synthetic Llama checkpoint in a temporary directory: a config.json, ``--shards``
safetensors shards of random fp32 tensors (names and shapes taken from the model class built
on the meta device, so the module map sees an ordinary checkpoint) and the shard index. Shards
are generated and written one at a time, so building needs one shard of RAM, not the model.

Then, each in a fresh process whose peak RSS (``VmHWM``, read by the child itself) is reported:

* ``weights bops``      — shapes only: imports + the meta-device module map, the process floor;
* ``weights stats``     — every tensor, fp64 moments;
* ``weights spectrum``  — the full SVD spectrum of the matrices matching ``--spectrum-filter``;
* bare floor            — a process that only imports torch and safetensors;
* bare loop             — the bare baseline: ``safe_open`` + ``get_tensor`` per tensor and a
  plain fp64 mean/std/min/max, no llmprobe (the floor any streaming tool has);
* load everything       — ``safetensors.torch.load_file`` of every shard into one dict and the
  same plain statistics: what a tool that loads the model costs (``--no-naive`` skips it).

The table reports wall time, peak RSS, the peak above the ``weights bops`` floor, and that
excess as a multiple of the largest tensor and as a fraction of the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import child_peak_rss, markdown_table

MB = 1 << 20
SIZE_FLAGS = ("hidden", "intermediate", "layers", "vocab", "heads", "shards", "seed")


def build_checkpoint(directory: Path, *, hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                     shards: int, seed: int) -> dict:
    """Write config.json, the shards and the index; return sizes (total and largest tensor)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from llmprobe.core.modulemap import ModuleMap

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)

    # Names and shapes exactly as the model defines them (meta device: no memory).
    meta_model = ModuleMap.from_config(config).model
    tensors = [(name, tuple(param.shape)) for name, param in meta_model.named_parameters()]
    sizes = [4 * _numel(shape) for _, shape in tensors]
    total = sum(sizes)
    per_shard = total / shards

    # Greedy packing in model order, like transformers' own sharding.
    groups: list[list[tuple[str, tuple]]] = [[]]
    filled = 0
    for (name, shape), size in zip(tensors, sizes):
        if groups[-1] and filled + size > per_shard and len(groups) < shards:
            groups.append([])
            filled = 0
        groups[-1].append((name, shape))
        filled += size

    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        file_name = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: torch.randn(shape, generator=generator).mul_(0.02) for name, shape in group}
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        del shard  # one shard in RAM at a time
        weight_map.update({name: file_name for name, _ in group})
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    return {"total_bytes": total, "largest_bytes": max(sizes), "tensors": len(tensors), "shards": len(groups),
            "largest_name": tensors[sizes.index(max(sizes))][0]}


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def cli_code(args: list[str]) -> str:
    # main() ends in sys.exit; catch it so the peak-RSS line of child_peak_rss still prints.
    return ("from llmprobe.cli.app import main\n"
            "try:\n"
            f"    main({args!r})\n"
            "except SystemExit as exc:\n"
            "    if exc.code:\n"
            "        raise\n")


BARE_LOOP = """
import json, torch
from pathlib import Path
from safetensors import safe_open
directory = Path({directory!r})
files = sorted(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()))
for file in files:
    with safe_open(str(directory / file), framework="pt") as handle:
        for name in handle.keys():
            values = handle.get_tensor(name).double()
            stats = (values.mean().item(), values.std().item(), values.min().item(), values.max().item())
            del values
"""

BARE_FLOOR = """
import torch, safetensors.torch
"""

LOAD_EVERYTHING = """
import json
from pathlib import Path
from safetensors.torch import load_file
directory = Path({directory!r})
files = sorted(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()))
state = {{}}
for file in files:
    state.update(load_file(str(directory / file)))
for name, tensor in state.items():
    values = tensor.double()
    stats = (values.mean().item(), values.std().item(), values.min().item(), values.max().item())
    del values
"""


# The child reports its own high-water mark. ru_maxrss is not used: Linux carries the parent's
# peak into a child across fork/exec, so a child of a big process would report the parent's peak.
REPORT_HWM = """
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("__HWM__", int(line.split()[1]) * 1024)
"""


def measure(label: str, code: str, env: dict) -> dict:
    started = time.perf_counter()
    _, stdout = child_peak_rss(code + REPORT_HWM, env=env)
    hwm = next(int(line.split()[1]) for line in stdout.splitlines() if line.startswith("__HWM__"))
    return {"run": label, "wall_s": time.perf_counter() - started, "peak_rss_MB": hwm / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spectrum-filter", default=r"layers\.0\.",
                        help="regex of the matrices the spectrum run decomposes")
    parser.add_argument("--no-naive", action="store_true", help="skip the load-everything baseline")
    parser.add_argument("--keep", type=Path, default=None, help="build (or reuse) the checkpoint here and keep it")
    parser.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only is not None:
        sizes = build_checkpoint(args.build_only, **{key: getattr(args, key) for key in SIZE_FLAGS})
        (args.build_only / "bench-sizes.json").write_text(json.dumps(sizes))
        return

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="llmprobe-weights-bench-"))
    checkpoint = workdir / "checkpoint"
    results_dir = workdir / "results"
    try:
        started = time.perf_counter()
        info_file = checkpoint / "bench-sizes.json"
        if not (args.keep and info_file.is_file()):
            # Built in a child so this process stays small while it launches the measured ones.
            build = subprocess.run([sys.executable, __file__, "--build-only", str(checkpoint),
                                    *[f"--{key}={getattr(args, key)}" for key in SIZE_FLAGS]], check=False)
            if build.returncode != 0:
                raise SystemExit("building the checkpoint failed")
        sizes = json.loads(info_file.read_text())
        built = time.perf_counter() - started
        print(f"checkpoint: {sizes['total_bytes'] / MB:,.0f} MB fp32 in {sizes['shards']} shards, "
              f"{sizes['tensors']} tensors; largest {sizes['largest_name']} = {sizes['largest_bytes'] / MB:,.0f} MB "
              f"(built in {built:.0f} s)", flush=True)

        env = {"LLMPROBE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        common = ["--model", str(checkpoint), "--quiet", "--overwrite"]
        runs = [
            ("weights bops (floor: imports + module map)",
             cli_code(["weights", "bops", *common, "--out", str(results_dir / "bops")])),
            ("weights stats (all tensors)",
             cli_code(["weights", "stats", *common, "--out", str(results_dir / "stats")])),
            (f"weights spectrum --filter '{args.spectrum_filter}'",
             cli_code(["weights", "spectrum", *common, "--device", "cpu", "--filter", args.spectrum_filter,
                       "--out", str(results_dir / "spectrum")])),
            ("bare floor: import torch + safetensors", BARE_FLOOR),
            ("bare loop: safe_open + get_tensor + fp64 mean/std", BARE_LOOP.format(directory=str(checkpoint))),
        ]
        if not args.no_naive:
            runs.append(("load everything (load_file of all shards)", LOAD_EVERYTHING.format(directory=str(checkpoint))))

        rows = []
        for label, code in runs:
            row = measure(label, code, env)
            rows.append(row)
            print(f"  {label}: {row['wall_s']:.1f} s, peak RSS {row['peak_rss_MB']:,.0f} MB", flush=True)

        # llmprobe runs are measured above the llmprobe floor (bops), the plain scripts above
        # the bare-import floor, so each excess is the memory the work itself needed.
        llmprobe_floor, bare_floor = rows[0]["peak_rss_MB"], rows[3]["peak_rss_MB"]
        largest = sizes["largest_bytes"] / MB
        total = sizes["total_bytes"] / MB
        for position, row in enumerate(rows):
            above = max(row["peak_rss_MB"] - (llmprobe_floor if position < 3 else bare_floor), 0.0)
            row["above_floor_MB"] = above
            row["above_floor / largest tensor"] = above / largest
            row["peak / checkpoint"] = row["peak_rss_MB"] / total
        stats_row, bare_row = rows[1], rows[4]
        for row in rows:  # a regex's "|" would split a markdown cell
            row["run"] = row["run"].replace("|", "\\|")
        print()
        print(markdown_table(rows))
        print()
        # Work time = wall time above each floor's (imports, module map), so start-up is not compared.
        stats_work = stats_row["wall_s"] - rows[0]["wall_s"]
        bare_work = bare_row["wall_s"] - rows[3]["wall_s"]
        print(f"checkpoint {total:,.0f} MB, largest tensor {largest:,.0f} MB")
        print(f"weights stats / bare loop: wall {stats_row['wall_s'] / bare_row['wall_s']:.2f}x, "
              f"work above the floors {stats_work:.1f} s / {bare_work:.1f} s = "
              f"{stats_work / max(bare_work, 1e-9):.2f}x (stats also computes kurtosis, sparsity, NaN/Inf counts)")
        spectrum_rows = json.loads((results_dir / "spectrum" / "weight_spectrum.json").read_text())
        print(f"spectrum decomposed {len(spectrum_rows)} matrices: "
              + ", ".join(sorted({f"{r['shape']} ({r['method']})" for r in spectrum_rows})))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
