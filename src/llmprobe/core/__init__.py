"""Core pieces: loading, module map, weight source, data, collectors, quantizers, spectral,
readouts, interventions, output. They know nothing of analyses, figures or the CLI."""
