"""How the results tables say a number: a mean ± sd over seeds, whether a difference is inside the seed-to-seed
spread, a validation curve, and a run's settings (as words or as ``tune`` options). Shared by the tools that
write tables (``readme_results.py``, ``budget_tables.py``, ``ablate.py``, ``record_runs.py``) and the pictures of
``bench_convergence.py``."""

from __future__ import annotations

import statistics

# How a method is named in the tables (every other method by its --method value) ...
LABELS = {"calibrate": "calibrate (prior only)"}
# ... and in README's sentences
PROSE = {"mezo": "MeZO", "subspace": "random subspaces", "fo-lora": "backprop LoRA",
         "calibrate": "prior-only calibrate"}
REFERENCE = "zoact"  # the method every "vs" column compares against


def stats(values) -> tuple[float, float] | None:
    """Mean and population sd of the values that are not None (sd 0 for one value); None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def pm(st: tuple[float, float] | None) -> str:
    """A :func:`stats` pair of fractions as percent, 'mean ± sd'; 'n/a' for None."""
    return "n/a" if st is None else f"{100 * st[0]:.1f} ± {100 * st[1]:.1f}"


def mean_sd(values) -> str:
    """Accuracies (fractions) as percent, 'mean ± sd'; 'n/a' when there are none."""
    return pm(stats(values))


def inside(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """The two mean ± sd ranges overlap: a difference this size is inside the seed-to-seed spread."""
    return abs(a[0] - b[0]) <= a[1] + b[1] + 1e-12


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def settings_label(settings: dict) -> str:
    """A run's settings as 'lr 0.001, eps 0.001, schedule cosine' (numbers in their shortest form)."""
    return ", ".join(f"{k} {_value(v)}" for k, v in settings.items())


def tune_flags(options: dict) -> str:
    """Options as ``zoact-edge tune`` flags: '--schedule cosine --lr 0.001'; True/False as --x / --no-x."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        shown = f"{value:g}" if isinstance(value, float) else value
        flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {shown}")
    return " ".join(flags)


def curve_cell(curve) -> str:
    """A validation curve of ``[forwards, accuracy]`` points, the zero-shot one left out: '0.700 / 0.745 (at 750 /
    1500)'."""
    points = [(f, a) for f, a in curve if f > 0]
    return " / ".join(f"{a:.3f}" for _, a in points) + f" (at {' / '.join(str(f) for f, _ in points)})"
