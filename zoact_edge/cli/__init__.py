"""Command line: ``app`` parses and dispatches; one module per command family (``tune``: tune and
eval; ``onnx``: export, generate, eval --onnx; ``profile``: profile and profiles). ``zoact_edge.cli:main``
is the ``zoact-edge`` entry point."""

from .app import main

__all__ = ["main"]
