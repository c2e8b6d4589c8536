"""Zeroth-order steps: the two-point estimator (``estimator``), the loss engines it runs on (``engine``),
the fused forward's shared frozen prefix (``prefix``), perturbation scaling (``perturb``), data-parallel
ranks (``distributed``), the comparison methods' steps, MeZO and backprop (``baselines``), and the optimizer and
learning-rate schedule every method steps with (``schedule``)."""
