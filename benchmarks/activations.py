"""Activation collection overhead vs a bare forward pass, and peak memory vs window count.

    python benchmarks/activations.py [--windows 16] [--seqlen 512] [--rss-windows 16 64] [--device cpu]
    python benchmarks/activations.py --windows 4 --seqlen 128 --rss-windows 4 8   # quick run

Measures, in one run on the embedded model:

* bare: ``model(input_ids=window)`` over the same N windows, one window per pass, inference mode —
  the floor every forward-only statistic is compared with;
* magnitude and kurtosis (``llmprobe.analyses.activation_stats``; if that module is missing, one
  ``collect()`` pass with a moments + absmax collector stands in), and ``quant-error``
  (int4 per-token), each one pass over the windows, as a ratio to bare;
* fisher vs a bare forward + backward of the same loss with frozen parameters (the floor for any
  gradient statistic);
* peak RSS of a fresh process per measurement — loading the model + a bare pass, and loading +
  magnitude + kurtosis — at each ``--rss-windows`` count: the whole-process peak (``ru_maxrss``)
  and the peak during the pass alone (VmHWM after resetting it once the model is loaded), so the
  collectors' own memory is visible under the loader's peak. It should not grow with windows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, child_peak_rss, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def _stats_functions():
    """(magnitude, kurtosis) taking a Calibration; a plain collect() stand-in when the stats
    module is not there yet."""
    try:
        from llmprobe.analyses.activation_stats import kurtosis, magnitude

        return magnitude, kurtosis, "activation_stats"
    except ImportError:
        from llmprobe.core.collect import collect

        class MomentsAbsMax:
            def __init__(self):
                self.state = {}

            def update(self, key, batch):
                x = batch.x.double()
                sums = [x.sum(), x.square().sum(), x.pow(3).sum(), x.pow(4).sum(), x.abs().max()]
                old = self.state.get(key)
                self.state[key] = sums if old is None else [a + b for a, b in zip(old[:4], sums[:4])] + [
                    torch.maximum(old[4], sums[4])]

        def one_pass(calib):
            collect(calib.lm.model, calib.mmap, calib.sites, calib.windows, [MomentsAbsMax()],
                    token_filter=calib.token_filter)

        return one_pass, one_pass, "collect() stand-in"


def bare_forward(model, windows: torch.Tensor, batch_size: int) -> None:
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)


def bare_backward(model, windows: torch.Tensor, batch_size: int) -> None:
    """Forward + backward of the summed per-window next-token loss to the activations only."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            loss.view(ids.shape[0], -1).mean(dim=1).sum().backward()
    finally:
        hook.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timings(args) -> list[dict]:
    from llmprobe.analyses.activation_quant import fisher, quant_error
    from llmprobe.core.calibration import prepare
    from llmprobe.core.loading import load_model

    lm = load_model(None, dtype="fp32", device=args.device)
    calib = prepare(lm, dataset=args.dataset, nsamples=args.windows, seqlen=args.seqlen, seed=0)
    magnitude, kurtosis, source = _stats_functions()
    model, windows, bs = lm.model, calib.windows, args.batch_size

    def timed(fn):
        def run():
            fn()
            _sync(args.device)
        return best_of(run, args.repeats)

    bare = timed(lambda: bare_forward(model, windows, bs))
    bare_grad = timed(lambda: bare_backward(model, windows, bs))
    rows = [{"measurement": "bare forward", "seconds": bare, "ratio": 1.0, "baseline": "-"}]
    for name, fn in [("magnitude", lambda: magnitude(calib, batch_size=bs)),
                     ("kurtosis", lambda: kurtosis(calib, batch_size=bs)),
                     ("quant-error int4 per-token", lambda: quant_error(calib, batch_size=bs))]:
        seconds = timed(fn)
        rows.append({"measurement": name, "seconds": seconds, "ratio": seconds / bare, "baseline": "bare forward"})
    rows.append({"measurement": "bare forward+backward", "seconds": bare_grad, "ratio": bare_grad / bare,
                 "baseline": "bare forward"})
    seconds = timed(lambda: fisher(calib, batch_size=bs))
    rows.append({"measurement": "fisher", "seconds": seconds, "ratio": seconds / bare_grad,
                 "baseline": "bare forward+backward"})
    print(f"\nstatistics from: {source}; {args.windows} windows x {args.seqlen} tokens, batch {bs}, "
          f"device {args.device}, threads {torch.get_num_threads()}, best of {args.repeats}\n")
    return rows


_CHILD = """
import torch
{threads}
from llmprobe.core.calibration import prepare
from llmprobe.core.loading import load_model
import sys
sys.path.insert(0, {bench_dir!r})
from activations import _stats_functions, bare_forward
lm = load_model(None, dtype="fp32", device={device!r})
calib = prepare(lm, dataset={dataset!r}, nsamples={windows}, seqlen={seqlen}, seed=0)
# Loading peaks above any pass on CPU, so reset the high-water mark (Linux: clear_refs 5) and
# read VmHWM after the pass; ru_maxrss (printed by the wrapper) stays the whole-process peak.
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    resettable = True
except OSError:
    resettable = False
if {collect}:
    magnitude, kurtosis, _ = _stats_functions()
    magnitude(calib, batch_size={bs})
    kurtosis(calib, batch_size={bs})
else:
    bare_forward(lm.model, calib.windows, {bs})
if resettable:
    with open("/proc/self/status") as handle:
        hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    print("__PASS_PEAK_KIB__", hwm)
"""


def peak_rss(args) -> list[dict]:
    rows = []
    threads = f"torch.set_num_threads({args.threads})" if args.threads else ""
    for windows in args.rss_windows:
        row = {"windows": windows, "seqlen": args.seqlen}
        for label, collect_flag in (("bare", False), ("magnitude+kurtosis", True)):
            code = _CHILD.format(threads=threads, bench_dir=str(Path(__file__).parent), device=args.device,
                                 dataset=args.dataset, windows=windows, seqlen=args.seqlen, collect=collect_flag,
                                 bs=args.batch_size)
            peak, body = child_peak_rss(code, env={"LLMPROBE_PROGRESS": "0"})
            row[f"{label} process peak MiB"] = peak / 2**20
            pass_peak = [line.split()[1] for line in body.splitlines() if line.startswith("__PASS_PEAK_KIB__")]
            row[f"{label} pass peak MiB"] = int(pass_peak[0]) / 1024 if pass_peak else float("nan")
        row["pass overhead MiB"] = row["magnitude+kurtosis pass peak MiB"] - row["bare pass peak MiB"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="windows for the timing comparison")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else "wikitext2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rss-windows", type=int, nargs="*", default=[16, 64],
                        help="window counts for the peak-RSS runs (none to skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print("## Collection time vs bare forward")
    print(markdown_table(timings(args)))
    if args.rss_windows:
        print("\n## Peak RSS (fresh process each)\n")
        print(markdown_table(peak_rss(args)))


if __name__ == "__main__":
    main()
