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
