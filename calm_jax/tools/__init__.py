"""Command-line tools that are not entry points of the pipeline (reference checks)."""
