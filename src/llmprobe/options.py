"""Options of analyses: declared once, as pydantic models whose fields carry their constraint,
CLI flags, help text and help panel.

A field is declared with :func:`option`::

    nsamples: int = option(128, "--nsamples", "--calib-samples", help="Calibration windows.", ge=1,
                           panel=DATA)

The constraint lives only here: :meth:`Options.parse` checks it (with the one wording of
:mod:`llmprobe.core.specs`), the CLI shows it in ``--help``, ``llmprobe schema`` prints it as
JSON Schema, and the invalid-value tests are generated from it. Shared groups of options
(model, runtime, calibration data, evaluation data, module selection, output, figures) are
classes that an analysis's options inherit from.

This module imports neither torch nor transformers: ``--help`` is built from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .core.errors import LLMProbeError
from .core.specs import check_range, compile_regex, parse_layers

# Help panels, in the order --help shows them.
MODEL, DATA, ANALYSIS, OUTPUT = "Model", "Data", "Analysis", "Output"


def option(default: Any, *flags: str, help: str, panel: str = ANALYSIS, ge=None, gt=None, le=None, lt=None,
           choices: Sequence[str] | None = None, check: str | None = None, hidden: bool = False,
           argument: bool = False) -> Any:
    """A declared option.

    ``flags``: the CLI spellings, the first is the canonical one (``--symmetric/--asymmetric``
    declares a switch pair); ``ge/gt/le/lt``: numeric bounds; ``choices``: the allowed strings;
    ``check``: 'regex' (must compile), 'layers' (a layer list such as '0-3,8') or
    'layers_or_all' (the same, or the word 'all'). ``argument=True``: a positional argument
    (its one "flag" is the metavar shown in help, e.g. "DIRS").
    """
    extra: dict[str, Any] = {"flags": list(flags), "panel": panel}
    if argument:
        extra["argument"] = True
    if ge is not None:
        extra["minimum"] = ge
    if gt is not None:
        extra["exclusiveMinimum"] = gt
    if le is not None:
        extra["maximum"] = le
    if lt is not None:
        extra["exclusiveMaximum"] = lt
    if choices is not None:
        extra["enum"] = list(choices)
    if check is not None:
        extra["check"] = check
    if hidden:
        extra["hidden"] = True
    return Field(default, description=help, json_schema_extra=extra)


def flag_of(field) -> str:
    """The canonical CLI spelling of a field (first flag, first half of a switch pair)."""
    return field.json_schema_extra["flags"][0].split("/")[0]


def is_argument(field) -> bool:
    return bool((field.json_schema_extra or {}).get("argument"))


def _type_name(annotation) -> str:
    text = str(annotation)
    for name in ("int", "float", "bool", "str"):
        if name in text:
            return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}[name]
    return "a value of the right type"


def check_constraints(name: str, field, value: Any) -> None:
    """The declared constraint of one field, with the package's one wording."""
    extra = field.json_schema_extra or {}
    if value is None:
        return
    flag = flag_of(field) if extra.get("flags") else f"{name}="
    low = extra.get("minimum", extra.get("exclusiveMinimum"))
    high = extra.get("maximum", extra.get("exclusiveMaximum"))
    low_open, high_open = "exclusiveMinimum" in extra, "exclusiveMaximum" in extra
    if (low is not None or high is not None) and not isinstance(value, bool) and isinstance(value, (int, float)):
        check_range(flag, value, low=low, high=high, low_open=low_open, high_open=high_open)
    if "enum" in extra:
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item not in extra["enum"]:
                raise LLMProbeError(f"unknown {flag} '{item}'; use one of {', '.join(map(str, extra['enum']))}")
    check = extra.get("check")
    if check == "regex":
        compile_regex(value, flag)
    elif check == "layers" or (check == "layers_or_all" and str(value).strip().lower() != "all"):
        parse_layers(value, flag)
    elif check == "device":
        from .core.devices import check_device  # torch only where the value may be a GPU

        check_device(value, flag=flag)


class Options(BaseModel):
    """Base of every analysis's options. Unknown names are refused (``llmprobe.run`` typos)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    # Fields that describe where results go, not what is measured: left out of the manifest's
    # 'options' and of the session's identity.
    not_measured: ClassVar[frozenset[str]] = frozenset(
        {"out", "overwrite", "json_out", "quiet", "plot_format", "log_level"})

    @classmethod
    def parse(cls, values: dict[str, Any]) -> Options:
        """Validate values (types first, then every declared constraint, then :meth:`check`)."""
        try:
            opts = cls(**values)
        except ValidationError as exc:
            raise LLMProbeError(_one_line(cls, exc)) from None
        for name, field in cls.model_fields.items():
            check_constraints(name, field, getattr(opts, name))
        opts.check()
        return opts

    def check(self) -> None:
        """Cross-option checks of one analysis (override); raise LLMProbeError."""

    def measured(self) -> dict[str, Any]:
        """Every option value that shapes the result, for the manifest."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.not_measured}


def _one_line(cls: type[Options], exc: ValidationError) -> str:
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    field = cls.model_fields.get(name)
    if error["type"] == "extra_forbidden":
        known = ", ".join(sorted(cls.model_fields))
        return f"unknown option '{name}' for this analysis; its options are: {known}"
    flag = flag_of(field) if field is not None and field.json_schema_extra else name
    expected = _type_name(field.annotation) if field is not None else "another value"
    return f"{flag} must be {expected}; got {error.get('input')!r}"


# -- shared option groups ---------------------------------------------------------------------


class ModelOptions(Options):
    model: Optional[str] = option(None, "--model", "-m", panel=MODEL,
                                  help="Hub id, local HF directory, or .gguf file. Default: the embedded SmolLM2-135M.")
    revision: Optional[str] = option(None, "--revision", panel=MODEL, help="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = option(False, "--trust-remote-code", panel=MODEL,
                                     help="Allow the model repository's own Python code to run (off by default).")


DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")


class RuntimeOptions(ModelOptions):
    dtype: str = option("auto", "--dtype", panel=MODEL, choices=DTYPE_CHOICES,
                        help="auto|fp32|fp16|bf16 (auto: fp32 on CPU).")
    device: str = option("auto", "--device", panel=MODEL, check="device", help="auto|cpu|cuda|cuda:N.")


class DeviceMapOptions(RuntimeOptions):
    device_map: Optional[str] = option(None, "--device-map", panel=MODEL, choices=("auto",),
                                       help="'auto' spreads a model too large for one GPU over several (accelerate).")


class OutputOptions(Options):
    out: Optional[Path] = option(None, "--out", "-o", panel=OUTPUT,
                                 help="Output directory (default: results/<model>/<group>-<command>/).")
    overwrite: bool = option(False, "--overwrite", panel=OUTPUT,
                             help="Replace an earlier llmprobe run in --out (never any other files).")
    json_out: bool = option(False, "--json", panel=OUTPUT, help="Print the records as JSON on stdout.")
    quiet: bool = option(False, "--quiet", "-q", panel=OUTPUT, help="No progress bars or status lines.")


PLOT_FORMATS = ("png", "pdf", "svg")


class FigureOptions(Options):
    plot: bool = option(False, "--plot", "--plot-results", panel=OUTPUT, help="Write figures next to the tables.")
    plot_format: str = option("png", "--plot-format", panel=OUTPUT, choices=PLOT_FORMATS, help="png|pdf|svg.")


DATASET_HELP = "wikitext2 | c4 | a path (.txt, .jsonl, .json, .parquet, wiki.*.raw)."


class CalibrationOptions(Options):
    dataset: str = option("wikitext2", "--dataset", "--calib-dataset", panel=DATA, help=DATASET_HELP)
    nsamples: int = option(128, "--nsamples", "--calib-samples", panel=DATA, ge=1, help="Calibration windows.")
    seqlen: int = option(512, "--seqlen", panel=DATA, ge=2, help="Tokens per window.")
    seed: int = option(0, "--seed", panel=DATA, help="Seed for the random window offsets.")


class EvaluationOptions(Options):
    """Evaluation windows: the GPTQ/Wanda protocol of ``eval perplexity``."""

    dataset: str = option("wikitext2", "--dataset", panel=DATA, help=DATASET_HELP)
    seqlen: Optional[int] = option(None, "--seqlen", panel=DATA, ge=2,
                                   help="Window length in tokens (default: 2048, capped at the model's maximum).")
    max_windows: Optional[int] = option(None, "--max-windows", panel=DATA, ge=1, help="Stop after N windows.")


class SelectionOptions(Options):
    """Which linear modules an analysis looks at."""

    roles: Optional[list[str]] = option(None, "--roles", "--role", panel=ANALYSIS,
                                        help="Only these roles (attn.q, mlp.down, or families attn/mlp); repeatable.")
    layers: Optional[str] = option(None, "--layers", panel=ANALYSIS, check="layers",
                                   help="Layer indices, e.g. '0,5,10' or '0-3'.")
    filter: Optional[str] = option(None, "--filter", panel=ANALYSIS, check="regex", help="Regex on module names.")

    def layer_list(self) -> list[int] | None:
        return parse_layers(self.layers)


def fields_in_panels(options: type[Options]) -> list[tuple[str, Any]]:
    """Fields in --help order: Analysis first, then Data, Model, Output (declaration order within)."""
    order = {ANALYSIS: 0, DATA: 1, MODEL: 2, OUTPUT: 3}
    items = list(options.model_fields.items())
    return sorted(items, key=lambda item: order.get((item[1].json_schema_extra or {}).get("panel"), 0))


def is_switch(field) -> bool:
    return any("/" in f for f in field.json_schema_extra["flags"])

