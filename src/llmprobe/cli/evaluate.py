"""`llmprobe eval` commands."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..analyses.perplexity import check_seqlen, default_seqlen, perplexity
from ..core.data import load_corpus, tokenize_corpus
from ..core.loading import load_model
from .common import (
    DatasetOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
    emit,
    emit_done,
    open_run,
    source_from,
)

app = typer.Typer(no_args_is_help=True)


@app.command("perplexity")
def perplexity_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    seqlen: Annotated[Optional[int], typer.Option(
        "--seqlen", help="Window length in tokens (default: 2048, capped at the model's maximum).")] = None,
    stride: Annotated[Optional[int], typer.Option(
        "--stride", help="Sliding-window protocol: each window scores only its last STRIDE tokens.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 1,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Stop after N windows.")] = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity on a corpus: GPTQ/Wanda protocol (non-overlapping windows) or --stride sliding windows."""
    source = source_from(model, revision, trust_remote_code)
    corpus = load_corpus(dataset, purpose="eval")
    lm = load_model(source, dtype=dtype, device=device, device_map=device_map)
    length = check_seqlen(seqlen, lm.max_length) if seqlen is not None else default_seqlen(lm.max_length)
    ids = tokenize_corpus(corpus, lm.tokenizer)
    with open_run("eval", "perplexity", source, out, overwrite, quiet=quiet,
                  dataset={"name": corpus.name, "split": corpus.split, "sha256": corpus.sha256, "tokens": len(ids)},
                  seqlen=length, stride=stride, batch_size=batch_size, max_windows=max_windows) as run:
        run.update(model={**run.manifest["model"], **lm.manifest()})
        result = perplexity(lm, ids, seqlen=length, stride=stride, batch_size=batch_size,
                            max_windows=max_windows, dataset=corpus.name)
        run.write_table("perplexity", [result])
    emit([result], as_json=json_out, title="perplexity",
         columns=["protocol", "seqlen", "windows", "tokens", "nll_sum", "ppl", "bits_per_byte"])
    emit_done(run, json_out)
