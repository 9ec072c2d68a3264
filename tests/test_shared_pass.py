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
