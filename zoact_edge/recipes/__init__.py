"""Recipes: ``tune`` from a TuneConfig to a run folder. The shared run harness (``harness``: output
folder, run log, schedule, optimizer, memory yardstick, summary), then one recipe per method family,
each read top to bottom as setup -> loop -> finish: ``zoact`` (zoact, subspace), ``baselines`` (mezo,
fo-lora), ``calibrate``; ``tune`` picks one."""
