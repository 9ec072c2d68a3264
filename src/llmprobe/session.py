"""A session opens what runs need once — the model source (resolved and hashed once), the weight
source, the loaded model, corpora, calibration and evaluation windows — and runs registered
analyses on them, each into its own result folder.

    >>> import llmprobe                                            # doctest: +SKIP
    >>> result = llmprobe.run("activations.kurtosis", nsamples=32, out="runs/kurtosis")
    >>> with llmprobe.Session() as session:                        # doctest: +SKIP
    ...     k = session.run("activations.kurtosis", nsamples=32)   # nothing written without out=
    ...     m = session.run("activations.magnitude", nsamples=32)  # same model, same windows

``llmprobe.run`` and the CLI go through :meth:`Session.run`, so a Python call with the same
options writes the same folder as the command.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from . import registry
from .core import progress
from .core.errors import LLMProbeError
from .options import Options

# The options that say which model a session holds and how it is loaded.
MODEL_KEYS = ("model", "revision", "trust_remote_code", "dtype", "device", "device_map")


@dataclass
class Result:
    """What every analysis returns: named tables of records, plus optional JSON documents."""

    tables: dict[str, list] = field(default_factory=dict)
    documents: dict[str, Any] = field(default_factory=dict)   # extra JSON files: name -> object
    manifest: dict[str, Any] = field(default_factory=dict)    # extra facts for manifest.json
    csv_only: tuple[str, ...] = ()                            # tables written without a JSON twin
    notes: list[str] = field(default_factory=list)            # lines shown after the summary
    data: dict[str, Any] = field(default_factory=dict)        # in-memory results that are not written
    analysis: str = ""
    out: Path | None = None

    def __getitem__(self, table: str) -> list:
        return self.tables[table]


@dataclass
class Job:
    """One analysis run: the session to draw from, the validated options, what was prepared."""

    session: Session
    options: Any
    analysis: registry.Analysis
    started_at: str = ""
    state: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None        # the folder this run writes into (None: nothing is written)
    run: Any = None                    # its RunOutput (None: nothing is written)

    # Shortcuts to what the session opens (once) for this job.
    @property
    def source(self):
        return self.session.source

    @property
    def weights(self):
        return self.session.weights

    @property
    def lm(self):
        return self.session.lm

    @property
    def calibration(self):
        if "calibration" not in self.state:
            self.state["calibration"] = self.session.calibration(self.options)
        return self.state["calibration"]

    def draw_early(self, figures) -> None:
        """Hand figures whose data is final to the figure workers while the analysis computes
        the rest (:func:`llmprobe.core.figures.draw_early`). The analysis's figure set must yield
        the same descriptions at the end; those are then not drawn again. Nothing happens when
        this run writes no figures, or has no started workers, or runs under torchrun."""
        from .core import distributed

        if self.run is None or not getattr(self.options, "plot", False) or distributed.is_distributed():
            return
        from .core.figures import draw_early

        draw_early(self.run.dir, self.options.plot_format, figures)

    @property
    def evaluation(self):
        """(corpus, token ids) of the evaluation dataset."""
        if "evaluation" not in self.state:
            self.state["evaluation"] = self.session.token_ids(self.options.dataset, purpose="eval")
        return self.state["evaluation"]


class Session:
    """Model, weights and windows opened once and shared by every analysis run in it."""

    def __init__(self, model: str | None = None, *, revision: str | None = None, trust_remote_code: bool = False,
                 dtype: str = "auto", device: str = "auto", device_map: str | None = None):
        self.model_options = {"model": model, "revision": revision, "trust_remote_code": trust_remote_code,
                              "dtype": dtype, "device": device, "device_map": device_map}
        self._corpora: dict[tuple, Any] = {}
        self._token_ids: dict[tuple, Any] = {}
        self._windows: dict[tuple, Any] = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for name in ("lm", "weights"):
            self.__dict__.pop(name, None)
        self._corpora.clear()
        self._token_ids.clear()
        self._windows.clear()

    # -- what the session opens, each once ----------------------------------------------------
    @cached_property
    def source(self):
        from .core.loading import resolve_source

        o = self.model_options
        return resolve_source(o["model"], revision=o["revision"], trust_remote_code=o["trust_remote_code"])

    @cached_property
    def source_manifest(self) -> dict[str, Any]:
        """The model source's facts and hash, computed once per session."""
        return self.source.manifest()

    @cached_property
    def weights(self):
        from .core.weightsource import WeightSource

        return WeightSource.open(self.source)

    @cached_property
    def lm(self):
        from .core.loading import load_model

        o = self.model_options
        return load_model(self.source, dtype=o["dtype"], device=o["device"], device_map=o["device_map"])

    def corpus(self, dataset: str, purpose: str):
        from .core.data import load_corpus

        key = (dataset, purpose)
        if key not in self._corpora:
            self._corpora[key] = load_corpus(dataset, purpose=purpose)
        return self._corpora[key]

    def token_ids(self, dataset: str, purpose: str):
        """(corpus, 1-D token ids) of a dataset, tokenized once per session."""
        from .core.data import tokenize_corpus

        key = (dataset, purpose)
        if key not in self._token_ids:
            corpus = self.corpus(dataset, purpose)
            self._token_ids[key] = (corpus, tokenize_corpus(corpus, self.lm.tokenizer))
        return self._token_ids[key]

    def calibration(self, options, windows=None):
        """Calibration windows (drawn once per dataset/nsamples/seqlen/seed) and the module
        selection of ``options`` (roles, layers, filter, token filter, rotation)."""
        from .core.calibration import prepare

        selection = {"roles": getattr(options, "roles", None), "layers": _layer_list(options),
                     "regex": getattr(options, "filter", None),
                     "exclude_bos": getattr(options, "exclude_bos", False),
                     "exclude_tokens": getattr(options, "exclude_tokens", None) or (),
                     "rotate": getattr(options, "rotate", "none"),
                     "include_lm_head": getattr(options, "include_lm_head", False)}
        if windows is not None:
            return prepare(self.lm, windows=windows, **selection)
        key = (options.dataset, options.nsamples, options.seqlen, options.seed)
        if key in self._windows:
            ids, corpus, window_info = self._windows[key]
            calib = prepare(self.lm, windows=ids, **selection)
            calib.corpus, calib.window_info = corpus, window_info
            return calib
        calib = prepare(self.lm, dataset=options.dataset, nsamples=options.nsamples, seqlen=options.seqlen,
                        seed=options.seed, **selection)
        self._windows[key] = (calib.windows, calib.corpus, calib.window_info)
        return calib

    # -- running analyses ---------------------------------------------------------------------
    def accepts(self, values: dict[str, Any]) -> None:
        """Refuse options that name another model than the one this session holds."""
        for key in MODEL_KEYS:
            if key in values and values[key] != self.model_options[key]:
                raise LLMProbeError(f"this session holds {key}={self.model_options[key]!r}; "
                                    f"got {key}={values[key]!r} (open another Session for another model)")

    def run(self, name: str, *, out: str | Path | None = None, overwrite: bool = False,
            argv: Sequence[str] | None = None, **values: Any) -> Result:
        """Run one registered analysis. Without ``out`` nothing is written; with it, the folder is
        the one the CLI writes for the same options."""
        analysis = registry.get(name)
        fields = analysis.options.model_fields
        values = {k: v for k, v in values.items() if v is not None or k in fields}
        defaults = {k: self.model_options[k] for k in MODEL_KEYS if k in fields and k not in values}
        if "out" in fields:
            values["out"] = out
        if "overwrite" in fields:
            values["overwrite"] = overwrite
        options = analysis.options.parse({**defaults, **values})
        self.accepts({k: getattr(options, k) for k in MODEL_KEYS if k in fields})
        return execute(self, analysis, options, argv=argv)


def _layer_list(options) -> list[int] | None:
    from .core.specs import parse_layers

    layers = getattr(options, "layers", None)
    if layers is None or str(layers).strip().lower() == "all":
        return None
    return parse_layers(layers)


def out_dir_for(session: Session, analysis: registry.Analysis, options: Options) -> Path | None:
    out = getattr(options, "out", None)
    return None if out is None else Path(str(out))


def execute(session: Session, analysis: registry.Analysis, options: Options, *,
            argv: Sequence[str] | None = None, default_out: bool = False) -> Result:
    """Validate what needs data, open the output, compute, write tables/figures/manifest."""
    from .core import distributed

    # Under torchrun / accelerate launch: join the process group; ranks other than 0 compute
    # their share but neither print progress nor write (docs/scale.md).
    if distributed.init_from_env() and not distributed.is_main():
        progress.set_quiet(True)
    if getattr(options, "quiet", False):
        progress.set_quiet(True)
    if progress.is_quiet():  # transformers' own bars and warnings go too (imported only now)
        progress.silence_libraries()
    if getattr(options, "log_level", None):
        progress.configure_logging(options.log_level, getattr(options, "quiet", False))
    if not distributed.is_main():  # rank 0 speaks for the run
        import logging

        logging.getLogger("llmprobe").setLevel(logging.WARNING)
    from .core.output import RunOutput, check_out_target, default_out_dir  # pandas: after the quiet switch

    out = out_dir_for(session, analysis, options)
    if out is None and default_out and analysis.writes_by_default:
        out = default_out_dir(session.source.slug, analysis.group, analysis.command)
    overwrite = bool(getattr(options, "overwrite", False))
    if out is not None:  # refused before any model is loaded or any file is touched (rank 0 decides)
        target = out
        out = distributed.settle(lambda: check_out_target(target, overwrite, model_path=session.model_options["model"])
                                 if distributed.is_main() else target)
    if out is not None and distributed.is_main():
        start_figure_workers(analysis, bool(getattr(options, "plot", False)))
    job = Job(session, options, analysis)
    distributed.settle(_open_needs, session, analysis, job)
    world = distributed.facts()  # {} in one process
    compute = registry.resolve(analysis.compute)
    if out is None or not distributed.is_main():
        job.started_at = distributed.broadcast(_now())
        result = distributed.settle(compute, job)
        result.analysis = analysis.name
        return result
    with RunOutput(out, command=f"{analysis.group} {analysis.command}", overwrite=overwrite, argv=argv,
                   model_path=session.model_options["model"]) as run:
        run.update(**run_manifest(session, job), **({"distributed": world} if world else {}))
        job.started_at = distributed.broadcast(run.manifest["started_at"])
        job.run_dir, job.run = run.dir, run
        try:
            result = distributed.settle(compute, job)
            result.analysis, result.out = analysis.name, run.target
            for table, records in result.tables.items():
                run.write_table(table, records, json_too=table not in result.csv_only)
            for name, document in result.documents.items():
                run.write_json(name, document)
            if getattr(options, "plot", False) and analysis.figures:
                write_figures(run, registry.resolve(analysis.figures)(result, options), options.plot_format)
            if result.manifest:
                run.update(**result.manifest)
        finally:  # figures drawn early (job.draw_early) that nothing published leave no files
            from .core.figures import discard_early

            discard_early()
    return result


def _open_needs(session: Session, analysis: registry.Analysis, job: Job) -> None:
    """Everything the analysis needs is opened (and checked) before the output folder exists."""
    for need in analysis.needs:
        if need == "source":
            session.source  # noqa: B018
        elif need == "weights":
            session.weights  # noqa: B018
        elif need == "model":
            session.lm  # noqa: B018
        elif need == "calibration":
            job.calibration  # noqa: B018
        elif need == "evaluation":
            job.evaluation  # noqa: B018
    if analysis.prepare:
        registry.resolve(analysis.prepare)(job)


def run_manifest(session: Session, job: Job) -> dict[str, Any]:
    """Facts every run records: the model (hashed once per session), every option value, and
    the data actually used (file hash, tokenized-text hash, window offsets' hash)."""
    facts: dict[str, Any] = {"analysis": job.analysis.name, "options": job.options.measured()}
    model = dict(session.source_manifest)
    if "lm" in session.__dict__:
        lm = session.lm
        model.update(dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device),
                     model_class=type(lm.model).__name__)
    facts["model"] = model
    if "calibration" in job.state:
        facts.update(job.state["calibration"].manifest())
    if "evaluation" in job.state:
        from .core.data import corpus_manifest, ids_sha256

        corpus, ids = job.state["evaluation"]
        facts["dataset"] = {**corpus_manifest(corpus), "tokens": int(len(ids)), "token_ids_sha256": ids_sha256(ids)}
    return facts


def start_figure_workers(analysis: registry.Analysis, plot: bool) -> None:
    """Start the figure workers of an analysis that draws many figures in them, so that their
    imports overlap this process's (:func:`llmprobe.core.figures.start_workers`). The CLI calls
    it before the options are checked (torch is imported there); ``execute`` again (a no-op then)."""
    import os

    from .core import distributed

    if distributed.launched() and os.environ.get("RANK", "0") != "0":
        return  # rank 0 draws; the process group is not up yet when the CLI calls this
    if plot and analysis.figures and analysis.many_figures:
        from .core.figures import start_workers

        start_workers(warm=(analysis.figures.partition(":")[0],))


def write_figures(run, figures, fmt: str) -> None:
    """Save (stem, figure) pairs; a list of figures under one stem becomes stem_1, stem_2, ...
    A third element, a dict, passes save options (dpi, tight, close). Figures described as data
    (:class:`llmprobe.core.figures.Deferred`) are drawn in worker processes when there are many."""
    from .core.figures import write_figures as write

    write(run, figures, fmt)


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run(name: str, *, session: Session | None = None, out: str | Path | None = None, overwrite: bool = False,
        **options: Any) -> Result:
    """Run one registered analysis from Python, e.g. ``run("weights.stats", model="dir", out="r")``.

    Model options (model, revision, trust_remote_code, dtype, device, device_map) open a new
    session unless ``session`` is given. Without ``out`` nothing is written.
    """
    if session is None:
        model_values = {k: options[k] for k in MODEL_KEYS if k in options}
        session = Session(**model_values)
    return session.run(name, out=out, overwrite=overwrite, **options)
