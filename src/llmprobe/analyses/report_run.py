"""``report run``: a profile of registered analyses run through one session, each into its usual
result folder under the report's folder, then the report built from those folders.

* The model, the data and the windows are opened once (the session).
* Activation statistics that only need a forward pass are folded into one pass over the
  calibration windows, gradient statistics into one backward pass (``core.collect.SharedPass``).
* An analysis that fails is recorded (its folder stays ``incomplete``, the report names it) and
  the others go on; the run then ends with exit code 1, so nothing incomplete passes for complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .. import registry
from ..core import progress
from ..core.errors import LLMProbeError, RunFailed
from ..core.records import Record

# What each profile runs, in order. Names not registered in this version are skipped and named.
QUICK = ["model.info", "eval.perplexity", "weights.alpha-hill", "weights.stats", "activations.magnitude",
         "activations.kurtosis", "activations.max-median", "robustness.super-weights"]
# robustness.ablation gives Block Influence and angular distance from one pass, then the measured
# effect of skipping each block (standard) or each layer's attn/mlp group (full).
STANDARD = QUICK + ["model.layers", "weights.spectrum", "activations.quant-error", "activations.norms",
                    "robustness.ablation"]
FULL = STANDARD + ["activations.fisher", "activations.fgmp", "robustness.noise", "weights.embeddings"]
PROFILES = {"quick": QUICK, "standard": STANDARD, "full": FULL}

# Settings the report uses where an analysis's own default suits a single command better.
REPORT_DEFAULTS: dict[str, dict[str, Any]] = {
    "activations.quant-error": {"bits": 4},
    # The readouts of weight interventions run the model once per target: short windows keep the
    # default profile within minutes on a CPU (raise them with --set, e.g.
    # --set robustness.ablation.max_windows=8).
    "robustness.ablation": {"granularity": "block", "max_windows": 2, "seqlen": 256},
    "robustness.noise": {"max_windows": 2, "seqlen": 256, "repeats": 2},
    "robustness.super-weights": {"max_windows": 2, "seqlen": 256, "max_iterations": 3},
}
PROFILE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"robustness.ablation": {"granularity": "layer"}},
}

# Rough relative cost of each stage, for the ETA line (seconds on the embedded model, 2 cores).
_COST = {"eval.perplexity": 25, "weights.alpha-hill": 30, "weights.spectrum": 25, "weights.stats": 10,
         "activations.fisher": 30, "activations.fgmp": 30, "robustness.ablation": 60, "robustness.noise": 60,
         "weights.embeddings": 40, "robustness.super-weights": 15}


class ReportRun(Record):
    """One analysis of a report run."""

    analysis: str
    folder: str
    status: str            # complete | failed | skipped
    seconds: float | None
    shared_pass: bool      # its collection pass was folded with the others'
    note: str = ""


@dataclass
class Plan:
    analyses: list[str]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)


def plan(options) -> Plan:
    """The analyses to run and their option overrides; unknown names are refused."""
    known = registry.analyses()
    wanted = PROFILES[options.profile]
    for flag, names in (("--only", options.only or []), ("--skip", options.skip or [])):
        for name in names:
            if name not in known:
                registry.get(name)  # one line naming close matches
            if name not in FULL:
                raise LLMProbeError(f"{flag} {name}: not an analysis of report run; its analyses are "
                                    f"{', '.join(n for n in FULL if n in known)}")
    if options.only:
        wanted = [n for n in FULL if n in options.only]
    wanted = [n for n in wanted if n not in (options.skip or [])]
    overrides: dict[str, dict[str, Any]] = {}
    for item in options.set or []:
        target, eq, value = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not eq or not dot:
            raise LLMProbeError(f"--set '{item}' is not ANALYSIS.OPTION=VALUE (e.g. activations.kurtosis.site=output)")
        analysis = registry.get(name)
        if key not in analysis.options.model_fields:
            raise LLMProbeError(f"--set {item}: {name} has no option '{key}'; its options are "
                                f"{', '.join(sorted(analysis.options.model_fields))}")
        field_type = str(analysis.options.model_fields[key].annotation)
        overrides.setdefault(name, {})[key] = value.split(",") if "list" in field_type else value
    return Plan([n for n in wanted if n in known], overrides, [n for n in wanted if n not in known])


def analysis_options(name: str, options, overrides: dict[str, Any]) -> dict[str, Any]:
    """One analysis's option values: the report's shared options where the analysis has them,
    the report's defaults for it, then the user's --set values."""
    analysis = registry.get(name)
    fields = analysis.options.model_fields
    values: dict[str, Any] = {}
    for key in ("model", "revision", "trust_remote_code", "dtype", "device", "device_map", "quiet"):
        if key in fields:
            values[key] = getattr(options, key)
    if "calibration" in analysis.needs or analysis.group == "activations":
        values.update(dataset=options.dataset, nsamples=options.nsamples, seqlen=options.seqlen, seed=options.seed)
    elif "evaluation" in analysis.needs or "max_windows" in fields:
        values.update(dataset=options.dataset, seqlen=options.eval_seqlen, max_windows=options.max_windows)
    if "plot" in fields:
        values["plot"] = True
    values.update(REPORT_DEFAULTS.get(name, {}))
    values.update(PROFILE_DEFAULTS.get(options.profile, {}).get(name, {}))
    values.update(overrides)
    return {k: v for k, v in values.items() if k in fields}


def prepare_job(job):
    """Every option of every stage is checked before the report's folder is opened."""
    chosen = plan(job.options)
    job.state["plan"] = chosen
    job.state["parsed"] = {name: registry.get(name).options.parse(
        analysis_options(name, job.options, chosen.overrides.get(name, {}))) for name in chosen.analyses}


def report_run_job(job):
    from ..core.collect import SharedPass
    from ..session import Result, execute

    options, session, root = job.options, job.session, job.run_dir
    chosen = job.state["plan"]
    rows: dict[str, ReportRun] = {}
    parsed: dict[str, Any] = {}
    for name, values in job.state["parsed"].items():
        analysis = registry.get(name)
        out = None if root is None else root / f"{analysis.group}-{analysis.command}"
        parsed[name] = values.model_copy(update={"out": out}) if "out" in type(values).model_fields else values

    shared = SharedPass()
    folded = [n for n in chosen.analyses if registry.get(n).shares_pass]
    started = time.perf_counter()
    total_cost = sum(_COST.get(n, 8) for n in chosen.analyses)
    done_cost = 0.0
    with shared.active():
        if folded:
            progress.info(f"[bold]report[/]: one shared pass for {len(folded)} activation analyses")
            for name in folded:
                no_output = parsed[name].model_copy(update={"out": None})
                try:
                    with shared.recording(name):
                        execute(session, registry.get(name), no_output)
                except Exception as exc:  # noqa: BLE001 - recorded as the analysis's failure below
                    rows[name] = _failed(name, exc, root)
            shared.run()
        for index, name in enumerate(chosen.analyses, start=1):
            if name in rows:
                continue
            analysis = registry.get(name)
            stage_started = time.perf_counter()
            elapsed = stage_started - started
            eta = elapsed / done_cost * (total_cost - done_cost) if done_cost else None
            progress.info(f"[bold]report[/] [{index}/{len(chosen.analyses)}] {name}"
                          + (f"  (elapsed {elapsed:.0f} s, eta {eta:.0f} s)" if eta is not None else ""))
            try:
                with shared.replaying(name):
                    result = execute(session, analysis, parsed[name])
                rows[name] = ReportRun(analysis=name, folder=_folder(result.out, root), status="complete",
                                       seconds=round(time.perf_counter() - stage_started, 3),
                                       shared_pass=name in shared.recorded)
            except Exception as exc:  # noqa: BLE001 - one failure must not lose the other results
                rows[name] = _failed(name, exc, root, time.perf_counter() - stage_started)
            _adopt(job, analysis)
            done_cost += _COST.get(name, 8)
    table = [rows[n] for n in chosen.analyses]
    table += [ReportRun(analysis=n, folder="", status="skipped", seconds=None, shared_pass=False,
                        note="not available in this version") for n in chosen.unavailable]
    result = Result(tables={"report_runs": table},
                    manifest={"profile": options.profile, "analyses": chosen.analyses,
                              "unavailable": chosen.unavailable, "shared_passes": shared.passes_run})
    if root is not None:
        from ..report.build import build_report

        built = build_report([root], root, title=options.title)
        for path in (built.html, built.markdown, *built.figures):
            job.run.adopt(path.relative_to(root))
        result.data["built"] = built
        result.manifest["report"] = {"html": built.html.name, "markdown": built.markdown.name}
    failed = [row.analysis for row in table if row.status == "failed"]
    if failed:  # the report and the other results are written; the run is not presented as complete
        where = f" (see {result.manifest['report']['html']})" if "report" in result.manifest else ""
        raise RunFailed(f"{len(failed)} of {len(table)} analyses failed: {', '.join(failed)}{where}")
    return result


def _adopt(job, analysis) -> None:
    """The nested result folder becomes part of the report run's listed files."""
    if job.run is not None and (job.run_dir / f"{analysis.group}-{analysis.command}").is_dir():
        job.run.adopt(f"{analysis.group}-{analysis.command}")


def _folder(path, root) -> str:
    if path is None:
        return ""
    return str(path.relative_to(root)) if root is not None else str(path)


def _failed(name: str, exc: BaseException, root, seconds: float | None = None) -> ReportRun:
    analysis = registry.get(name)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    progress.info(f"[red]report: {name} failed[/]: {message}")
    return ReportRun(analysis=name, folder=f"{analysis.group}-{analysis.command}" if root is not None else "",
                     status="failed", seconds=None if seconds is None else round(seconds, 3), shared_pass=False,
                     note=f"{type(exc).__name__}: {message}")


def print_summary(result, options, console) -> None:
    from ..cli.printers import table

    table(result.tables["report_runs"], title=f"report run ({options.profile})",
          columns=["analysis", "status", "seconds", "shared_pass", "note"], console=console)
    built = result.data.get("built")
    if built is not None:
        # The pages were written in the run's staging folder; name them where they are now.
        final = result.out if result.out is not None else built.html.parent
        for line in built.summary():
            if not line.startswith(("report: ", "markdown: ")):
                console.print(line, soft_wrap=True, markup=False, highlight=False)
        console.print(f"markdown: {final / built.markdown.name}", soft_wrap=True, markup=False, highlight=False)
        console.print(f"report: {final / built.html.name}", soft_wrap=True, markup=False, highlight=False)


