"""zoact-edge: forward-only (zeroth-order) fine-tuning in one-shot activation subspaces."""

__version__ = "0.1.0"
