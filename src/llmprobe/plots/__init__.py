"""Matplotlib figures for llmprobe tables. Every function returns a Figure; the CLI saves it with
``RunOutput.save_figure``."""
