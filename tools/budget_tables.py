"""The long-budget runs (``bench_convergence.py run --budget 1500``, docs/results/budget.json) as tables and as
README's sentence: each run with its curve and sealed test accuracy, and the runs pooled over seeds against
ZO-Act run with the same options."""

from __future__ import annotations

import json

from results_format import LABELS, PROSE, REFERENCE, curve_cell, inside, mean_sd, settings_label, stats, tune_flags


def budget_table(data: dict) -> str:
    """One row per long-budget run (``bench_convergence.py run --budget 1500``): the validation curve and
    the sealed test accuracy read once at the end."""
    rows = ["| task | method | seed | settings | val acc. at forwards | final val loss | test acc. (%) |",
            "|---|---|---|---|---|---|---|"]
    for r in sorted(data.get("records", []), key=lambda r: (r["task"], r["forwards"], r["method"], r["seed"])):
        test = "n/a" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.1f}"
        rows.append(f"| {r['task']} | {LABELS.get(r['method'], r['method'])} | {r['seed']} "
                    f"| {settings_label(r['settings'])} | {curve_cell(r['curve'])} | {r['val_loss']:.3f} | {test} |")
    return "\n".join(rows)


def beyond_lr_eps(settings: dict) -> dict:
    """A run's settings besides the swept lr and eps (e.g. the schedule): what makes two methods' runs comparable."""
    return {k: v for k, v in settings.items() if k not in ("lr", "eps")}


def budget_groups(data: dict) -> list[dict]:
    """The long-budget runs pooled over seeds: one group per task, budget, method and settings run at more than
    one seed, each with ``ref``, ZO-Act's group run with the same options besides lr and eps (e.g. the same
    schedule; None when there is not exactly one), in a fixed order."""
    def options(r: dict) -> str:
        return json.dumps(beyond_lr_eps(r["settings"]), sort_keys=True)

    pooled: dict[tuple, list[dict]] = {}
    for r in data.get("records", []):
        key = (r["task"], r["forwards"], r["method"], json.dumps(r["settings"], sort_keys=True))
        pooled.setdefault(key, []).append(r)
    groups = [{"task": k[0], "forwards": k[1], "method": k[2], "runs": sorted(rs, key=lambda r: r["seed"])}
              for k, rs in sorted(pooled.items()) if len(rs) > 1]
    for g in groups:
        refs = [h for h in groups if (h["task"], h["forwards"], h["method"]) == (g["task"], g["forwards"], REFERENCE)
                and options(h["runs"][0]) == options(g["runs"][0])]
        g["ref"] = refs[0] if len(refs) == 1 else None
    return groups


def _vs_ref(g: dict) -> tuple[float, bool] | None:
    """A group's mean test difference from its ZO-Act group, in points, and whether it is inside the spread."""
    mine = stats(r["test_accuracy"] for r in g["runs"])
    theirs = None if g["ref"] is None else stats(r["test_accuracy"] for r in g["ref"]["runs"])
    if g["method"] == REFERENCE or mine is None or theirs is None:
        return None
    return 100 * (mine[0] - theirs[0]), inside(mine, theirs)


def budget_means_table(data: dict) -> str:
    """:func:`budget_groups` as a table: mean ± sd of the final validation accuracy and loss and of the sealed
    test accuracy, and the test difference from ZO-Act's group (inside the spread when the ranges overlap)."""
    rows = ["| task | forwards | method | settings | seeds | final val acc. (%) | final val loss | test acc. (%) "
            f"| test vs {REFERENCE}, same options (points) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for g in budget_groups(data):
        rs = g["runs"]
        loss, vs = stats(r["val_loss"] for r in rs), _vs_ref(g)
        delta = "—" if vs is None else f"{vs[0]:+.1f}" + (" (inside the spread)" if vs[1] else "")
        rows.append(f"| {g['task']} | {g['forwards']} | {LABELS.get(g['method'], g['method'])} "
                    f"| {settings_label(rs[0]['settings'])} | {', '.join(str(r['seed']) for r in rs)} "
                    f"| {mean_sd([r['val_accuracy'] for r in rs])} | {loss[0]:.3f} ± {loss[1]:.3f} "
                    f"| {mean_sd([r['test_accuracy'] for r in rs])} | {delta} |")
    return "\n".join(rows)


def longer_budget(budget: dict | None, min_seeds: int = 3) -> str:
    """A sentence per long-budget ZO-Act group run at ``min_seeds`` seeds or more: every method's test accuracy
    under the same options, and the difference from ZO-Act (inside the spread said)."""
    groups = budget_groups(budget) if budget else []
    out = []
    for ref in [g for g in groups if g["method"] == REFERENCE and len(g["runs"]) >= min_seeds]:
        opts = tune_flags(beyond_lr_eps(ref["runs"][0]["settings"]))
        others = []
        for g in groups:
            if g["ref"] is ref and g is not ref and (vs := _vs_ref(g)) is not None:
                name = PROSE.get(g["method"], g["method"])
                others.append(f"{name} {mean_sd([r['test_accuracy'] for r in g['runs']])}% ({vs[0]:+.1f} points"
                              f"{', inside the spread' if vs[1] else ''}, {len(g['runs'])} seeds)")
        out.append(f" At {ref['forwards']:,} forwards{f' with `{opts}`' if opts else ''} on {ref['task']} "
                   f"({len(ref['runs'])} seeds): ZO-Act {mean_sd([r['test_accuracy'] for r in ref['runs']])}%"
                   + (", " + ", ".join(others) if others else "") + ".")
    return "".join(out)
