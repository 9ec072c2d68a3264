"""`report run`: analyses of a profile in one session, each in its usual folder, the activation
passes folded, the report built; failures recorded, never presented as complete."""

import json

import pytest
from conftest import WIKITEXT, assert_one_line_error, run_cli
from tiny import save_tiny_model_dir

SMALL = ["--dataset", str(WIKITEXT), "--nsamples", "3", "--seqlen", "32", "--eval-seqlen", "32", "--max-windows", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("llama"))


def test_report_run_writes_each_analysis_folder_and_the_report(model_dir, tmp_path):
    out = tmp_path / "report"
    result = run_cli("report", "run", "--model", model_dir, *SMALL, "--only", "eval.perplexity",
                     "--only", "weights.stats", "--only", "activations.kurtosis", "--only", "activations.magnitude",
                     "--set", "weights.stats.zero_tol=0.001", "--out", out, "--quiet")
    assert result.code == 0, result
    for folder in ("eval-perplexity", "weights-stats", "activations-kurtosis", "activations-magnitude"):
        manifest = json.loads((out / folder / "manifest.json").read_text())
        assert manifest["status"] == "complete"
    assert json.loads((out / "weights-stats" / "manifest.json").read_text())["options"]["zero_tol"] == 0.001
    runs = {row["analysis"]: row for row in json.loads((out / "report_runs.json").read_text())}
    assert runs["activations.kurtosis"]["shared_pass"] and runs["activations.magnitude"]["shared_pass"]
    assert not runs["weights.stats"]["shared_pass"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["shared_passes"] == 1
    html = (out / "report.html").read_text()
    assert "Perplexity" in html and (out / "report.md").is_file()
    assert "report.html" in result.stdout


def test_the_same_folders_come_from_python(model_dir, tmp_path):
    import llmprobe

    result = llmprobe.run("report.run", model=str(model_dir), dataset=str(WIKITEXT), nsamples=2, seqlen=32,
                          only=["activations.kurtosis"], out=tmp_path / "r")
    assert [row.status for row in result["report_runs"]] == ["complete"]
    assert (tmp_path / "r" / "activations-kurtosis" / "kurtosis_layers.csv").is_file()


@pytest.mark.parametrize(("args", "needle"), [
    (["--only", "activations.kurtosiss"], "did you mean"),
    (["--only", "activations.prompt"], "not an analysis of report run"),
    (["--set", "weights.stats.nope=1"], "has no option 'nope'"),
    (["--set", "weights.stats"], "ANALYSIS.OPTION=VALUE"),
    (["--set", "weights.stats.zero_tol=-1"], "--zero-tol"),
    (["--profile", "huge"], "--profile"),
])
def test_bad_input_is_refused_before_anything_is_written(model_dir, tmp_path, args, needle):
    out = tmp_path / "never"
    assert_one_line_error(run_cli("report", "run", "--model", model_dir, *SMALL, *args, "--out", out), needle)
    assert not out.exists()


def test_a_failing_analysis_is_recorded_and_the_run_is_not_complete(model_dir, tmp_path):
    out = tmp_path / "report"
    result = run_cli("report", "run", "--model", model_dir, *SMALL, "--only", "activations.kurtosis",
                     "--only", "activations.quant-error", "--set", "activations.quant-error.granularity=per-group",
                     "--set", "activations.quant-error.group_size=7", "--out", out, "--quiet")
    assert result.code == 1, result
    assert "1 of 2 analyses failed: activations.quant-error" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert json.loads((out / "activations-kurtosis" / "manifest.json").read_text())["status"] == "complete"
    assert (out / "report.html").is_file()


def test_report_build_and_diff_commands(model_dir, tmp_path):
    base = tmp_path / "base"
    assert run_cli("report", "run", "--model", model_dir, *SMALL, "--only", "activations.kurtosis", "--only",
                   "weights.stats", "--out", base, "--quiet").code == 0
    other = tmp_path / "other"
    assert run_cli("report", "run", "--model", model_dir, *SMALL, "--only", "activations.kurtosis", "--only",
                   "weights.stats", "--set", "activations.kurtosis.rotate=hadamard", "--out", other,
                   "--quiet").code == 0
    rebuilt = tmp_path / "rebuilt"
    result = run_cli("report", "build", base, "--out", rebuilt, "--title", "again")
    assert result.code == 0, result
    assert "again" in (rebuilt / "report.html").read_text()
    diff = tmp_path / "diff"
    result = run_cli("report", "diff", base, other, "--out", diff, "--labels", "plain,rotated")
    assert result.code == 0, result
    assert (diff / "diff.html").is_file() and (diff / "diff.md").is_file()
    assert_one_line_error(run_cli("report", "diff", base, other, "--labels", "one"), "--labels")
    assert_one_line_error(run_cli("report", "build", tmp_path / "nothing-here"), "is not a folder")
