"""`llmprobe weights embeddings`: k-means clusters of the token-embedding matrix (seed 003).

Options are checked and the tensor resolved *before* the output directory is opened, so a bad
--max-k or a --tensor that does not exist leaves nothing behind.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..analyses.embeddings import (
    DEFAULT_FIT_SAMPLE,
    DEFAULT_MAX_K,
    DEFAULT_REPRESENTATIVES,
    DEFAULT_SILHOUETTE_SAMPLE,
    check_max_k,
    embedding_clusters,
    find_embedding_tensor,
)
from ..core import progress
from ..core.errors import LLMProbeError
from ..core.loading import load_tokenizer
from ..core.weightsource import WeightSource
from .common import (
    JsonOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PlotFormatOpt,
    PlotOpt,
    QuietOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
    check_plot_format,
    check_range,
    emit,
    emit_done,
    open_run,
    source_from,
)
from .weights import app

# Rows of these roles are token ids, so their nearest rows can be decoded to text.
_TOKEN_ROW_ROLES = ("embed", "lm_head")


@app.command("embeddings")
def embeddings_command(
    model: ModelOpt = None,
    tensor: Annotated[str | None, typer.Option(
        "--tensor", help="2-D tensor to cluster (default: the token-embedding matrix).")] = None,
    max_k: Annotated[int, typer.Option("--max-k", help="Largest k of the scan (k runs from 2).")] = DEFAULT_MAX_K,
    fit_sample: Annotated[int, typer.Option(
        "--fit-sample", help="Random rows the k scan is fit on (all rows if fewer); the chosen k is "
                             "then refit on every row.")] = DEFAULT_FIT_SAMPLE,
    silhouette_sample: Annotated[int, typer.Option(
        "--silhouette-sample", help="Random rows the silhouette is computed on (0: none).")] = DEFAULT_SILHOUETTE_SAMPLE,
    representatives: Annotated[int, typer.Option(
        "--representatives", help="Members nearest to each centroid to list.")] = DEFAULT_REPRESENTATIVES,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the row samples and the k-means inits.")] = 0,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    plot: PlotOpt = False,
    plot_format: PlotFormatOpt = "png",
) -> None:
    """K-means clusters of the standardized embedding rows; k chosen by the variance-ratio F (Calinski–Harabasz)."""
    check_range("--max-k", max_k, low=2)
    check_range("--fit-sample", fit_sample, low=3)
    check_range("--silhouette-sample", silhouette_sample, low=0)
    check_range("--representatives", representatives, low=0)
    check_plot_format(plot_format)
    if quiet:
        progress.set_quiet(True)
    source = source_from(model, revision, trust_remote_code)
    ws = WeightSource.open(source)
    name, role = find_embedding_tensor(ws, tensor)
    check_max_k(max_k, ws.shape(name)[0], fit_sample, name)
    tokenizer = _tokenizer_for(ws, role)
    with open_run("weights", "embeddings", source, out, overwrite, quiet=quiet, tensor=name, max_k=max_k,
                  fit_sample=fit_sample, silhouette_sample=silhouette_sample,
                  representatives=representatives, seed=seed) as run:
        run.update(weight_source=ws.kind, bytes_on_disk=ws.bytes_on_disk())
        progress.info(f"clustering {name} {tuple(ws.shape(name))}")
        result = embedding_clusters(ws, tensor=name, max_k=max_k, fit_sample=fit_sample,
                                    silhouette_sample=silhouette_sample, seed=seed, tokenizer=tokenizer,
                                    n_representatives=representatives)
        for table, records in result.tables().items():
            run.write_table(table, records)
        run.write_json("clustering_results.json", result.clustering_results())
        run.write_json("cluster_representatives.json", result.representatives())
        if plot:
            from ..plots.embeddings import cluster_sizes, f_curve

            run.save_figure(f_curve(result.scan, title=f"{name}: variance-ratio F vs k"), "anova_curve",
                            plot_format)
            run.save_figure(cluster_sizes(result.clusters, title=f"{name}: cluster sizes (k = "
                                                                 f"{result.summary.chosen_k})"),
                            "cluster_sizes", plot_format)
    if not json_out:
        emit([result.summary], as_json=False, title="embedding clustering",
             columns=["rows", "dims", "fit_rows", "k_evaluated", "chosen_k", "calinski_harabasz", "silhouette",
                      "seconds"])
    emit(result.clusters, as_json=json_out, title=f"clusters of {name}",
         columns=["cluster", "size", "fraction", "mean_distance", "silhouette",
                  "representative_tokens" if tokenizer is not None else "representative_ids"])
    emit_done(run, json_out)


def _tokenizer_for(ws: WeightSource, role: str):
    """The model's tokenizer when the rows are token ids; None (ids only) otherwise or when the
    model ships no usable tokenizer."""
    if role not in _TOKEN_ROW_ROLES or ws.source is None:
        return None
    try:
        return load_tokenizer(ws.source)
    except LLMProbeError as exc:
        progress.info(f"[yellow]no tokenizer, representatives are listed by id only[/]: {exc}")
        return None
