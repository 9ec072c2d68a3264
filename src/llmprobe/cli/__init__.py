"""The command-line layer: thin Typer modules, one per group, over the library."""
