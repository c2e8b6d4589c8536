"""Data: datasets as examples and the order a run reads them in (``datasets``), tasks that turn them into
batches and a loss (``tasks``), and the validation metrics of a model on a task (``evaluate``). Imports
nothing above the foundation."""
