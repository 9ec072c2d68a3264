"""The analysis contract: every registered analysis refuses every invalid option value the same
way (generated from the declarations), ``llmprobe.run`` writes what the CLI writes, and the CLI
starts without importing torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import WIKITEXT, assert_one_line_error, run_cli
from tiny import save_tiny_model_dir

from llmprobe import registry
from llmprobe.options import flag_of, is_argument


def _invalid_values(field):
    """Values that break the field's declared constraint (one per constraint kind)."""
    extra = field.json_schema_extra or {}
    integer = "int" in str(field.annotation) and "float" not in str(field.annotation)
    step = 1 if integer else 0.5
    values = []
    if "minimum" in extra:
        values.append(extra["minimum"] - step)
    if "exclusiveMinimum" in extra:
        values.append(extra["exclusiveMinimum"])
    if "maximum" in extra:
        values.append(extra["maximum"] + step)
    if "exclusiveMaximum" in extra and math.isfinite(extra["exclusiveMaximum"]):
        values.append(extra["exclusiveMaximum"])
    if "enum" in extra:
        values.append("no-such-choice")
    if extra.get("check") == "regex":
        values.append("(unclosed")
    if extra.get("check") in ("layers", "layers_or_all"):
        values.append("5-1")
    return values


def _required_values(analysis) -> list[str]:
    args = []
    for name, field in analysis.options.model_fields.items():
        if field.is_required():
            value = {"target_token": "the", "text": "The quick brown fox"}.get(name, "x")
            args += [value] if is_argument(field) else [flag_of(field), value]
    return args


CASES = [
    pytest.param(analysis.name, name, value, id=f"{analysis.name}:{name}={value}")
    for analysis in registry.analyses().values()
    for name, field in analysis.options.model_fields.items()
    for value in _invalid_values(field)
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture
def earlier_run(tmp_path):
    """A complete earlier llmprobe run that a refused run must leave byte for byte."""
    folder = tmp_path / "earlier"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"llmprobe_version": "0", "status": "complete", "files": []}))
    (folder / "table.csv").write_text("a,b\n1,2\n")
    return folder


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("analysis_name", "option_name", "value"), CASES)
def test_every_constrained_option_refuses_bad_values_before_touching_anything(analysis_name, option_name, value,
                                                                              model_dir, earlier_run, tmp_path):
    analysis = registry.get(analysis_name)
    field = analysis.options.model_fields[option_name]
    flag = flag_of(field)
    base = [*analysis.name.split("."), *_required_values(analysis)]
    if "model" in analysis.options.model_fields:
        base += ["--model", str(model_dir)]
    if "dataset" in analysis.options.model_fields and option_name != "dataset":
        base += ["--dataset", str(WIKITEXT)]
    # a fresh --out is not created
    fresh = tmp_path / "fresh"
    result = run_cli(*base, flag, str(value), "--out", str(fresh))
    assert_one_line_error(result, flag.lstrip("-").split("/")[0])
    assert not fresh.exists()
    # an earlier run asked to be replaced stays exactly as it was
    before = _snapshot(earlier_run)
    result = run_cli(*base, flag, str(value), "--out", str(earlier_run), "--overwrite")
    assert result.code == 2, result
    assert _snapshot(earlier_run) == before


def test_the_registry_covers_every_command_and_declares_help():
    names = registry.analyses()
    for expected in ("model.info", "model.layers", "eval.perplexity", "weights.stats", "weights.spectrum",
                     "weights.bops", "weights.alpha-hill", "weights.embeddings", "activations.magnitude",
                     "activations.kurtosis", "activations.token-kurtosis", "activations.down-proj-spikes",
                     "activations.token-occurrence", "activations.prompt", "activations.max-median",
                     "activations.norms", "activations.quant-error", "activations.top-token-error",
                     "activations.fisher", "activations.fgmp"):
        assert expected in names
    for analysis in names.values():
        assert analysis.help and analysis.compute
        for name, field in analysis.options.model_fields.items():
            assert field.description, f"{analysis.name}: option {name} has no help"
            assert field.json_schema_extra.get("argument") or field.json_schema_extra["flags"][0].startswith("--"), name


def _tables(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".csv", ".json")
            and p.name != "manifest.json"}


@pytest.mark.parametrize(("name", "args", "kwargs"), [
    ("weights.stats", ["--filter", r"layers\.0\."], {"filter": r"layers\.0\."}),
    ("activations.kurtosis", ["--nsamples", "3", "--seqlen", "32", "--dataset", str(WIKITEXT)],
     {"nsamples": 3, "seqlen": 32, "dataset": str(WIKITEXT)}),
    ("eval.perplexity", ["--seqlen", "32", "--max-windows", "3", "--dataset", str(WIKITEXT)],
     {"seqlen": 32, "max_windows": 3, "dataset": str(WIKITEXT)}),
])
def test_python_run_writes_the_same_folder_as_the_cli(name, args, kwargs, model_dir, tmp_path):
    import llmprobe

    by_cli, by_python = tmp_path / "cli", tmp_path / "python"
    result = run_cli(*name.split("."), "--model", str(model_dir), *args, "--out", str(by_cli), "--quiet")
    assert result.code == 0, result
    returned = llmprobe.run(name, model=str(model_dir), out=by_python, **kwargs)
    assert _tables(by_cli) == _tables(by_python) and _tables(by_cli)
    cli_manifest = json.loads((by_cli / "manifest.json").read_text())
    py_manifest = json.loads((by_python / "manifest.json").read_text())
    assert cli_manifest["status"] == py_manifest["status"] == "complete"
    assert cli_manifest["options"] == py_manifest["options"]
    assert sorted(cli_manifest["files"]) == sorted(py_manifest["files"])
    assert returned.out == by_python and set(returned.tables) <= {p.stem for p in by_python.glob("*.csv")}


def test_run_without_out_writes_nothing_and_a_session_shares_model_and_windows(model_dir, tmp_path, monkeypatch):
    import llmprobe
    from llmprobe.core import calibration

    monkeypatch.chdir(tmp_path)
    calls = []
    real_prepare = calibration.prepare

    def counting_prepare(lm, **kw):
        calls.append(kw.get("windows") is None)
        return real_prepare(lm, **kw)

    monkeypatch.setattr(calibration, "prepare", counting_prepare)
    with llmprobe.Session(str(model_dir)) as session:
        options = {"nsamples": 2, "seqlen": 32, "dataset": str(WIKITEXT)}
        kurtosis = session.run("activations.kurtosis", **options)
        magnitude = session.run("activations.magnitude", **options)
        assert session.lm is session.lm
    assert kurtosis["kurtosis_layers"] and magnitude["magnitude_layers"]
    assert calls == [True, False]  # windows drawn once, reused by the second analysis
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Exception, match="this session holds model"):
        session.run("activations.kurtosis", model="other", **options)


def test_unknown_analysis_and_option_are_clear(model_dir):
    import llmprobe
    from llmprobe.core.errors import LLMProbeError

    with pytest.raises(LLMProbeError, match="did you mean activations.kurtosis"):
        llmprobe.run("activations.kurtosiss")
    with pytest.raises(LLMProbeError, match="unknown option 'nsample'"):
        llmprobe.run("activations.kurtosis", model=str(model_dir), nsample=3)


def test_help_and_version_import_no_heavy_library():
    code = ("import sys\nfrom llmprobe.cli.app import main\n"
            "for argv in (['--version'], ['--help'], ['activations', '--help'], ['activations', 'kurtosis', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_help_groups_options_in_panels():
    out = run_cli("activations", "kurtosis", "--help").stdout
    for panel in ("Analysis", "Data", "Model", "Output"):
        assert panel in out


def test_docs_option_tables_are_generated_from_the_declarations():
    from conftest import ROOT

    from llmprobe.cli.docs import options_markdown

    assert (ROOT / "docs" / "options.md").read_text() == options_markdown(), \
        "docs/options.md is stale: run `python -m llmprobe.cli.docs > docs/options.md`"
