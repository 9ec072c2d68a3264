"""`weights embeddings`: standardization, the k scan and its F criterion, silhouette,
representatives and decoding against independent numpy/scikit-learn references; the CLI on a tiny
model and (slow) on the embedded SmolLM2."""

import json

import numpy as np
import pytest
from conftest import assert_one_line_error
from sklearn.metrics import calinski_harabasz_score, silhouette_score
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

from llmprobe.analyses.embeddings import (
    cluster_rows,
    coarse_k_grid,
    find_embedding_tensor,
    fine_k_grid,
    standardize,
)
from llmprobe.core.errors import LLMProbeError
from llmprobe.core.weightsource import WeightSource

TRUE_K = 5


def _blobs(rows=600, dims=8, k=TRUE_K, seed=3):
    """Well-separated Gaussian blobs (centres ~±10 apart per axis, unit spread), rows shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, size=(k, dims))
    truth = rng.integers(0, k, size=rows)
    points = centres[truth] + rng.standard_normal((rows, dims))
    # Columns on very different scales: standardization must undo it before k-means.
    return points * np.geomspace(0.01, 100, dims), truth


@pytest.fixture(scope="module")
def blob_result():
    points, truth = _blobs()
    # fit_sample < rows exercises the sample scan + all-row refit path.
    result = cluster_rows(points, max_k=12, fit_sample=400, silhouette_sample=250, seed=0, n_representatives=4)
    return points, truth, result


def _numpy_variance_ratio(data, labels):
    """F = [B/(k−1)] / [W/(n−k)] written out, independent of scikit-learn."""
    data = np.asarray(data, dtype=np.float64)
    grand = data.mean(axis=0)
    clusters = np.unique(labels)
    between = sum((labels == c).sum() * np.sum((data[labels == c].mean(axis=0) - grand) ** 2) for c in clusters)
    within = sum(np.sum((data[labels == c] - data[labels == c].mean(axis=0)) ** 2) for c in clusters)
    k, n = len(clusters), len(data)
    return (between / (k - 1)) / (within / (n - k))


def test_standardize_is_a_per_column_zscore():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((300, 6)) * [1e-3, 1, 5, 50, 2, 1] + [0, 3, -2, 100, 0, 0]
    matrix[:, 5] = 7.0  # a constant column is only centred
    expected = (matrix - matrix.mean(axis=0)) / np.where(matrix.std(axis=0) > 0, matrix.std(axis=0), 1.0)
    got = standardize(matrix)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(got[:, 5], 0.0)


def test_k_grids():
    assert coarse_k_grid(100) == [2, 3, 4, 7, 10, 15, 23, 34, 51, 77, 100]
    assert coarse_k_grid(2) == [2]
    assert coarse_k_grid(8)[-1] == 8
    coarse = coarse_k_grid(100)
    assert fine_k_grid(coarse, 10) == [8, 9, 11, 12, 13, 14]
    assert fine_k_grid(coarse, 2) == []
    assert fine_k_grid(coarse, 77, max_each_side=3) == [74, 75, 76, 78, 79, 80]


def test_blobs_give_the_true_k(blob_result):
    points, truth, result = blob_result
    assert result.summary.chosen_k == TRUE_K
    assert [r.k for r in result.scan if r.chosen] == [TRUE_K]
    assert {r.stage for r in result.scan} == {"coarse", "fine"}
    # Every blob is one cluster: the final labels are the truth up to renaming.
    pairs = set(zip(truth.tolist(), result.labels.tolist()))
    assert len(pairs) == TRUE_K
    assert sum(c.size for c in result.clusters) == len(points)


def test_variance_ratio_matches_sklearn_and_numpy(blob_result):
    _, _, result = blob_result
    fit_data = result.standardized[result.fit_rows].astype(np.float64)
    for row in result.scan:
        labels = result.scan_labels[row.k]
        assert row.calinski_harabasz == pytest.approx(calinski_harabasz_score(fit_data, labels), rel=1e-9)
        assert row.calinski_harabasz == pytest.approx(_numpy_variance_ratio(fit_data, labels), rel=1e-6)
    # The summary F is the final clustering over every row.
    assert result.summary.calinski_harabasz == pytest.approx(
        _numpy_variance_ratio(result.standardized, result.labels), rel=1e-4)
    best = max(result.scan, key=lambda r: r.calinski_harabasz)
    assert best.k == result.summary.chosen_k


def test_silhouette_matches_sklearn_on_the_same_sample(blob_result):
    _, _, result = blob_result
    rows = result.silhouette_rows
    assert len(rows) == result.summary.silhouette_rows == 250
    assert set(rows) <= set(result.fit_rows)
    expected = silhouette_score(result.standardized[rows].astype(np.float64), result.labels[rows])
    assert result.summary.silhouette == pytest.approx(expected, abs=1e-9)
    positions = np.searchsorted(result.fit_rows, rows)
    for row in result.scan:
        expected = silhouette_score(result.standardized[rows].astype(np.float64), result.scan_labels[row.k][positions])
        assert row.silhouette == pytest.approx(expected, abs=1e-9)


def test_representatives_are_the_members_nearest_the_centroid(blob_result):
    _, _, result = blob_result
    for cluster in result.clusters:
        members = np.flatnonzero(result.labels == cluster.cluster)
        dist = np.sqrt(((result.standardized[members].astype(np.float64)
                         - result.centroids[cluster.cluster].astype(np.float64)) ** 2).sum(axis=1))
        order = np.argsort(dist, kind="stable")[:4]
        assert cluster.representative_ids == members[order].tolist()
        np.testing.assert_allclose(cluster.representative_distances, dist[order], rtol=1e-9)
        assert cluster.mean_distance == pytest.approx(dist.mean())
        assert cluster.size == len(members)
        assert cluster.representative_tokens is None  # no tokenizer given


def test_seed_compatible_json(blob_result):
    _, _, result = blob_result
    seed = result.clustering_results()
    assert seed["optimal_k"] == TRUE_K
    assert seed["k_values"] == sorted(r.k for r in result.scan)
    assert len(seed["f_ratios"]) == len(seed["k_values"])
    assert len(seed["cluster_labels"]) == 600 and len(seed["cluster_centers"]) == TRUE_K
    reps = result.representatives()
    assert sorted(reps, key=int) == [str(c.cluster) for c in result.clusters]
    assert sum(v["percentage"] for v in reps.values()) == pytest.approx(100.0)


def test_decoding_uses_the_tokenizer_and_skips_rows_past_the_vocab():
    tokenizer = tiny_tokenizer()
    matrix = np.random.default_rng(1).standard_normal((len(tokenizer) + 8, 6))
    result = cluster_rows(matrix, max_k=3, silhouette_sample=0, n_representatives=len(matrix))
    assert result.summary.silhouette is None
    assert all(cluster.representative_tokens is None for cluster in result.clusters)  # no tokenizer, no text
    result = cluster_rows(matrix, max_k=3, silhouette_sample=0, tokenizer=tokenizer, n_representatives=len(matrix))
    for cluster in result.clusters:
        for token_id, text in zip(cluster.representative_ids, cluster.representative_tokens):
            expected = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert text == (expected if token_id < len(tokenizer) else None)


def test_token_embedding_is_found_and_position_embedding_is_not():
    ws = WeightSource.from_model(tiny_model("gpt2"))
    name, role = find_embedding_tensor(ws)
    assert name.endswith("wte.weight") and role == "embed"
    with pytest.raises(LLMProbeError, match="2-D"):
        find_embedding_tensor(ws, "transformer.ln_f.weight")
    with pytest.raises(LLMProbeError, match="no tensor named"):
        find_embedding_tensor(ws, "nope.weight")


def test_library_rejects_bad_k():
    with pytest.raises(LLMProbeError, match="--max-k"):
        cluster_rows(np.zeros((10, 3)), max_k=1)
    with pytest.raises(LLMProbeError, match="below the number of rows"):
        cluster_rows(np.random.default_rng(0).standard_normal((10, 3)), max_k=10)


# -- CLI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("tiny-llama"))


def test_cli_on_a_tiny_model(cli, tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("weights", "embeddings", "--model", tiny_dir, "--max-k", "6", "--silhouette-sample", "100",
                 "--representatives", "3", "--out", out, "--plot", "--quiet", "--json")
    assert result.code == 0, result
    clusters = json.loads(result.stdout)
    summary = json.loads((out / "embedding_summary.json").read_text())[0]
    assert summary["tensor"] == "model.embed_tokens.weight"
    assert (summary["rows"], summary["dims"]) == (512, 32)
    assert len(clusters) == summary["chosen_k"]
    assert sum(c["size"] for c in clusters) == 512
    assert all(len(c["representative_tokens"]) == 3 and all(isinstance(t, str) for t in c["representative_tokens"])
               for c in clusters)
    seed = json.loads((out / "clustering_results.json").read_text())
    assert seed["optimal_k"] == summary["chosen_k"] and seed["k_values"][-1] == 6
    reps = json.loads((out / "cluster_representatives.json").read_text())
    assert len(reps) == len(clusters)
    for name in ("embedding_k_scan.csv", "embedding_clusters.csv", "embedding_summary.csv", "anova_curve.png",
                 "cluster_sizes.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("args, needle", [
    (("--max-k", "1"), "--max-k"),
    (("--max-k", "600"), "below the number of rows"),
    (("--tensor", "model.norm.weight"), "2-D"),
    (("--tensor", "model.missing.weight"), "no tensor named"),
    (("--plot-format", "gif"), "plot-format"),
])
def test_cli_bad_input(cli, tiny_dir, tmp_path, args, needle):
    out = tmp_path / "run"
    result = cli("weights", "embeddings", "--model", tiny_dir, "--out", out, *args)
    assert_one_line_error(result, needle)
    assert not out.exists()  # refused before anything was written


def test_cli_unknown_model(cli, tmp_path):
    result = cli("weights", "embeddings", "--model", str(tmp_path / "no-such-model"), "--out", tmp_path / "run")
    assert_one_line_error(result, "no model")


@pytest.mark.slow
def test_embedded_model_end_to_end(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("weights", "embeddings", "--max-k", "12", "--fit-sample", "3000", "--silhouette-sample", "1000",
                 "--representatives", "5", "--out", out, "--quiet")
    assert result.code == 0, result
    summary = json.loads((out / "embedding_summary.json").read_text())[0]
    assert (summary["rows"], summary["dims"]) == (49152, 576)
    assert summary["fit_rows"] == 3000 and 2 <= summary["chosen_k"] <= 12
    clusters = json.loads((out / "embedding_clusters.json").read_text())
    assert sum(c["size"] for c in clusters) == 49152
    assert any(t and t.strip() for c in clusters for t in c["representative_tokens"])  # decoded text
