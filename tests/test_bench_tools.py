"""The method-comparison harness: records, forward budgets, resumability, and the README table."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_convergence  # noqa: E402
import budget_tables  # noqa: E402
import readme_results  # noqa: E402
import repro_default  # noqa: E402


def test_convergence_runs_every_method_at_the_same_forward_budget(model_dirs, tmp_path):
    out, plot = tmp_path / "conv.json", tmp_path / "conv.png"
    argv = ["run", "--model", str(model_dirs["llama"]), "--methods", "zoact,fo-lora", "--tasks", "rotten-tomatoes",
            "--seeds", "0", "--budget", "12", "--points", "2", "--batch-size", "4", "--eval-samples", "16",
            "--extra", "--rank 4 --max-length 24 --calib-samples 8", "--sweep-file", str(tmp_path / "none.json"),
            "--sealed-file", str(tmp_path / "sealed.json"), "--output", str(out), "--plot", str(plot)]
    bench_convergence.main(argv)
    records = json.loads(out.read_text())["records"]
    assert [(r["method"], r["forwards"], r["steps"]) for r in records] == [("zoact", 12, 6), ("fo-lora", 12, 4)]
    for r in records:
        assert {"method", "task", "seed", "forwards", "val_accuracy", "test_accuracy"} <= set(r)
        xs = [f for f, _ in r["curve"]]
        assert xs[0] == 0 and xs[-1] == 12 and xs == sorted(xs)
        assert r["curve"][-1][1] == r["val_accuracy"] and 0 <= r["test_accuracy"] <= 1
    assert plot.stat().st_size > 0
    before = out.read_text()
    bench_convergence.main(argv)  # everything is already there: nothing runs again
    assert out.read_text() == before


def test_sweep_brackets_a_new_task_from_the_first_ones_choice_then_sweeps_eps_and_seals_test(tmp_path, monkeypatch):
    """--start-from: the neighbours of the first task's choice, then outward until bracketed; then
    eps at the chosen lr; test kept apart."""
    grid = [s["lr"] for s in bench_convergence.GRID["subspace"]]  # 5e-4 .. 8e-3
    val = {"rotten-tomatoes": dict(zip(grid, (0.5, 0.6, 0.7, 0.6, 0.5))),  # peak at grid[2]
           "tweets": dict(zip(grid, (0.5, 0.4, 0.45, 0.6, 0.8)))}  # rises to the grid's end
    eps_bonus = {"rotten-tomatoes": {1e-3: 0.0, 1e-4: 0.0, 1e-2: -0.1},  # a tie with 1e-4: 1e-3 stays
                 "tweets": {1e-3: 0.0, 1e-4: -0.1, 1e-2: 0.05}}  # 1e-2 wins
    calls = []

    def fake_run_one(method, task, seed, budget, points, settings, args, test):
        calls.append((task, seed, settings["lr"], settings["eps"]))
        acc = val[task][settings["lr"]] + eps_bonus[task][settings["eps"]] + 0.01 * seed
        return {"method": method, "task": task, "seed": seed, "forwards": bench_convergence.spent(method, budget),
                "val_accuracy": acc, "test_accuracy": acc - 0.05 if test else None, "curve": [[0, 0.4], [300, acc]],
                "wall_seconds": 1.0, "settings": settings, "batch_size": args.batch_size,
                "eval_samples": args.eval_samples, "bits": args.bits or 32}

    monkeypatch.setattr(bench_convergence, "run_one", fake_run_one)
    files = ["--sweep-file", str(tmp_path / "sweep.json"), "--sealed-file", str(tmp_path / "sealed.json")]
    bench_convergence.main(["sweep", "--task", "rotten-tomatoes", "--methods", "subspace", *files])
    # no --start-from: the whole lr grid at eps 1e-3, then the other eps values at the winner's lr
    assert [c[2:] for c in calls] == [(lr, 1e-3) for lr in grid] + [(grid[2], 1e-4), (grid[2], 1e-2)]
    sweep = json.loads((tmp_path / "sweep.json").read_text())["records"]
    assert bench_convergence.best_settings(sweep)["rotten-tomatoes/subspace"] == {"lr": grid[2], "eps": 1e-3}
    calls.clear()
    bench_convergence.main(
        ["sweep", "--task", "tweets", "--start-from", "rotten-tomatoes", "--methods", "subspace", *files]
    )
    # rt's choice +- 1, then up to the end; then eps at the end
    assert [c[2:] for c in calls] == [(lr, 1e-3) for lr in grid[1:]] + [(grid[4], 1e-4), (grid[4], 1e-2)]
    sweep = json.loads((tmp_path / "sweep.json").read_text())["records"]
    assert all(r["test_accuracy"] is None for r in sweep)  # what the choice is read from has no test figure
    assert bench_convergence.best_settings(sweep)["tweets/subspace"] == {"lr": grid[4], "eps": 1e-2}
    calls.clear()
    bench_convergence.main(
        ["sweep", "--task", "tweets", "--start-from", "rotten-tomatoes", "--methods", "subspace", *files]
    )
    assert calls == []  # a finished sweep runs nothing again, even with an eps-stage choice

    # a better run at another scale (batch 8, not this invocation's 16) is not a choice for this one
    other = dict(next(r for r in sweep if r["task"] == "tweets"), batch_size=8, val_accuracy=0.99)
    (tmp_path / "sweep.json").write_text(json.dumps({"records": sweep + [other]}))
    out = tmp_path / "conv.json"
    bench_convergence.main(["run", "--tasks", "tweets", "--methods", "subspace", "--seeds", "0,1", *files,
                            "--output", str(out)])
    assert calls == [("tweets", 1, grid[4], 1e-2)]  # seed 0 is the sweep's own run at the chosen setting, not redone
    assert (tmp_path / "conv.png").stat().st_size > 0  # the picture beside --output, not the committed one
    recs = json.loads(out.read_text())["records"]
    assert [(r["seed"], round(r["test_accuracy"], 6)) for r in recs] == [(0, 0.8), (1, 0.81)]


def _rec(method, seed, curve, test):
    return {"method": method, "task": "t", "seed": seed, "forwards": curve[-1][0], "curve": curve,
            "val_accuracy": curve[-1][1], "test_accuracy": test, "wall_seconds": 60.0, "seconds_per_step": 1.0,
            "settings": {"lr": 1e-3}}


def test_table_reports_forwards_to_reach_mezos_final_accuracy():
    data = {"records": [
        _rec("mezo", 0, [[0, 0.5], [100, 0.55], [200, 0.6]], 0.58),
        _rec("mezo", 1, [[0, 0.5], [100, 0.55], [200, 0.6]], 0.60),
        _rec("zoact", 0, [[0, 0.5], [100, 0.62], [200, 0.7]], 0.70),
        _rec("zoact", 1, [[0, 0.5], [100, 0.58], [200, 0.7]], 0.68),  # seed mean at 100: 0.60 -> reached
        _rec("subspace", 0, [[0, 0.5], [100, 0.52], [200, 0.55]], 0.55),
    ]}
    rows = {line.split("|")[2].strip(): line for line in readme_results.convergence_table(data).splitlines()[2:]}
    assert "| 100 |" in rows["zoact"] and "| 200 |" in rows["mezo"] and "| > 200 |" in rows["subspace"]
    assert "69.0 ± 1.0" in rows["zoact"] and "59.0 ± 1.0" in rows["mezo"]


def test_table_refuses_runs_of_one_method_at_two_settings():
    """Averaging seeds trained at different learning rates would be a meaningless row."""
    data = {"records": [_rec("zoact", 0, [[0, 0.5], [200, 0.7]], 0.7),
                        dict(_rec("zoact", 1, [[0, 0.5], [200, 0.6]], 0.6), settings={"lr": 2e-3})]}
    with pytest.raises(SystemExit, match="more than one setting"):
        readme_results.convergence_table(data)


def test_sweep_table_marks_the_chosen_setting_per_method():
    """The lr stage (eps 1e-3) and the eps stage (at the lr stage's best lr) side by side."""
    recs = [dict(_rec("zoact", 0, [[0, 0.5], [300, acc]], None), settings={"lr": lr, "eps": eps})
            for lr, eps, acc in ((5e-4, 1e-3, 0.66), (1e-3, 1e-3, 0.71), (2e-3, 1e-3, 0.69),
                                 (1e-3, 1e-4, 0.72), (1e-3, 1e-2, 0.60))]
    recs.append(dict(_rec("fo-lora", 0, [[0, 0.5], [300, 0.8]], None), settings={"lr": 1e-3}))
    recs.append(
        dict(_rec("fo-lora", 0, [[0, 0.5], [300, 0.7]], None), settings={"lr": 5e-3})
    )  # off the grid: still shown
    zoact, fo_lora = readme_results.sweep_table({"records": recs}).splitlines()[2:]
    assert zoact.endswith("| lr 0.0005: 0.660; lr 0.001: 0.710; lr 0.002: 0.690 "
                          "| **lr 0.001, eps 0.0001: 0.720**; lr 0.001, eps 0.001: 0.710; lr 0.001, eps 0.01: 0.600 |")
    assert fo_lora.endswith("| **lr 0.001: 0.800**; lr 0.005: 0.700 | — |")


def test_oracle_per_example_directions_equal_separate_single_example_forwards(model_dirs):
    """tools/diagnose_oracle.py's forward-only estimate: one grouped forward of the batch stacked twice gives
    example i's loss at B + eps Z_i and B - eps Z_i; checked against each example run alone under set_noise."""
    import diagnose_oracle
    import torch

    from zoact_edge.adapters.build import build_adapters
    from zoact_edge.config import TuneConfig
    from zoact_edge.recipes.harness import load_inputs
    from zoact_edge.seeds import derive_seed

    cfg = TuneConfig(model=str(model_dirs["llama"]), rank=4, max_length=24, batch_size=3)
    inputs = load_inputs(cfg)
    model, task, train = inputs.model, inputs.task, inputs.splits.train
    calib = [task.collate(train[:4]), task.collate(train[4:8])]
    layers = list(build_adapters(model, calib, 4, "auto").values())
    gen = torch.Generator().manual_seed(0)
    for layer in layers:  # a non-zero B, so the estimate is not taken at the zero-shot point only
        layer.B.data = 1e-2 * torch.randn(layer.B.shape, generator=gen)
    batch = task.collate(train[:3])
    loss, grads = diagnose_oracle.per_example_estimate(model, task, batch, layers, seed=7, step=2)

    eps, n = diagnose_oracle.EPS, 3
    seeds = [derive_seed(7, diagnose_oracle.SEED_TAG, 2, i) for i in range(n)]
    alone = {}
    for sign in (1, -1):
        for i in range(n):
            one = task.collate(train[i:i + 1])
            for j, layer in enumerate(layers):
                layer.set_noise(derive_seed(seeds[i], j), sign * eps)
            with torch.no_grad():
                alone[sign, i] = float(task.loss(model, one))
            for layer in layers:
                layer.set_noise(None)
    c = [(alone[1, i] - alone[-1, i]) / (2 * eps) for i in range(n)]
    for j, (layer, g) in enumerate(zip(layers, grads)):
        expect = sum(ci * layer.direction(derive_seed(s, j)) for ci, s in zip(c, seeds)) / n
        assert torch.allclose(g, expect, rtol=1e-3, atol=1e-3 * float(expect.abs().max()))
    assert loss == pytest.approx(sum(alone[1, i] + alone[-1, i] for i in range(n)) / (2 * n), rel=1e-5)
    assert all(layer.noise_groups is None for layer in layers)  # nothing left perturbed


def test_curvature_probe_equals_autograd_directional_derivatives(model_dirs):
    """tools/diagnose_curvature.py's forward-only probe: the first and second differences along the method's
    own direction equal <g, z> and z^T H z from autograd (fp64 tiny GPT-2), for ZO-Act's B and MeZO's weights."""
    import diagnose_curvature
    import torch

    from zoact_edge.config import TuneConfig
    from zoact_edge.recipes.harness import load_inputs

    cfg = TuneConfig(model=str(model_dirs["gpt2"]), max_length=24, batch_size=4, calib_samples=8)
    for name in ("zoact-r1", "mezo"):
        inputs = load_inputs(cfg)
        space = diagnose_curvature.build_space(name, cfg, inputs)
        model, task = inputs.model.double(), inputs.task
        model.set_attn_implementation("eager")  # torch's fused CPU attention has no second derivative
        if name != "mezo":  # away from B = 0, where the adapter's curvature has a special form
            gen = torch.Generator().manual_seed(1)
            for t in space.tensors:
                t.data = 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        batch = task.collate(inputs.splits.train[:4])
        dirs = space.draw(5)
        for t in space.tensors:
            t.requires_grad_(True)
        grads = torch.autograd.grad(task.loss(model, batch), space.tensors, create_graph=True)
        gz = sum((g * z).sum() for g, z in zip(grads, dirs))
        zhz = sum(float((h * z).sum()) for h, z in zip(torch.autograd.grad(gz, space.tensors), dirs))
        for t in space.tensors:
            t.requires_grad_(False)
        before = [t.clone() for t in space.tensors]

        def loss():
            with torch.no_grad():
                return float(task.loss(model, batch))

        first, second = diagnose_curvature.probe(loss, space, dirs, 1e-5, loss())
        assert first == pytest.approx(float(gz.detach()), rel=1e-5)
        assert second == pytest.approx(zhz, rel=1e-4)
        assert all(torch.allclose(a, b, rtol=0, atol=1e-15) for a, b in zip(space.tensors, before))


def test_curvature_parts_restrict_the_direction_and_nothing_else():
    """``zoact-r16:PART``: the probe direction is the method's own draw with every coefficient outside PART zeroed."""
    import diagnose_curvature
    import torch

    names = ["model.layers.3.self_attn.q_proj", "model.layers.20.mlp.down_proj"]
    tensors = [torch.zeros(5, 16), torch.zeros(7, 16)]

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(t.shape, generator=gen) for t in tensors]

    for part, kept in [("col0", [[0], [0]]), ("col4-15", [range(4, 16), range(4, 16)]), ("attn", [range(16), []]),
                       ("upper", [[], range(16)])]:
        space = diagnose_curvature.Space(tensors, draw, names)
        masks = space.restrict(part)
        for z, full, m, cols in zip(space.draw(3), draw(3), masks, kept):
            keep = torch.zeros(16, dtype=torch.bool)
            keep[list(cols)] = True
            assert torch.equal(z[:, keep], full[:, keep]) and not z[:, ~keep].any()
            assert torch.equal(m.bool(), keep.expand(m.shape))


def test_probe_average_folds_the_running_mean_and_ema_of_the_iterates():
    import probe_average
    import torch

    gen = torch.Generator().manual_seed(0)
    iterates = [[torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen,
                                                                                   dtype=torch.float64)]
                for _ in range(7)]
    watch = probe_average.Averages(tail_from=3, decay=0.9)
    for coeffs in iterates:
        watch.fold(coeffs)
    for k in range(2):
        torch.testing.assert_close(watch.tail[k], torch.stack([c[k] for c in iterates[3:]]).mean(0))
        ema = torch.zeros_like(iterates[0][k])
        for c in iterates:
            ema = 0.9 * ema + 0.1 * c[k]
        torch.testing.assert_close(watch.ema[k], ema)
    assert (watch.steps, watch.tail_count) == (7, 4)


def test_probe_average_at_the_last_iterate_reads_the_runs_own_final_eval(model_dirs, tmp_path, monkeypatch):
    """A tail of one step and an EMA of decay 0 are the last iterate: both must give the run's tuned metrics."""
    import probe_average

    from zoact_edge.zo.engine import TorchEngine

    monkeypatch.setattr(TorchEngine, "step", TorchEngine.step)  # undone after the test: install() patches these
    monkeypatch.setattr(TorchEngine, "evaluate", TorchEngine.evaluate)
    results = tmp_path / "avg.json"
    probe_average.main(["--tail-from", "3", "--ema", "0", "--results", str(results), "--",
                        "--model", str(model_dirs["llama"]), "--steps", "4", "--batch-size", "4", "--calib-samples",
                        "8", "--rank", "4", "--eval-samples", "16", "--max-length", "24", "--lr", "1e-2", "--eps",
                        "1e-2", "--output", str(tmp_path / "run")])
    (rec,) = json.loads(results.read_text())["records"]
    assert rec["options"][:2] == ["--model", str(model_dirs["llama"])] and "--output" not in rec["options"]
    assert (rec["applied_steps"], rec["tail_steps"]) == (4, 1)
    assert rec["tail"] == rec["last"] and rec["ema"] == rec["last"]
    assert rec["last"] != rec["zero_shot"]
    # the batch order the run read (today's default), and "random" for a record from before the option
    before = {k: v for k, v in rec.items() if k != "batch_order"}
    rows = probe_average.average_table({"records": [rec, before]}).splitlines()[2:]
    assert [row.split(" | ")[3] for row in rows] == ["length", "random"]


def test_diagnose_transfer_reads_each_run_on_its_own_base_as_it_finished(model_dirs, tmp_path):
    """On the base it was tuned on, an adapter must give its run's own final eval; moved, re-anchoring changes it."""
    import diagnose_transfer

    from zoact_edge.cli import main

    fast = ["--model", str(model_dirs["llama"]), "--steps", "3", "--batch-size", "4", "--calib-samples", "8",
            "--rank", "4", "--eval-samples", "16", "--max-length", "24", "--lr", "1e-2", "--eps", "1e-2"]
    runs = {bits: tmp_path / f"b{bits}" for bits in (32, 4)}
    for bits, out in runs.items():
        assert main(["tune", *fast, "--bits", str(bits), "--output", str(out)]) == 0
    results = tmp_path / "moved.json"
    diagnose_transfer.main([str(runs[32]), str(runs[4]), "--output", str(results)])
    recs = {(r["tuned_on"], r["evaluated_on"], r["form"]): r for r in json.loads(results.read_text())["records"]}
    assert set(recs) == {(32, 32, "as tuned"), (32, 4, "as tuned"), (32, 4, "re-anchored"),
                         (4, 4, "as tuned"), (4, 32, "as tuned"), (4, 32, "re-anchored")}
    for bits in (32, 4):
        own = recs[(bits, bits, "as tuned")]
        assert own["accuracy"] == own["run_tuned"]["accuracy"]
        assert own["loss"] == pytest.approx(own["run_tuned"]["loss"], rel=1e-5)
    assert recs[(32, 4, "re-anchored")]["loss"] != recs[(32, 4, "as tuned")]["loss"]
    assert "| 4-bit (compensated) | 32-bit | re-anchored |" in diagnose_transfer.transfer_table(
        json.loads(results.read_text()))


def test_diagnose_rounding_reads_the_compensated_start_that_tune_evaluates(model_dirs, tmp_path):
    """tools/diagnose_rounding.py's rank-k start, measured through its own forwards, is the compensated start a
    --bits 4 tune run with the same calibration and an exact basis evaluates; as loaded, the run's zero-shot."""
    import diagnose_rounding

    from zoact_edge.cli import main

    data = ["--model", str(model_dirs["llama"]), "--batch-size", "4", "--calib-samples", "8", "--eval-samples",
            "16", "--max-length", "24"]
    run = tmp_path / "run"
    assert main(["tune", *data, "--bits", "4", "--rank", "4", "--basis-method", "gram", "--steps", "1",
                 "--output", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    results = tmp_path / "rounding.json"
    diagnose_rounding.main([*data, "--ranks", "4,8", "--output", str(results)])
    rec = json.loads(results.read_text())["records"][0]
    assert (rec["task"], rec["model"]) == ("rotten-tomatoes", str(model_dirs["llama"]))
    rows = {r["rank"]: r for r in rec["rows"]}
    for k, expected in ((0, summary["zero_shot"]), (4, summary["compensation"]["start"])):
        assert rows[k]["loss"] == pytest.approx(expected["loss"], rel=1e-5), k
        assert rows[k]["accuracy"] == pytest.approx(expected["accuracy"]), k
    assert rec["fp32"]["hidden_rel_err"] == 0.0 and rec["fp32"]["label_kl"] == 0.0
    # compensating inside the basis brings the 4-bit model's hidden states closer to the float model's
    assert rows[4]["hidden_rel_err"] < rows[0]["hidden_rel_err"] and rows[4]["compensated_layers"] > 0
    # fp32 P and B, a P shared by the layers that read the same input (q/k/v, gate/up) counted once
    config = json.loads((model_dirs["llama"] / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    per_block = (hidden + kv + kv + hidden + inter + inter + hidden) + (3 * hidden + inter)  # B's d_out + P's d_in
    assert [rows[k]["frozen_bytes"] for k in (4, 8)] == [4 * k * layers * per_block for k in (4, 8)]


def test_record_runs_names_every_option_that_differs_from_the_defaults(tmp_path):
    import record_runs

    from zoact_edge.config import TuneConfig

    run = tmp_path / "run"
    run.mkdir()
    config = {**TuneConfig().resolved().to_dict(), "bits": 4, "seed": 2, "share_prefix": False, "compensate": True,
              "lr": 1e-3, "output": "somewhere"}  # lr 1e-3 is zoact's own default: not an option
    (run / "run_config.json").write_text(json.dumps({**config, "model_folder": "/m"}))
    (run / "summary.json").write_text(json.dumps({"zero_shot": {"accuracy": 0.5}, "tuned": {"accuracy": 0.6}}))
    rec = record_runs.record(run, "a note")
    assert rec["options"] == {"bits": 4, "share_prefix": False, "seed": 2}  # --compensate is --bits 4's default
    assert rec["command"] == "zoact-edge tune --bits 4 --no-share-prefix --seed 2"
    assert (rec["seed"], rec["note"], rec["tuned"]) == (2, "a note", {"accuracy": 0.6})


def test_record_runs_names_what_a_step_scale_changes_and_not_its_own_lr_and_eps():
    """A --step-scale weight run at the lr and eps that option brings is `--step-scale weight`, and one at others
    names them; a run from before --step-scale existed ran absolute: no flag for it."""
    import record_runs

    from zoact_edge.config import TuneConfig

    weight = TuneConfig(step_scale="weight").resolved().to_dict()
    assert record_runs.command(record_runs.options_of(weight, {})) == "zoact-edge tune --step-scale weight"
    assert record_runs.command(record_runs.options_of({**weight, "lr": 1e-3}, {})) == (
        "zoact-edge tune --step-scale weight --lr 0.001")
    old = {k: v for k, v in TuneConfig().resolved().to_dict().items() if k != "step_scale"}
    assert record_runs.command(record_runs.options_of(old, {})) == "zoact-edge tune"


def test_record_runs_rederives_the_command_when_a_default_changes(tmp_path, monkeypatch):
    """A record keeps its run's whole config: once a default moves, its command names the value it ran with."""
    import record_runs

    from zoact_edge.config import TuneConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({**TuneConfig().resolved().to_dict(), "seed": 1}))
    (run / "summary.json").write_text(json.dumps({"zero_shot": {"accuracy": 0.5}, "tuned": {"accuracy": 0.6}}))
    rec = record_runs.record(run, "")
    assert rec["command"] == "zoact-edge tune --seed 1" and record_runs.current(rec) == rec
    ran_with = TuneConfig().steps
    moved = dataclasses.make_dataclass("Moved", [  # TuneConfig with a later default for --steps
        (f.name, f.type, dataclasses.field(default=ran_with + 100 if f.name == "steps" else f.default,
                                           metadata=f.metadata)) for f in dataclasses.fields(TuneConfig)],
        bases=(TuneConfig,))
    monkeypatch.setattr(record_runs, "TuneConfig", moved)
    assert record_runs.current(rec)["command"] == f"zoact-edge tune --steps {ran_with} --seed 1"
    assert record_runs.current(rec)["options"] == {"seed": 1, "steps": ran_with}


def test_record_runs_keeps_the_eval_curve_a_shorter_run_reproduces(model_dirs, tmp_path):
    """The curve's eval at step 2 of a 4-step run is what a 2-step run of the same seed ends at (constant lr)."""
    import record_runs

    from zoact_edge.cli import main

    fast = ["--model", str(model_dirs["llama"]), "--batch-size", "4", "--calib-samples", "8", "--rank", "4",
            "--eval-samples", "16", "--max-length", "24", "--lr", "1e-2", "--eps", "1e-2"]
    runs = {steps: tmp_path / f"s{steps}" for steps in (4, 2)}
    assert main(["tune", *fast, "--steps", "4", "--eval-every", "2", "--output", str(runs[4])]) == 0
    assert main(["tune", *fast, "--steps", "2", "--output", str(runs[2])]) == 0
    long, short = record_runs.record(runs[4], ""), record_runs.record(runs[2], "")
    assert [p["step"] for p in long["eval_curve"]] == [2, 4] and "eval_curve" not in short
    at2, end = long["eval_curve"]
    assert (at2["accuracy"], at2["loss"]) == pytest.approx((short["tuned"]["accuracy"], short["tuned"]["loss"]))
    assert (end["accuracy"], end["loss"]) == (long["tuned"]["accuracy"], long["tuned"]["loss"])
    assert at2["loss"] != end["loss"]


def test_curve_table_puts_every_run_on_the_union_of_evaluated_steps():
    import record_runs

    def rec(cmd, seed, points):
        curve = [{"step": s, "accuracy": a, "loss": 1 - a} for s, a in points]
        return {"command": cmd, "seed": seed, "eval_curve": curve}

    data = {"records": [rec("zoact-edge tune --seed 1", 1, [(2, 0.5), (4, 0.75)]), {"command": "no curve", "seed": 0},
                        rec("zoact-edge tune", 0, [(3, 0.25), (4, 0.5)])]}
    head, _, first, second = record_runs.curve_table(data).splitlines()
    assert head == "| command | step 2 | step 3 | step 4 |"
    assert first == "| `zoact-edge tune` |  | 0.250 / 0.750 | 0.500 / 0.500 |"  # seed 0 first
    assert second == "| `zoact-edge tune --seed 1` | 0.500 / 0.500 |  | 0.750 / 0.250 |"


def test_order_table_compares_the_old_and_new_default_by_seed(monkeypatch):
    import record_runs

    def rec(seed, acc, config=None, curve=None, bits=32):
        config = {**record_runs.TuneConfig(bits=bits, seed=seed).resolved().to_dict(), **(config or {})}
        started = {"compensation": {"layers": 1}} if bits == 4 else {}  # what the 4-bit default does
        points = {"eval_curve": [{"step": 300, "accuracy": curve, "loss": 0.5}]} if curve else {}
        return record_runs.current({"bits": bits, "seed": seed, "zero_shot": {"accuracy": 0.5}, **started,
                                    "tuned": {"accuracy": acc}, "config": config, **points})

    old = {"steps": 300, "batch_order": "random"}
    runs = [rec(0, 0.60), rec(0, 0.60, {"eval_every": 75}, curve=0.55),  # the default run and its curve twin
            rec(1, 0.70, {"eval_every": 75}, curve=0.65), rec(0, 0.52, old), rec(1, 0.56, old),
            rec(2, 0.99, {"lr": 0.1}), rec(0, 0.90, bits=4)]  # another setting; another precision
    monkeypatch.setattr(record_runs, "_defaults", lambda: runs[:1])
    monkeypatch.setattr(record_runs, "_records", lambda: runs[1:])
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in record_runs.order_table().splitlines()}
    assert rows["| Rotten Tomatoes, fp32"] == [
        "0.520, 0.560 (seeds 0, 1): +4.0 ± 2.0", "0.550, 0.650 (seeds 0, 1)",
        "0.600, 0.700 (seeds 0, 1): **+15.0 ± 5.0** |"]  # gains 10 and 20 points: mean 15, population sd 5
    assert rows["| Rotten Tomatoes, 4-bit"] == ["", "", "0.900 (seed 0): **+40.0** |"]


def test_paired_table_sets_a_setting_beside_the_default_seed_by_seed(monkeypatch):
    import record_runs

    def rec(seed, acc, loss, config=None, evals=(0.6, 0.5)):
        config = {**record_runs.TuneConfig(bits=4, seed=seed).resolved().to_dict(), "eval_every": 150, **(config or {})}
        curve = [{"step": s, "accuracy": 0.5, "loss": v} for s, v in zip((150, 300), evals)]
        return record_runs.current({"bits": 4, "seed": seed, "zero_shot": {"accuracy": 0.5},
                                    "compensation": {"layers": 1}, "tuned": {"accuracy": acc, "loss": loss},
                                    "config": config, "eval_curve": curve})

    more = {"calib_samples": 256}
    runs = [rec(0, 0.60, 0.4), rec(1, 0.70, 0.4), rec(2, 0.80, 0.4),  # seed 2 ran the default only
            rec(0, 0.65, 0.7, more), rec(1, 0.60, 0.1, more, evals=(0.3, 0.2)), rec(0, 0.99, 0.0, {"lr": 0.1})]
    monkeypatch.setattr(record_runs, "_defaults", lambda: runs[:1])
    monkeypatch.setattr(record_runs, "_records", lambda: runs[1:])
    _, _, first, second, means = record_runs.paired_table(4, calib_samples=256).splitlines()
    # default losses (0.6 + 0.5 + 0.4) / 3 = 0.5; with 256 examples (0.6 + 0.5 + 0.7) / 3 = 0.6, (0.3 + 0.2 + 0.1) / 3
    assert first == "| 0 | 0.600 (+10.0) | 0.500 | 0.650 (+15.0) | 0.600 | +5.0 / +0.100 |"
    assert second == "| 1 | 0.700 (+20.0) | 0.500 | 0.600 (+10.0) | 0.200 | -10.0 / -0.300 |"
    assert means == ("| mean ± sd | +15.0 ± 5.0 | 0.500 | +12.5 ± 2.5 | 0.400 "
                     "| -2.5 ± 7.5 / -0.100 ± 0.200 |")  # population sd, as every table here
    # with a base option, the pairs are that command's runs: tweets against tweets, never the default task's
    tweets = {"task": "tweets"}
    runs += [rec(0, 0.55, 0.3, tweets), rec(0, 0.58, 0.2, {**tweets, **more}), rec(1, 0.52, 0.2, {**tweets, **more})]
    header, _, only = record_runs.paired_table(4, base=tweets, calib_samples=256).splitlines()
    assert "`zoact-edge tune --bits 4 --task tweets --calib-samples 256`" in header
    assert only == "| 0 | 0.550 (+5.0) | 0.467 | 0.580 (+8.0) | 0.433 | +3.0 / -0.033 |"


def test_padding_counts_real_tokens_over_padded_positions_and_grouping_keeps_the_examples():
    import diagnose_padding

    length = [2, 9, 3, 8, 5, 6]
    batches = [[0, 1], [2, 3, 4], [5]]  # padded to 9, 8 and 6: 2*9 + 3*8 + 6 = 48 positions, 33 tokens
    assert diagnose_padding.useful(batches, length) == pytest.approx(33 / 48)
    regrouped = diagnose_padding.grouped(batches, length)
    assert [len(b) for b in regrouped] == [2, 3, 1] and sorted(sum(regrouped, [])) == list(range(6))
    assert regrouped == [[0, 2], [4, 5, 3], [1]]  # by length: 2, 3 | 5, 6, 8 | 9
    assert diagnose_padding.useful(regrouped, length) == pytest.approx(33 / (2 * 3 + 3 * 8 + 9))


@pytest.mark.parametrize("bits, told, did, shown", [
    (4, "absent", False, "--bits 4 --no-compensate"),  # a 4-bit run from before the option: uncompensated
    (4, None, True, "--bits 4"),  # today's default, and it compensated
    (4, None, False, "--bits 4 --no-compensate"),  # the default fell back (no float weights): say what ran
    (4, False, False, "--bits 4 --no-compensate"),
    (32, False, False, ""),  # nothing to compensate: false is what the default does
    (32, "absent", False, ""),
])
def test_record_runs_names_compensation_by_what_the_run_did(bits, told, did, shown):
    import record_runs

    from zoact_edge.config import TuneConfig

    config = {**TuneConfig().resolved().to_dict(), "bits": bits, "compensate": told}  # a run saves it resolved
    if told == "absent":
        del config["compensate"]
    summary = {"compensation": {"layers": 1, "start": {}}} if did else {}
    options = record_runs.options_of(config, summary)
    assert record_runs.command(options) == " ".join(["zoact-edge tune", shown]).strip()


def test_comparison_runs_in_another_batch_order_are_not_reused():
    import argparse

    args = argparse.Namespace(budget=300, batch_size=16, batch_order="random", eval_samples=500, bits=0)
    length = argparse.Namespace(**{**vars(args), "batch_order": "length"})
    old = {"method": "zoact", "forwards": bench_convergence.spent("zoact", 300), "batch_size": 16, "eval_samples": 500,
           "bits": 32}  # a record from before --batch-order: it read random batches
    assert bench_convergence._same_scale(old, args) and not bench_convergence._same_scale(old, length)
    assert bench_convergence._same_scale({**old, "batch_order": "length"}, length)


def test_probe_streams_refuses_a_second_derived_stream_it_would_reseed_with_the_directions(monkeypatch):
    import probe_streams

    from zoact_edge.recipes import harness
    from zoact_edge.recipes import zoact as recipe
    from zoact_edge.seeds import derive_seed

    for module, attr in ((recipe, "sampled_batches"), (recipe, "build_adapters"), (harness, "batch_indices"),
                         (recipe, "derive_seed")):
        monkeypatch.setattr(module, attr, getattr(module, attr))  # restored after the test
    probe_streams.install({"calibration": None, "batches": None, "directions": 5})
    assert recipe.derive_seed(0, 7) == derive_seed(5, 7)  # the step seed: reseeded
    with pytest.raises(SystemExit, match="its own entry"):
        recipe.derive_seed(0, "dropout", 7)


def test_probe_streams_with_every_stream_reseeded_is_the_run_of_that_seed(model_dirs, tmp_path, monkeypatch):
    """Calibration, batches and directions all from seed 1 must be ``tune --seed 1`` loss for loss; one stream
    alone from seed 1 must be neither run (so each stream reaches the run, and nothing else reseeds it)."""
    import probe_streams

    from zoact_edge.cli import main as zoact_main
    from zoact_edge.recipes import harness
    from zoact_edge.recipes import zoact as recipe

    tiny = ["--model", str(model_dirs["llama"]), "--steps", "4", "--batch-size", "4", "--calib-samples", "8",
            "--rank", "4", "--eval-samples", "16", "--max-length", "24", "--lr", "1e-2", "--eps", "1e-2"]

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    plain = {}
    for seed in (0, 1):
        assert zoact_main(["tune", *tiny, "--seed", str(seed), "--output", str(tmp_path / f"plain{seed}")]) == 0
        plain[seed] = losses(tmp_path / f"plain{seed}")
    assert plain[0] != plain[1]
    results = tmp_path / "streams.json"
    originals = {(m, a): getattr(m, a) for m, a in ((recipe, "sampled_batches"), (recipe, "build_adapters"),
                                                    (harness, "batch_indices"), (recipe, "derive_seed"))}
    for name, swapped in [("all", ["--calibration", "1", "--batches", "1", "--directions", "1"]),
                          ("calibration", ["--calibration", "1"]), ("batches", ["--batches", "1"]),
                          ("directions", ["--directions", "1"])]:
        for (module, attr), original in originals.items():  # install() patches these: each run starts unpatched
            monkeypatch.setattr(module, attr, original)
        probe_streams.main([*swapped, "--results", str(results), "--", *tiny, "--seed", "0",
                            "--output", str(tmp_path / name)])
        got = losses(tmp_path / name)
        if name == "all":
            assert got == plain[1]
        else:
            assert got != plain[0] and got != plain[1], name
    records = json.loads(results.read_text())["records"]
    assert records[0]["seeds"] == {"calibration": 1, "batches": 1, "directions": 1}
    assert records[1]["seeds"] == {"calibration": 1, "batches": 0, "directions": 0}
    assert records[0]["final_train_loss"] == pytest.approx(sum(plain[1]) / 4)
    rows = probe_streams.streams_table({"records": records}).splitlines()[2:]
    assert [row.split(" | ")[2:5] for row in rows[1:]] == [["1", "0", "0"], ["0", "1", "0"], ["0", "0", "1"]]
    # a seed's recorded plain run comes first, all three streams its own, its curve cut to the probes' steps
    recorded = {"command": "zoact-edge tune", "zero_shot": records[0]["zero_shot"], "tuned": records[0]["tuned"],
                "eval_curve": [{"step": 2, "accuracy": 0.5, "loss": 0.7}, {"step": 4, "accuracy": 0.6, "loss": 0.6}]}
    with_plain = probe_streams.streams_table({"records": records}, lambda bits, seed: recorded if seed == 0 else None)
    first = with_plain.splitlines()[2].split(" | ")
    assert first[0] == "| `zoact-edge tune (recorded)`" and first[2:5] == ["0", "0", "0"] and first[6] == ""
    assert first[8] == f"{records[0]['tuned']['loss']:.3f}"  # no evaluation at the probes' steps: the final alone
    assert with_plain.splitlines()[3:] == probe_streams.streams_table({"records": records}).splitlines()[2:]


def test_ablate_runs_a_named_run_once_and_records_its_batch_order(model_dirs, tmp_path, capsys):
    """tools/ablate.py end to end on the tiny model: one named run, its record (settings, curve, batch order),
    and a second call that finds it done and runs nothing."""
    import ablate

    out = tmp_path / "abl.json"
    argv = ["--runs", "r16-rank-lr1e-3", "--model", str(model_dirs["llama"]), "--budget", "4", "--points", "2",
            "--batch-size", "4", "--eval-samples", "8", "--extra", "--calib-samples 8 --max-length 24",
            "--output", str(out)]
    ablate.main(argv)
    records = json.loads(out.read_text())["records"]
    assert len(records) == 1
    rec = records[0]
    assert (rec["name"], rec["batch_order"], rec["steps"], rec["forwards"]) == ("r16-rank-lr1e-3", "random", 2, 4)
    assert rec["settings"] == {"rank": 16, "perturb": "rank", "lr": 1e-3, "eps": 1e-3}
    assert [f for f, _ in rec["curve"]] == [0, 2, 4]  # zero-shot, the one evaluation, the final one
    capsys.readouterr()
    ablate.main(argv)  # already in the file: skipped
    assert len(json.loads(out.read_text())["records"]) == 1 and "r16-rank-lr1e-3" not in capsys.readouterr().out


def _append_many(path: str, tag: str, n: int) -> None:
    from results_io import locked_update

    for i in range(n):
        locked_update(Path(path), lambda d: d["records"].append({"tag": tag, "i": i}))


def test_results_files_lose_no_record_to_a_process_beside_them(tmp_path):
    """Two processes appending to one results file at once (benchmarks run side by side): every record of
    both is there, each process' in its own order."""
    import multiprocessing

    path = tmp_path / "results.json"
    procs = [multiprocessing.get_context("spawn").Process(target=_append_many, args=(str(path), tag, 40))
             for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    records = json.loads(path.read_text())["records"]
    for tag in ("a", "b"):
        assert [r["i"] for r in records if r["tag"] == tag] == list(range(40))


def test_reading_a_results_file_writes_nothing(tmp_path):
    """A tool that only reads a results file (to skip runs already there, or to print a table) leaves it
    byte for byte as it was, and creates none where there is none."""
    from results_io import locked_update, read_results

    path = tmp_path / "results.json"
    assert read_results(path) == {"records": []} and not path.exists()
    locked_update(path, lambda d: d["records"].append({"x": 1}))
    path.write_text(path.read_text() + "\n")  # a byte no writer of ours would leave
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    assert read_results(path) == {"records": [{"x": 1}]}
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_budget_table_reads_each_long_run_with_its_loss_and_sealed_test():
    rec = {"task": "rotten-tomatoes", "method": "zoact", "seed": 0, "forwards": 1500,
           "settings": {"lr": 0.001, "eps": 0.001, "schedule": "cosine"}, "val_loss": 0.52764,
           "curve": [[0, 0.545], [750, 0.7], [1500, 0.745]], "test_accuracy": 0.751}
    row = budget_tables.budget_table({"records": [rec, {**rec, "test_accuracy": None}]}).splitlines()[2:]
    assert row[0].endswith("| 0.700 / 0.745 (at 750 / 1500) | 0.528 | 75.1 |") and "schedule cosine" in row[0]
    assert row[1].endswith("| 0.528 | n/a |")


def test_budget_means_pool_seeds_and_compare_with_zoact_under_the_same_options():
    def rec(method, seed, test, settings, val=0.7, loss=0.5):
        return {"task": "rotten-tomatoes", "method": method, "seed": seed, "forwards": 1500, "settings": settings,
                "val_accuracy": val, "val_loss": loss, "curve": [[0, 0.5], [1500, val]], "test_accuracy": test}

    cos, cos4 = {"lr": 0.001, "eps": 0.001, "schedule": "cosine"}, {"lr": 0.004, "eps": 0.001, "schedule": "cosine"}
    recs = ([rec("zoact", s, t, cos) for s, t in [(0, 0.75), (1, 0.77), (2, 0.73)]]
            + [rec("mezo", s, t, {**cos, "lr": 1e-4}) for s, t in [(0, 0.70), (1, 0.71), (2, 0.72)]]
            + [rec("subspace", s, t, cos4) for s, t in [(0, 0.76), (1, 0.74), (2, 0.75)]]
            + [rec("zoact", 0, 0.72, {"lr": 0.001, "eps": 0.001})])  # one seed: not pooled, not a reference
    rows = budget_tables.budget_means_table({"records": recs}).splitlines()[2:]
    assert [r.split(" | ")[2] for r in rows] == ["mezo", "subspace", "zoact"]
    mezo, sub, zo = rows
    # by hand: mezo 71.0 ± 0.8 against zoact 75.0 ± 1.6 (population sd), ranges apart; subspace's overlap
    assert "| 0, 1, 2 |" in mezo and "| 71.0 ± 0.8 |" in mezo and mezo.endswith("| -4.0 |")
    assert sub.endswith("| +0.0 (inside the spread) |")
    assert "| 75.0 ± 1.6 |" in zo and zo.endswith("| — |")
    # README's sentence: only ZO-Act groups with three seeds or more, each method against it
    line = budget_tables.longer_budget({"records": recs})
    assert line == (" At 1,500 forwards with `--schedule cosine` on rotten-tomatoes (3 seeds): ZO-Act 75.0 ± 1.6%, "
                    "MeZO 71.0 ± 0.8% (-4.0 points, 3 seeds), random subspaces 75.0 ± 0.8% (+0.0 points, inside the "
                    "spread, 3 seeds).")
    assert budget_tables.longer_budget({"records": recs[:2] + recs[3:]}) == ""  # ZO-Act at two seeds: no sentence


def test_plot_command_draws_one_curve_per_configuration_and_refuses_a_missing_file(tmp_path, capsys):
    def rec(method, seed, settings):
        return {"task": "rotten-tomatoes", "method": method, "seed": seed, "forwards": 8, "settings": settings,
                "curve": [[0, 0.5], [4, 0.6 + seed / 100], [8, 0.7]], "val_accuracy": 0.7}

    data = {"records": [rec("zoact", s, {"lr": 1e-3}) for s in (0, 1)]
            + [rec("zoact", 0, {"lr": 1e-3, "schedule": "cosine"}), rec("mezo", 0, {"lr": 1e-4})]}
    src = tmp_path / "long.json"
    src.write_text(json.dumps(data))
    bench_convergence.main(["plot", str(src)])
    png = tmp_path / "long.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "long.json", "long.png"]  # no temp file left beside it
    labels = bench_convergence.plot(data, tmp_path / "again.png")
    assert sorted(labels) == ["mezo (n=1)", "zoact lr 0.001 (n=2)", "zoact lr 0.001, schedule cosine (n=1)"]
    with pytest.raises(SystemExit, match="no results file"):
        bench_convergence.main(["plot", str(tmp_path / "missing.json")])


def test_standing_says_the_verdict_from_the_spread_and_never_splits_a_mean_from_its_sd():
    def rec(task, method, seed, test):
        return {"task": task, "method": method, "seed": seed, "forwards": 300, "test_accuracy": test}

    recs = ([rec("rotten-tomatoes", "zoact", s, t) for s, t in [(0, 0.70), (1, 0.72), (2, 0.74)]]
            + [rec("rotten-tomatoes", "mezo", s, t) for s, t in [(0, 0.60), (1, 0.61), (2, 0.62)]]
            + [rec("tweets", "zoact", s, t) for s, t in [(0, 0.43), (1, 0.44), (2, 0.42)]]
            + [rec("tweets", "mezo", s, t) for s, t in [(0, 0.42), (1, 0.43), (2, 0.44)]])
    text = readme_results.standing({"records": recs})
    flat = " ".join(text.splitlines())
    # by hand (population sd): 72.0 ± 1.6 vs 61.0 ± 0.8 apart; tweets 43.0 ± 0.8 twice, inside
    assert "beats MeZO on some tasks only" in flat
    assert "rotten-tomatoes: ZO-Act 72.0 ± 1.6%, MeZO 61.0 ± 0.8%;" in flat
    assert "tweets: ZO-Act 43.0 ± 0.8%, MeZO 43.0 ± 0.8% (inside the spread)" in flat
    lines = text.splitlines()
    assert len(lines) > 1 and all(len(row) <= 110 for row in lines)
    assert not any(row.endswith("±") or row.startswith("±") or "\0" in row for row in lines)
    # every width puts the break somewhere else; none lands inside "x ± y%"
    for pad in range(40):
        rows = readme_results.standing({"records": [{**r, "task": "t" * pad + r["task"]} for r in recs]}).splitlines()
        assert not any(row.endswith("±") or row.startswith("±") or row.endswith(" ") for row in rows)


def test_repro_default_runs_tune_in_fresh_processes_at_each_thread_count(model_dirs, tmp_path, monkeypatch):
    """Each run is its own process at its own torch thread count; two runs at one count are bit-identical."""
    monkeypatch.setattr(repro_default, "PATH", tmp_path / "repro.json")
    tiny = ["--model", str(model_dirs["llama"]), "--steps", "3", "--batch-size", "4", "--calib-samples", "8",
            "--rank", "4", "--eval-samples", "16", "--max-length", "24"]
    repro_default.main(["--threads", "1", "--repeats", "2", "--", *tiny])
    repro_default.main(["--threads", "2", "--", *tiny])
    records = json.loads((tmp_path / "repro.json").read_text())["records"]
    assert [(r["threads"], r["environment"]["torch_threads"]) for r in records] == [(1, 1), (1, 1), (2, 2)]
    assert records[0]["tuned"] == records[1]["tuned"] and records[0]["zero_shot"] == records[1]["zero_shot"]
    assert records[0]["tuned"]["loss"] != records[0]["zero_shot"]["loss"]  # it trained
    table = repro_default.repro_table({"records": records}).splitlines()
    assert len(table) == 2 + 3 and all(repr(r["tuned"]["loss"]) in row for r, row in zip(records, table[2:]))
    with pytest.raises(SystemExit):
        repro_default.main(["--", *tiny, "--output", str(tmp_path / "x")])
