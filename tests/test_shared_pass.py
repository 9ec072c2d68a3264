"""Folding several analyses' collection passes into one (what ``report run`` does) gives the
same tables as running each analysis on its own, with one forward pass."""

import torch
from conftest import WIKITEXT
from tiny import save_tiny_model_dir

import llmprobe
from llmprobe.core import collect as collect_module
from llmprobe.core.collect import SharedPass

FORWARD_ONLY = ["activations.magnitude", "activations.kurtosis", "activations.max-median", "activations.norms",
                "activations.quant-error"]
GRADIENT = ["activations.fisher", "activations.fgmp"]


def test_shared_pass_equals_separate_runs_with_one_pass_each_kind(tmp_path, monkeypatch):
    model_dir = save_tiny_model_dir("llama", tmp_path / "llama")
    options = {"nsamples": 3, "seqlen": 32, "dataset": str(WIKITEXT)}
    with llmprobe.Session(str(model_dir)) as session:
        separate = {name: session.run(name, **options) for name in FORWARD_ONLY + GRADIENT}
        forwards = []
        real_forward = session.lm.model.forward

        def counting_forward(*args, **kwargs):
            forwards.append(1)
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(session.lm.model, "forward", counting_forward)
        shared = SharedPass()
        with shared.active():
            for name in FORWARD_ONLY + GRADIENT:
                with shared.recording(name):
                    session.run(name, **options)
            assert forwards == []  # recording runs no pass
            shared.run()
            folded = {}
            for name in FORWARD_ONLY + GRADIENT:
                with shared.replaying(name):
                    folded[name] = session.run(name, **options)
    assert shared.passes_run == 2  # one forward pass, one forward+backward pass
    assert len(forwards) == 2 * options["nsamples"]  # batch size 1: one call per window per pass
    for name in FORWARD_ONLY + GRADIENT:
        for table, rows in separate[name].tables.items():
            assert [r.row() for r in rows] == [r.row() for r in folded[name].tables[table]], (name, table)
    assert collect_module._SHARED["pass"] is None
    assert torch.is_grad_enabled()


def _head_calls_and_tables(session, monkeypatch, name, options):
    head = session.lm.model.get_output_embeddings()
    calls = []
    monkeypatch.setattr(head, "forward", lambda *args, **kwargs: calls.append(1) or torch.nn.Linear.forward(
        head, *args, **kwargs))
    result = session.run(name, **options)
    return len(calls), {table: [r.row() for r in rows] for table, rows in result.tables.items()}


def test_a_forward_only_pass_stops_at_the_head_and_measures_the_same(tmp_path, monkeypatch):
    """Every hooked module has run when the head is reached: skipping the logits changes no row."""
    model_dir = save_tiny_model_dir("llama", tmp_path / "llama")
    options = {"nsamples": 2, "seqlen": 16, "dataset": str(WIKITEXT)}
    with llmprobe.Session(str(model_dir)) as session:
        stopped_calls, stopped = _head_calls_and_tables(session, monkeypatch, "activations.kurtosis", options)
        monkeypatch.setattr(collect_module, "_head_to_skip", lambda *args: None)
        full_calls, full = _head_calls_and_tables(session, monkeypatch, "activations.kurtosis", options)
    assert stopped_calls == 0 and full_calls == options["nsamples"]
    assert stopped == full


def test_the_head_runs_when_it_is_hooked_or_gradients_need_the_loss(tmp_path, monkeypatch):
    model_dir = save_tiny_model_dir("llama", tmp_path / "llama")
    options = {"nsamples": 2, "seqlen": 16, "dataset": str(WIKITEXT)}
    with llmprobe.Session(str(model_dir)) as session:
        calls, tables = _head_calls_and_tables(session, monkeypatch, "activations.magnitude",
                                               {**options, "roles": ["lm_head"]})
        assert calls == options["nsamples"]
        assert any(row["role"] == "lm_head" for row in tables["magnitude_modules"])
        calls, _ = _head_calls_and_tables(session, monkeypatch, "activations.fisher", options)
        assert calls == options["nsamples"]  # the loss needs the logits


def test_the_pass_runs_on_while_a_hooked_module_has_not_run(tmp_path, monkeypatch):
    """A hooked module that has not run when the head is reached (one after the head, or an
    expert that got no token) keeps the forward going to the end."""
    from llmprobe.core.modulemap import LinearSite

    model_dir = save_tiny_model_dir("llama", tmp_path / "llama")
    options = {"nsamples": 2, "seqlen": 16, "dataset": str(WIKITEXT)}
    with llmprobe.Session(str(model_dir)) as session:
        calib = session.calibration(llmprobe.registry.get("activations.kurtosis").options.parse(options))
        model = session.lm.model
        head = model.get_output_embeddings()
        calls = []
        monkeypatch.setattr(head, "forward", lambda *args: calls.append(1) or torch.nn.Linear.forward(head, *args))
        idle = torch.nn.Linear(4, 4)  # hooked, never called by the model
        site = LinearSite("idle", None, "idle", 4, 4, False, "idle", idle)
        collect_module.collect(model, calib.mmap, calib.sites, calib.windows, [])
        assert calls == []  # every hooked module ran: stopped at the head
        collect_module.collect(model, calib.mmap, [*calib.sites, site], calib.windows, [])
        assert len(calls) == options["nsamples"]
