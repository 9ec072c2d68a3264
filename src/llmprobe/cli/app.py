"""``llmprobe``: the root command, its groups, and the entry point that turns bad input into
one line on stderr with exit code 2."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Annotated, Optional

import typer

from .. import __version__
from ..core import progress
from ..core.errors import LLMProbeError

# Typer vendors click (typer._click) from 0.2x on; older Typer raises plain click's classes.
try:
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover - older typer
    _TyperClickException = None
import click as _click

_UsageErrors = tuple(c for c in (_TyperClickException, _click.ClickException) if c is not None)

app = typer.Typer(
    name="llmprobe",
    help="Measure what is inside a language model: weights, activations, quantization error, perplexity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmprobe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")] = False,
) -> None:
    """llmprobe: weight spectra, activation statistics, quantization error and perplexity of LLMs."""
    if quiet:
        progress.set_quiet(True)


def _not_built(name: str, what: str) -> typer.Typer:
    group = typer.Typer(help=f"{what} (not built yet: no commands in this version).",
                        invoke_without_command=True)

    @group.callback()
    def _callback() -> None:
        raise LLMProbeError(f"the '{name}' group is not built yet in llmprobe {__version__}")

    return group


def _register_groups() -> None:
    from . import activations, evaluate, model, weights

    app.add_typer(model.app, name="model", help="Model structure: info and layer census.")
    app.add_typer(evaluate.app, name="eval", help="Evaluation: perplexity.")
    app.add_typer(weights.app, name="weights", help="Weight analyses (no forward pass): spectra, stats, BOPs.")
    app.add_typer(activations.app, name="activations",
                  help="Activation analyses over calibration windows: magnitude, kurtosis, quant error, ...")
    app.add_typer(_not_built("robustness", "Robustness: ablation, noise, bit flips, super weights"),
                  name="robustness")
    app.add_typer(_not_built("prune", "Pruning: magnitude, Wanda, SparseGPT"), name="prune")
    app.add_typer(_not_built("report", "Reports: HTML + Markdown from result directories"), name="report")


@app.command("schema")
def schema(name: Annotated[Optional[str], typer.Argument(help="Record name; omit to list them.")] = None) -> None:
    """Print a record's JSON Schema (or list the record names)."""
    import json

    from .. import analyses
    from ..core.records import record_type, record_types

    for info in pkgutil.walk_packages(analyses.__path__, analyses.__name__ + "."):
        importlib.import_module(info.name)
    if name is None:
        for key in record_types():
            typer.echo(key)
        return
    typer.echo(json.dumps(record_type(name).model_json_schema(), indent=2))


_register_groups()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    command = typer.main.get_command(app)
    if progress.is_quiet():
        progress.silence_libraries()
    try:
        result = command.main(args=argv, prog_name="llmprobe", standalone_mode=False)
    except LLMProbeError as exc:
        print(f"llmprobe: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _UsageErrors as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # help was already printed
            sys.exit(0)
        print(f"llmprobe: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("llmprobe: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
