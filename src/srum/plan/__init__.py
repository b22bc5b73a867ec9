"""``srum plan``: per-rank memory of a configured run, from the model built on the meta device and the run's own
strategy settings, before any GPU is asked for."""
