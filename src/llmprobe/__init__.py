"""llmprobe: measure what is inside a language model.

    import llmprobe
    result = llmprobe.run("activations.kurtosis", nsamples=32, out="runs/kurtosis")
    result["kurtosis_layers"]        # the records of one table

Every CLI command is a registered analysis (``llmprobe.analyses_list()`` names them);
:class:`llmprobe.Session` shares one model and its windows between several runs.
"""

from ._version import __version__

__all__ = ["__version__", "run", "Session", "analyses_list"]


def run(name: str, **options):
    """Run one registered analysis (see :func:`llmprobe.session.run`)."""
    from .session import run as _run

    return _run(name, **options)


def analyses_list() -> list[str]:
    """The names of every registered analysis, e.g. 'weights.alpha-hill'."""
    from .registry import analyses

    return sorted(analyses())


def __getattr__(name: str):
    if name == "Session":  # imported on first use: `import llmprobe` stays light
        from .session import Session

        return Session
    raise AttributeError(name)
