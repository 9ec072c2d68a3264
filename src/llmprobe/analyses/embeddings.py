"""K-means clustering of a token-embedding matrix: ``weights embeddings`` (seed 003).

What is computed, exactly:

1. **Standardize.** Each row of the matrix is one token. Every *feature column* is z-scored over
   all tokens, ``z[:, j] = (w[:, j] − mean_j) / std_j`` with the population std (ddof=0; a
   constant column is only centred) — scikit-learn's ``StandardScaler``, whose mean and variance
   accumulate in fp64 even for fp32 input. Rows are *not* scaled to unit norm: a token's norm is
   part of what separates rarely-trained tokens from the rest. All distances, centroids, inertias
   and scores below are in this standardized space.
2. **Scan k on a sample.** k-means (scikit-learn ``KMeans``, k-means++ init, one init per k,
   seeded) is fit for each k of a coarse geometric grid 2 … ``max_k`` (ratio ~1.5, both ends
   included), then for every k between the best coarse k and its coarse neighbours (at most
   ``FINE_MAX_EACH_SIDE`` on each side). The fits use ``fit_sample`` rows drawn at random
   (seeded): fitting all 49k×576 rows for every k is what makes the seed slow. On the embedded
   model 5000 and 10000 rows give the same F-vs-k shape (F itself grows with n, so the sample's
   F is not comparable with the all-row F). With fewer rows than the sample, every row is used.
3. **Pick k by the variance-ratio criterion.** F(k) = [B/(k−1)] / [W/(n−k)], B and W the between-
   and within-cluster sums of squares: the Calinski–Harabasz index, which is the one-way ANOVA F
   statistic of the clustering (what the seed calls "ANOVA"). The k with the largest F on the fit
   sample wins (ties go to the smaller k).
4. **Refit on all rows.** The chosen k is refit on every row, started from the sample centroids,
   so every token gets a label. F and inertia are then reported again on all rows.
5. **Silhouette** (euclidean) on ``silhouette_sample`` random rows (seeded, a subset of the fit
   sample, so it is a uniform sample of all rows): for every scanned k from its sample labels, and
   for the final clustering from the all-row labels. One distance matrix serves every k.
6. **Clusters.** Per cluster: size, centroid norm (= distance from the mean token, since the
   standardized data has mean zero), mean/max distance of its members to the centroid, mean raw
   row norm, mean silhouette of its sampled rows, and the ``n_representatives`` *members* nearest
   to the centroid, decoded with the tokenizer when one is given.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..core import progress
from ..core.devices import usable_cores
from ..core.errors import LLMProbeError
from ..core.records import Record

CRITERION = "calinski_harabasz"  # = one-way ANOVA F of the clustering (seed 003's "ANOVA")
STANDARDIZATION = "zscore_per_feature_column"
COARSE_RATIO = 1.5
FINE_MAX_EACH_SIDE = 10
SCAN_MAX_ITER = 100    # Lloyd iterations per scan fit; sample fits converge well before this
REFIT_MAX_ITER = 100   # the all-row refit starts from converged sample centroids
DEFAULT_MAX_K = 100
DEFAULT_FIT_SAMPLE = 5_000
DEFAULT_SILHOUETTE_SAMPLE = 2_000
DEFAULT_REPRESENTATIVES = 10
# Names of token-embedding tensors, used only when the module map cannot be built.
_EMBED_NAME_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "token_embd")


# --------------------------------------------------------------------------------------------
# records


class EmbeddingKScore(Record):
    """Scores of one k of the scan (fit sample)."""

    k: int
    stage: str                     # coarse | fine
    calinski_harabasz: float       # F = between/within variance ratio (one-way ANOVA F)
    inertia: float                 # within-cluster sum of squared distances on the fit sample
    silhouette: float | None       # mean silhouette on the silhouette sample; None if not computed
    iterations: int                # Lloyd iterations k-means ran
    chosen: bool


class EmbeddingCluster(Record):
    """One cluster of the final (all-row) clustering."""

    cluster: int
    size: int
    fraction: float
    centroid_norm: float           # ||centroid||, standardized space = distance from the mean token
    mean_distance: float           # mean euclidean distance of members to the centroid
    max_distance: float
    mean_raw_norm: float           # mean L2 norm of the members' rows as stored (not standardized)
    silhouette: float | None       # mean silhouette of the cluster's rows in the silhouette sample
    representative_ids: list[int]  # members nearest to the centroid, nearest first
    representative_distances: list[float]
    representative_tokens: list[str | None] | None  # decoded text; None without a tokenizer


class EmbeddingSummary(Record):
    """The clustering as a whole."""

    tensor: str
    rows: int
    dims: int
    standardization: str
    criterion: str
    max_k: int
    fit_rows: int
    k_evaluated: int
    chosen_k: int
    calinski_harabasz: float       # F of the final clustering on all rows
    calinski_harabasz_fit: float   # F of the chosen k on the fit sample (what chose it)
    inertia: float                 # final clustering, all rows
    silhouette: float | None       # final clustering, silhouette sample
    silhouette_rows: int
    seed: int
    seconds: float


@dataclass
class EmbeddingResult:
    scan: list[EmbeddingKScore]
    clusters: list[EmbeddingCluster]
    summary: EmbeddingSummary
    # Arrays behind the tables, for callers who want to go further (and for tests).
    standardized: np.ndarray       # rows × dims, float32
    labels: np.ndarray             # final cluster of every row
    centroids: np.ndarray          # chosen_k × dims, standardized space
    fit_rows: np.ndarray           # row indices of the fit sample
    silhouette_rows: np.ndarray    # row indices of the silhouette sample (a prefix of fit_rows)
    scan_labels: dict[int, np.ndarray] = field(default_factory=dict)  # k -> labels of fit_rows

    def tables(self) -> dict[str, list[Record]]:
        return {"embedding_k_scan": list(self.scan), "embedding_clusters": list(self.clusters),
                "embedding_summary": [self.summary]}

    def clustering_results(self) -> dict:
        """Seed-003 ``clustering_results.json``: its keys first, then llmprobe's additions."""
        ordered = sorted(self.scan, key=lambda r: r.k)
        fine = [r for r in ordered if r.stage == "fine"]
        return {
            "optimal_k": self.summary.chosen_k,
            "k_values": [r.k for r in ordered],
            "f_ratios": [r.calinski_harabasz for r in ordered],
            "fine_k_values": [r.k for r in fine],
            "fine_f_ratios": [r.calinski_harabasz for r in fine],
            "cluster_labels": self.labels.tolist(),
            "cluster_centers": self.centroids.tolist(),
            "inertia": self.summary.inertia,
            "silhouette_score": self.summary.silhouette,
            "total_tokens": self.summary.rows,
            "embedding_dimension": self.summary.dims,
            "criterion": CRITERION,
            "standardization": STANDARDIZATION,
            "tensor": self.summary.tensor,
            "coarse_k_values": [r.k for r in ordered if r.stage == "coarse"],
            "inertias": [r.inertia for r in ordered],
            "silhouette_scores": [r.silhouette for r in ordered],
            "f_ratio_all_rows": self.summary.calinski_harabasz,
            "fit_rows": self.summary.fit_rows,
            "silhouette_rows": self.summary.silhouette_rows,
            "seed": self.summary.seed,
        }

    def representatives(self) -> dict:
        """Seed-003 ``cluster_representatives.json``: cluster id -> its nearest member tokens."""
        out = {}
        for row in self.clusters:
            tokens = row.representative_tokens
            out[str(row.cluster)] = {
                "size": row.size,
                "percentage": 100.0 * row.fraction,
                "token_indices": row.representative_ids,
                "distances": row.representative_distances,
                "tokens": tokens,
                "representative_text": None if tokens is None else "".join(t or "" for t in tokens),
                "silhouette_score": row.silhouette,
            }
        return out


# --------------------------------------------------------------------------------------------
# pieces


def standardize(matrix) -> np.ndarray:
    """Z-score every feature column over the rows (StandardScaler), as float32."""
    from sklearn.preprocessing import StandardScaler

    values = np.array(matrix, dtype=np.float32, copy=True)
    if not np.isfinite(values).all():
        raise LLMProbeError("the embedding matrix holds NaN or Inf values; k-means needs finite rows")
    return StandardScaler(copy=False).fit_transform(values)


def coarse_k_grid(max_k: int, ratio: float = COARSE_RATIO) -> list[int]:
    """2, then ×ratio (rounded) up to max_k, max_k included: dense where k is small."""
    ks = {2, max_k}
    value = 2.0
    while value < max_k:
        value *= ratio
        ks.add(min(max_k, max(2, round(value))))
    return sorted(ks)


def fine_k_grid(coarse: list[int], best: int, max_each_side: int = FINE_MAX_EACH_SIDE) -> list[int]:
    """Every k strictly between the best coarse k's coarse neighbours, at most max_each_side per side."""
    at = coarse.index(best)
    low = coarse[at - 1] if at > 0 else best
    high = coarse[at + 1] if at + 1 < len(coarse) else best
    left = range(max(low + 1, best - max_each_side), best)
    right = range(best + 1, min(high - 1, best + max_each_side) + 1)
    return [*left, *right]


def _kmeans(k: int, seed: int, max_iter: int, init="k-means++"):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, init=init, n_init=1, max_iter=max_iter, random_state=seed)


def _fit(model, data: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    # Duplicate rows (padding tokens share one vector) make k-means find fewer distinct clusters
    # than asked; that is a fact about the data, reported through F, not a warning to print.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(data)


def _variance_ratio(data: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import calinski_harabasz_score

    if len(np.unique(labels)) < 2:
        return math.nan  # F needs at least two non-empty clusters
    return float(calinski_harabasz_score(data, labels))


def _silhouette_values(distances: np.ndarray | None, labels: np.ndarray) -> np.ndarray | None:
    from sklearn.metrics import silhouette_samples

    if distances is None:
        return None
    found = len(np.unique(labels))
    if found < 2 or found > len(labels) - 1:
        return None  # silhouette is defined for 2 <= clusters <= rows - 1 only
    return silhouette_samples(distances, labels, metric="precomputed")


def _decode(tokenizer, token_ids: list[int]) -> list[str | None]:
    size = len(tokenizer)
    texts: list[str | None] = []
    for token_id in token_ids:
        # Embedding matrices are often padded past the tokenizer's vocabulary: no text there.
        if token_id >= size:
            texts.append(None)
            continue
        try:
            texts.append(tokenizer.decode([token_id], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False))
        except (ValueError, TypeError, KeyError, IndexError, OverflowError):
            # An id the tokenizer has no piece for (holes in some vocabularies) must not end the run.
            texts.append(None)
    return texts


# --------------------------------------------------------------------------------------------
# the analysis


def cluster_rows(matrix, *, tensor: str = "matrix", max_k: int = DEFAULT_MAX_K,
                 fit_sample: int = DEFAULT_FIT_SAMPLE, silhouette_sample: int = DEFAULT_SILHOUETTE_SAMPLE,
                 seed: int = 0, tokenizer=None, n_representatives: int = DEFAULT_REPRESENTATIVES,
                 started: float | None = None) -> EmbeddingResult:
    """Cluster the rows of a 2-D matrix (tokens × features); see the module docstring."""
    from threadpoolctl import threadpool_limits

    # scikit-learn's k-means already runs its row chunks in parallel (OpenMP); letting BLAS start
    # its own threads inside each chunk oversubscribes the cores. On a busy 2-core machine that
    # made one k-means fit 6-10x slower (measured), so BLAS stays single-threaded in here. OpenMP
    # threads spin while they wait for each other, so they get only the cores that are idle.
    with threadpool_limits(limits=1, user_api="blas"), threadpool_limits(limits=_idle_cores(), user_api="openmp"):
        return _cluster_rows(matrix, tensor=tensor, max_k=max_k, fit_sample=fit_sample,
                             silhouette_sample=silhouette_sample, seed=seed, tokenizer=tokenizer,
                             n_representatives=n_representatives,
                             started=time.perf_counter() if started is None else started)


def _idle_cores() -> int:
    """Cores not already busy (CPU count minus the 1-minute load average), at least one."""
    cores = usable_cores()
    try:
        busy = math.floor(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform: assume an idle machine
        busy = 0
    return max(1, cores - busy)


def _cluster_rows(matrix, *, tensor: str, max_k: int, fit_sample: int, silhouette_sample: int, seed: int,
                  tokenizer, n_representatives: int, started: float) -> EmbeddingResult:
    raw = np.asarray(matrix)
    if raw.ndim != 2:
        raise LLMProbeError(f"{tensor} has shape {tuple(raw.shape)}; embedding clustering needs a 2-D matrix")
    rows, dims = raw.shape
    if fit_sample < 3:
        raise LLMProbeError(f"--fit-sample must be at least 3; got {fit_sample}")
    if silhouette_sample < 0 or n_representatives < 0:
        raise LLMProbeError("--silhouette-sample and --representatives must not be negative")
    check_max_k(max_k, rows, fit_sample, tensor)

    data = standardize(raw)
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows)
    fit_rows = np.sort(order[:fit_sample]) if fit_sample < rows else np.arange(rows)
    fit_data = data[fit_rows]
    # Scores in fp64 on the sample (cheap: fit_sample rows) so F and silhouette do not carry
    # fp32 rounding of large sums; k-means itself runs in fp32 for speed.
    fit_data64 = fit_data.astype(np.float64)

    # The silhouette sample is a random subset of the fit sample, so the same rows serve every
    # scanned k (from its sample labels) and the final clustering (from its all-row labels).
    sil_positions = rng.permutation(len(fit_rows))[:min(silhouette_sample, len(fit_rows))]
    sil_positions.sort()
    silhouette_rows = fit_rows[sil_positions]
    distances = None
    if len(sil_positions) >= 3:
        from sklearn.metrics import pairwise_distances

        distances = pairwise_distances(fit_data64[sil_positions])

    scores: dict[int, EmbeddingKScore] = {}
    models: dict[int, object] = {}
    scan_labels: dict[int, np.ndarray] = {}

    def scan(ks: list[int], stage: str) -> None:
        for k in progress.track(ks, f"k-means scan ({stage})"):
            model = _fit(_kmeans(k, seed, SCAN_MAX_ITER), fit_data)
            labels = model.labels_.astype(np.int64)
            sil = _silhouette_values(distances, labels[sil_positions])
            scores[k] = EmbeddingKScore(
                k=k, stage=stage, calinski_harabasz=_variance_ratio(fit_data64, labels),
                inertia=float(model.inertia_), silhouette=None if sil is None else float(sil.mean()),
                iterations=int(model.n_iter_), chosen=False)
            models[k] = model
            scan_labels[k] = labels

    def best(ks) -> int:
        # NaN F (a degenerate fit) never wins; ties go to the smaller k.
        finite = [k for k in sorted(ks) if math.isfinite(scores[k].calinski_harabasz)]
        if not finite:
            raise LLMProbeError(f"k-means found fewer than two distinct clusters in {tensor} for every k;"
                                f" the rows are (nearly) all identical")
        return max(finite, key=lambda k: (scores[k].calinski_harabasz, -k))

    coarse = coarse_k_grid(max_k)
    scan(coarse, "coarse")
    scan([k for k in fine_k_grid(coarse, best(coarse)) if k not in scores], "fine")
    chosen = best(scores)
    scores[chosen] = scores[chosen].model_copy(update={"chosen": True})

    if len(fit_rows) == rows:
        final = models[chosen]
    else:
        progress.info(f"refitting k={chosen} on all {rows} rows")
        final = _fit(_kmeans(chosen, seed, REFIT_MAX_ITER, init=models[chosen].cluster_centers_), data)
    labels = final.labels_.astype(np.int64)
    centroids = np.asarray(final.cluster_centers_, dtype=np.float32)
    final_sil = _silhouette_values(distances, labels[silhouette_rows])

    clusters = _cluster_table(raw, data, labels, centroids, silhouette_rows, final_sil, tokenizer,
                             n_representatives)
    summary = EmbeddingSummary(
        tensor=tensor, rows=rows, dims=dims, standardization=STANDARDIZATION, criterion=CRITERION,
        max_k=max_k, fit_rows=len(fit_rows), k_evaluated=len(scores), chosen_k=chosen,
        calinski_harabasz=_variance_ratio(data, labels),
        calinski_harabasz_fit=scores[chosen].calinski_harabasz,
        inertia=float(final.inertia_), silhouette=None if final_sil is None else float(final_sil.mean()),
        silhouette_rows=len(silhouette_rows), seed=seed, seconds=time.perf_counter() - started)
    return EmbeddingResult(scan=[scores[k] for k in sorted(scores)], clusters=clusters, summary=summary,
                           standardized=data, labels=labels, centroids=centroids, fit_rows=fit_rows,
                           silhouette_rows=silhouette_rows, scan_labels=scan_labels)


def check_max_k(max_k: int, rows: int, fit_sample: int, tensor: str) -> None:
    """k-means and F need k below the number of rows clustered (F divides by n − k)."""
    if max_k < 2:
        raise LLMProbeError(f"--max-k must be at least 2 (the variance ratio needs two clusters); got {max_k}")
    clustered = min(rows, fit_sample)
    if max_k > clustered - 1:
        raise LLMProbeError(f"--max-k {max_k} must be below the number of rows clustered ({clustered} of "
                            f"{tensor}); lower --max-k or raise --fit-sample")


def _cluster_table(raw: np.ndarray, data: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                   silhouette_rows: np.ndarray, silhouette_values: np.ndarray | None, tokenizer,
                   n_representatives: int) -> list[EmbeddingCluster]:
    rows = len(labels)
    sil_by_cluster = {}
    if silhouette_values is not None:
        sample_labels = labels[silhouette_rows]
        for cluster in np.unique(sample_labels):
            sil_by_cluster[int(cluster)] = float(silhouette_values[sample_labels == cluster].mean())
    out = []
    for cluster in range(len(centroids)):
        members = np.flatnonzero(labels == cluster)
        if len(members) == 0:
            continue  # k-means can leave a cluster empty on degenerate data: no row to report
        # fp64 copies of one cluster's members at a time, never of the whole matrix.
        centroid = centroids[cluster].astype(np.float64)
        dist = np.linalg.norm(data[members].astype(np.float64) - centroid, axis=1)
        raw_norms = np.linalg.norm(raw[members].astype(np.float64), axis=1)
        nearest = np.argsort(dist, kind="stable")[:n_representatives]
        ids = [int(i) for i in members[nearest]]
        out.append(EmbeddingCluster(
            cluster=cluster, size=len(members), fraction=len(members) / rows,
            centroid_norm=float(np.linalg.norm(centroid)), mean_distance=float(dist.mean()),
            max_distance=float(dist.max()), mean_raw_norm=float(raw_norms.mean()),
            silhouette=sil_by_cluster.get(cluster),
            representative_ids=ids, representative_distances=[float(d) for d in dist[nearest]],
            representative_tokens=None if tokenizer is None else _decode(tokenizer, ids)))
    return out


def find_embedding_tensor(ws, tensor: str | None = None) -> tuple[str, str]:
    """(name, role) of the matrix to cluster: ``tensor`` if given (must be 2-D), else the
    token-embedding matrix (role ``embed`` with the most rows, so position embeddings lose)."""
    names = ws.names()
    if tensor is not None:
        if tensor not in names:
            matrices = [n for n in names if len(ws.shape(n)) == 2]
            sample = ", ".join(matrices[:5]) + (", ..." if len(matrices) > 5 else "")
            raise LLMProbeError(f"no tensor named '{tensor}' in this model; 2-D tensors look like: {sample}")
        shape = ws.shape(tensor)
        if len(shape) != 2:
            raise LLMProbeError(f"tensor '{tensor}' has shape {tuple(shape)}; --tensor must name a 2-D matrix")
        return tensor, _role_of(ws, tensor)
    matrices = [n for n in names if len(ws.shape(n)) == 2]
    try:
        embeds = [n for n in matrices if ws.module_map.param_info(n)[1] == "embed"]
    except LLMProbeError:
        # No module map for this architecture: fall back to the usual embedding names.
        embeds = [n for n in matrices if any(hint in n for hint in _EMBED_NAME_HINTS)]
    if not embeds:
        raise LLMProbeError("found no token-embedding matrix in this model; pass --tensor NAME")
    name = max(embeds, key=lambda n: ws.shape(n)[0])
    return name, "embed"


def _role_of(ws, name: str) -> str:
    try:
        return ws.module_map.param_info(name)[1]
    except LLMProbeError:
        return "other"


def embedding_clusters(ws, tensor: str | None = None, max_k: int = DEFAULT_MAX_K,
                       fit_sample: int = DEFAULT_FIT_SAMPLE, silhouette_sample: int = DEFAULT_SILHOUETTE_SAMPLE,
                       seed: int = 0, tokenizer=None,
                       n_representatives: int = DEFAULT_REPRESENTATIVES) -> EmbeddingResult:
    """Cluster a weight source's token embeddings (or ``tensor``); see the module docstring.

    ``tokenizer`` decodes the representative rows' ids; pass it only when rows are token ids.
    """
    started = time.perf_counter()
    name, _ = find_embedding_tensor(ws, tensor)
    check_max_k(max_k, ws.shape(name)[0], fit_sample, name)  # before reading a large tensor
    weight = ws.get(name).detach().float().cpu().numpy()
    return cluster_rows(weight, tensor=name, max_k=max_k, fit_sample=fit_sample,
                        silhouette_sample=silhouette_sample, seed=seed, tokenizer=tokenizer,
                        n_representatives=n_representatives, started=started)


# -- registered analysis (declared in llmprobe.catalog.weights) -------------------------------

# Rows of these roles are token ids, so their nearest rows can be decoded to text.
_TOKEN_ROW_ROLES = ("embed", "lm_head")


def prepare_job(job):
    o, ws = job.options, job.weights
    name, role = find_embedding_tensor(ws, o.tensor)
    check_max_k(o.max_k, ws.shape(name)[0], o.fit_sample, name)
    job.state.update(tensor=name, tokenizer=_tokenizer_for(ws, role))


def embeddings_job(job):
    from ..session import Result

    o, ws, name = job.options, job.weights, job.state["tensor"]
    progress.info(f"clustering {name} {tuple(ws.shape(name))}")
    result = embedding_clusters(ws, tensor=name, max_k=o.max_k, fit_sample=o.fit_sample,
                                silhouette_sample=o.silhouette_sample, seed=o.seed, tokenizer=job.state["tokenizer"],
                                n_representatives=o.representatives)
    return Result(tables=result.tables(),
                  documents={"clustering_results": result.clustering_results(),
                             "cluster_representatives": result.representatives()},
                  manifest={"tensor": name, "weight_source": ws.kind, "bytes_on_disk": ws.bytes_on_disk()},
                  data={"embedding": result, "has_tokenizer": job.state["tokenizer"] is not None})


def _tokenizer_for(ws, role: str):
    """The model's tokenizer when the rows are token ids; None (ids only) otherwise or when the
    model ships no usable tokenizer."""
    from ..core.loading import load_tokenizer

    if role not in _TOKEN_ROW_ROLES or ws.source is None:
        return None
    try:
        return load_tokenizer(ws.source)
    except LLMProbeError as exc:
        progress.info(f"[yellow]no tokenizer, representatives are listed by id only[/]: {exc}")
        return None
