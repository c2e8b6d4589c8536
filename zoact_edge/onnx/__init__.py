"""ONNX: running an exported model with ONNX Runtime (``session``, ``runtime``: no training code),
the loss graph and the ORT loss engine of ``tune --backend ort`` (``loss_graph``, ``ort_engine``),
and ``zoact-edge export`` (``export``, ``export_layers``, ``forms``)."""
