"""The package version, the single source (pyproject.toml reads it): importing
``importlib.metadata`` to look it up cost a quarter of ``llmprobe --version``."""

__version__ = "0.1.0"
