"""Data: datasets as examples (``datasets``), tasks that turn them into batches and a loss (``tasks``),
which examples each step reads (``stream``) and the validation metrics of a model on a task
(``evaluate``). Imports nothing above the foundation."""
