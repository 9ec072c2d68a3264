"""The one exception type for bad input.

Library code raises :class:`LLMProbeError` for anything the user can fix (unknown model, corrupt
file, bad regex, out-of-range option, empty data). The CLI turns it into one line on stderr and
exit code 2; from Python it is an ordinary exception with a clear message.
"""


class LLMProbeError(Exception):
    """Bad input the user can fix. The message is one line that says what to do."""

    exit_code = 2


class RunFailed(Exception):
    """A run that went through but not all of its parts completed (a report run whose analyses
    partly failed). What completed is written and kept; the run's manifest says ``incomplete``,
    and the CLI exits with code 1."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit, torchrun stopping its ranks) turned into an
    interruption: unwinding runs every clean-up a Ctrl-C runs — the run folder is marked
    incomplete, staged files and the lock are removed, an earlier complete run is kept. The CLI
    installs the handler (:func:`terminate_cleanly`) and exits with 128 + 15."""

    exit_code = 143
    received = False  # set by the handler: the CLI's exit code and message do not depend on
    # what the framework in between made of the exception (typer turns it into a return code)


def terminate_cleanly() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (CLI use; a library caller
    keeps its own signal handling). No-op outside the main thread or where SIGTERM is absent."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return

    def raise_terminated(signum, frame):
        Terminated.received = True
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, raise_terminated)
