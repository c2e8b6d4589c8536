"""Data: datasets as examples (``datasets``), tasks that turn them into batches and a loss (``tasks``),
and the validation metrics of a model on a task (``evaluate``). Imports nothing above the foundation."""
