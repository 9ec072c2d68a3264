"""``python -m llmprobe``: the same entry point as the ``llmprobe`` console script."""

from .cli.app import main

main()
