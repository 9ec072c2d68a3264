"""``llmprobe``: the command line, built from the registry of analyses.

Every command is made here from its declaration (:mod:`llmprobe.catalog`): its options become
Typer options (grouped in help panels), and its body makes one library call,
:func:`llmprobe.session.execute`, then prints the declared summary. Nothing heavy is imported
until a command runs, so ``--help`` and ``--version`` are fast.

Start-up is what a user waits for on every command, so the tree is built lazily: the root lists
the groups from the catalog's source text (:func:`llmprobe.registry.declared_groups`), and a group
imports its one catalog module and builds its commands only when it is invoked or its help is
shown. ``--version`` alone imports nothing but the package.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional, Union, get_args, get_origin

import typer
from typer.core import TyperGroup

from .. import __version__, registry
from ..core import progress
from ..core.errors import LLMProbeError, RunFailed, Terminated, terminate_cleanly

# Typer vendors click (typer._click) from 0.2x on; older Typer raises plain click's classes.
# Plain click is only imported here when Typer does not vendor it (it costs ~0.1 s otherwise).
try:
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover - older typer
    _TyperClickException = None
if _TyperClickException is None:  # pragma: no cover - older typer
    import click

    _UsageErrors: tuple = (click.ClickException,)
else:
    _UsageErrors = (_TyperClickException,) + ((sys.modules["click"].ClickException,) if "click" in sys.modules else ())


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmprobe {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")] = False,
) -> None:
    """llmprobe: weight spectra, activation statistics, quantization error, robustness and pruning of LLMs."""
    if quiet:
        progress.set_quiet(True)


def _cli_annotation(field) -> Any:
    """The type Typer parses; constraints and choices are checked by the options model, so a
    wrong value gets the package's one wording."""
    annotation = field.annotation
    optional = False
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        annotation = args[0]
    if get_origin(annotation) is list:
        annotation = list[str]
    elif annotation not in (bool, int, float, str, Path):
        annotation = str
    return Optional[annotation] if optional else annotation


def _parameters(analysis: registry.Analysis) -> list[inspect.Parameter]:
    from ..options import fields_in_panels, is_argument, is_switch

    params = []
    for name, field in fields_in_panels(analysis.options):
        extra = field.json_schema_extra
        required = field.is_required()
        default = ... if required else field.default
        if is_argument(field):
            option = typer.Argument(help=field.description or "", metavar=extra["flags"][0],
                                    show_default=not required and default is not None)
        else:
            option = typer.Option(*extra["flags"], help=field.description or "", rich_help_panel=extra["panel"],
                                  hidden=extra.get("hidden", False), show_default=not required and default is not None)
        if field.annotation is bool and not is_switch(field) and not is_argument(field):
            option.is_flag = True
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[_cli_annotation(field), option]))
    return params


def _command(analysis: registry.Analysis):
    def command(**values: Any) -> None:
        run_command(analysis, values)

    command.__signature__ = inspect.Signature(_parameters(analysis))
    command.__name__ = analysis.command.replace("-", "_")
    command.__doc__ = analysis.help + ("\n\n" + "\n\n".join(analysis.notes) if analysis.notes else "")
    return command


def run_command(analysis: registry.Analysis, values: dict[str, Any]) -> None:
    """What every command does: one library call, then the declared summary."""
    # The first line a user sees comes before the heavy imports (torch, transformers: seconds),
    # which may already happen while the options are checked.
    if not values.get("quiet"):
        progress.info(f"[bold]{analysis.group} {analysis.command}[/]: starting ...")
    from ..session import Session, execute, start_figure_workers

    start_figure_workers(analysis, bool(values.get("plot")))
    options = analysis.options.parse(values)
    model_values = {k: getattr(options, k) for k in ("model", "revision", "trust_remote_code", "dtype", "device",
                                                     "device_map") if k in analysis.options.model_fields}
    if "device" in model_values and "dtype" not in model_values:
        model_values.pop("device")  # a weight command's --device is where spectra run, not a load option
    session = Session(**model_values)
    result = execute(session, analysis, options, argv=sys.argv[1:] if _argv["value"] is None else _argv["value"],
                     default_out=True)
    from ..core.distributed import is_main

    if is_main():  # under torchrun only rank 0 prints (every rank holds the same result)
        show(analysis, result, options)


def show(analysis: registry.Analysis, result, options) -> None:
    from rich.console import Console

    from . import printers

    as_json = getattr(options, "json_out", False)
    if as_json:
        table = analysis.printed_table
        records = result.tables.get(table, [])
        if analysis.json_table is None and analysis.summary and analysis.summary[0].where:
            records = [r for r in records if analysis.summary[0].where(r)]
        printers.records_json(records)
        return
    console = Console(soft_wrap=False)
    if analysis.printer:
        registry.resolve(analysis.printer)(result, options, console)
    for item in analysis.summary:
        records = result.tables.get(item.table, [])
        if item.where:
            records = [r for r in records if item.where(r)]
        title = item.title(options, result) if callable(item.title) else item.title
        printers.table(records, title=title, columns=item.columns, limit=item.limit, console=console)
    for note in result.notes:
        progress.info(note)
    if result.out is not None:
        progress.info(f"[green]wrote[/] {result.out}")


def _schema(name: Annotated[Optional[str], typer.Argument(help="Record or analysis name; omit to list them.")]
            = None) -> None:
    """Print a record's JSON Schema, or an analysis's options schema (or list both)."""
    import importlib
    import json
    import pkgutil

    from .. import analyses
    from ..core.records import record_type, record_types

    for info in pkgutil.walk_packages(analyses.__path__, analyses.__name__ + "."):
        importlib.import_module(info.name)
    if name is None:
        for key in record_types():
            typer.echo(key)
        for key in registry.analyses():
            typer.echo(key)
        return
    if name in registry.analyses():
        typer.echo(json.dumps(registry.get(name).options.model_json_schema(), indent=2))
        return
    typer.echo(json.dumps(record_type(name).model_json_schema(), indent=2))


APP_HELP = ("Measure what is inside a language model: weights, activations, quantization error, "
            "perplexity, robustness, pruning.")


def build_app() -> typer.Typer:
    """The whole command tree as one Typer app, every group and command built now (for callers
    that want the Typer object; the console script uses the lazy tree of :func:`_click_command`)."""
    app = typer.Typer(name="llmprobe", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                      rich_markup_mode="rich", help=APP_HELP)
    app.callback()(_root)
    for group in registry.groups().values():
        app.add_typer(_group_app(group.name, group.help), name=group.name, help=group.help)
    app.command("schema")(_schema)
    return app


def _group_app(name: str, help: str) -> typer.Typer:
    group_app = typer.Typer(no_args_is_help=True, help=help)
    for analysis in registry.group_analyses(name):
        group_app.command(analysis.command, help=analysis.help)(_command(analysis))
    return group_app


class LazyGroup(TyperGroup):
    """A command group that imports its catalog module when first used and builds a command (its
    options, Typer's parameter adapters) only when that command is invoked or its help shown:
    ``llmprobe weights alpha-hill`` builds one command, not the tree. The group's own help lists
    its commands from their declarations, through light stand-ins."""

    def __init__(self, *, group: str, **attrs: Any):
        super().__init__(name=group, no_args_is_help=True, **attrs)
        self.group = group
        self._listing = False

    def _declared(self) -> dict[str, registry.Analysis]:
        if "analyses" not in self.__dict__:
            self.__dict__["analyses"] = {a.command: a for a in registry.group_analyses(self.group)}
        return self.__dict__["analyses"]

    def list_commands(self, ctx) -> list[str]:
        return [*self._declared(), *(c for c in self.commands if c not in self._declared())]

    def get_command(self, ctx, cmd_name: str):
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        analysis = self._declared().get(cmd_name)
        if analysis is None:
            return None
        if self._listing:  # the group's help needs the name and first help line only
            from typer.core import TyperCommand

            return TyperCommand(name=cmd_name, help=analysis.help, rich_markup_mode=self.rich_markup_mode)
        one = typer.Typer()
        one.command(analysis.command, help=analysis.help)(_command(analysis))
        built = typer.main.get_command(one)
        self.commands[cmd_name] = built.commands[cmd_name] if isinstance(built, TyperGroup) else built
        return self.commands[cmd_name]

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


class LazyRoot(TyperGroup):
    """The root: lists the groups declared in the catalog without importing it."""

    def _groups(self) -> dict[str, registry.DeclaredGroup]:
        if "groups" not in _built:
            _built["groups"] = {g.name: g for g in registry.declared_groups()}
        return _built["groups"]

    def list_commands(self, ctx) -> list[str]:
        return [*self._groups(), *(c for c in self.commands if c not in self._groups())]

    def get_command(self, ctx, cmd_name: str):
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        declared = self._groups().get(cmd_name)
        if declared is None:
            return None
        self.commands[cmd_name] = LazyGroup(group=cmd_name, help=declared.help,
                                            rich_markup_mode=self.rich_markup_mode)
        return self.commands[cmd_name]


_argv: dict[str, Any] = {"value": None}
_built: dict[str, Any] = {}


def _click_command():
    """The root command, built once per process (in-process callers run many commands); its
    groups and their commands are built on demand (:class:`LazyRoot`)."""
    if "command" not in _built:
        app = typer.Typer(name="llmprobe", cls=LazyRoot, no_args_is_help=True, add_completion=False,
                          pretty_exceptions_enable=False, rich_markup_mode="rich", help=APP_HELP)
        app.callback()(_root)
        app.command("schema")(_schema)
        _built["command"] = typer.main.get_command(app)
    return _built["command"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: bad input is one line on stderr and exit code 2.

    Called without ``argv`` (the console script, ``python -m llmprobe``) the process then ends
    without the interpreter's teardown (:func:`_leave`); called with ``argv`` (tests, other
    programs) it raises SystemExit as usual."""
    try:
        _main(argv)
    except SystemExit as exc:
        if argv is None:
            _leave(exc.code)
        raise


def _leave(code) -> None:
    """End the process now. Tearing down an interpreter that imported torch and transformers and
    held a model costs 1-2 s after the last line was written (measured: 1.8 s after
    `activations kurtosis` on the 2-core VM, a tenth of the command). By now every output file
    is written, renamed into place and closed; what must still happen at exit does: the atexit
    handlers (logging, temporary folders, figure workers) run, then stdout/stderr are flushed."""
    import atexit

    if code is None or isinstance(code, int):
        status = code or 0
    else:  # sys.exit("message"): the message and status 1, as the interpreter would
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`llmprobe ... | head`) or a closed stream
            pass
    os._exit(status)


def _main(argv: list[str] | None) -> None:
    _argv["value"] = argv
    terminate_cleanly()
    command = _click_command()
    try:
        result = command.main(args=argv, prog_name="llmprobe", standalone_mode=False)
    except (LLMProbeError, RunFailed) as exc:
        print(f"llmprobe: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        if Terminated.received or isinstance(exc.__cause__, KeyboardInterrupt):
            _interrupted()
        sys.exit(exc.exit_code)
    except _UsageErrors as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # help was already printed
            sys.exit(0)
        print(f"llmprobe: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    if Terminated.received or result == 130:  # typer hands an interruption back as exit code 130
        _interrupted()
    sys.exit(result if isinstance(result, int) else 0)


def _interrupted() -> None:
    """One line and the conventional exit code: 143 for SIGTERM, 130 for Ctrl-C."""
    if Terminated.received:
        print("llmprobe: terminated", file=sys.stderr)
        sys.exit(Terminated.exit_code)
    print("llmprobe: interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
