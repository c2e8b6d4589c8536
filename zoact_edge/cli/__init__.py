"""Command line: ``main`` parses and dispatches; one module per command family (``tune``: tune and
eval; ``onnx``: export, generate, eval --onnx; ``profile``: profile and profiles)."""
