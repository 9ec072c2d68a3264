"""The declarations of every analysis, one module per command group (light: no torch)."""

# Order of the groups in `llmprobe --help`.
ORDER = ["model", "eval", "weights", "activations", "robustness", "prune", "quant", "report"]
