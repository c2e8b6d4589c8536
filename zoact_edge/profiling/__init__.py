"""Memory: the peak meter tune and profile share (``meter``), the fit estimator (``fit``) and device
profiles (``profiles``), and ``zoact-edge profile``: one subprocess per method (``methods``, ``harness``)
and its report (``report``)."""
