"""Recipes: ``tune`` from a TuneConfig to a run folder. The shared run harness (``harness``: the
inputs every recipe starts from, the summary it writes), then one recipe per method family,
each read top to bottom as setup -> loop -> finish: ``zoact`` (zoact, subspace), ``baselines`` (mezo,
fo-lora), ``calibrate``; ``tune`` settles the config, claims the run folder and runs one in it."""
