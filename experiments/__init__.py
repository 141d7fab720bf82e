"""Experiment configs (ml_collections); each file gives the command that runs it."""
