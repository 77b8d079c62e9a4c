"""The maskkit command-line interface (Typer)."""
