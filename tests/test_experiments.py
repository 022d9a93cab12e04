"""experiments/reproduce.py: runs resume and are skipped when summarized, diverged runs are
recorded as such, and the report rebuilds docs/results.md's tables from the summaries alone."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"


@pytest.fixture
def reproduce(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reproduce", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(module, "FIGURES", tmp_path / "docs" / "figures" / "results")
    results_md = tmp_path / "docs" / "results.md"
    results_md.parent.mkdir(parents=True)
    results_md.write_text(f"# Results\n\n{module.BEGIN}\nold\n{module.END}\n\nkept\n")
    monkeypatch.setattr(module, "RESULTS_MD", results_md)
    tiny = module.Task(
        "digits",
        "val_acc",
        epochs=1,
        flags=("--dataset", "digits", "--max-steps-per-epoch", "2"),
        plan_flags=("--dataset", "digits", "--batches", "2", "--samples", "2"),
        adaptive_flags=("--adaptive-precision", "2", "--variance-every", "1"),
    )
    monkeypatch.setattr(module, "TASKS", {"digits": tiny})
    return module


def test_the_grid_names_every_quantizer_and_bit_width(reproduce):
    names = [c.name for c in reproduce.configs()]
    assert names[:2] == ["exact", "qat"]
    assert {f"{q}{b}" for q in ("ptq", "psq", "bhq", "rht") for b in (3, 4, 5, 6, 8)} <= set(names)
    rht = next(c for c in reproduce.configs() if c.name == "rht4")
    assert rht.flags == ("--grad-quantizer", "rht") and rht.preset == "psq4"


def test_a_checkpoint_without_summary_resumes(reproduce):
    task, config = reproduce.TASKS["digits"], reproduce.configs()[1]
    assert "--resume" not in reproduce.command(task, config, 0)
    run = reproduce.run_dir(task, config, 0)
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    saved = {"config": {"epochs": task.epochs}}
    (run / "config.json").write_text(json.dumps(saved))
    cmd = reproduce.command(task, config, 0)
    assert cmd[cmd.index("--resume") + 1] == str(run)
    full = reproduce.command(task, config, 0, resume=False)  # what its summary records
    assert "--resume" not in full and full[full.index("--out") + 1] == str(run)
    # a run directory of another schedule (the task's epochs changed since) is not resumed: a
    # resume keeps its own epochs, and would be summarized under the new schedule
    (run / "config.json").write_text(json.dumps({"config": {"epochs": task.epochs + 3}}))
    with pytest.raises(RuntimeError, match=f"holds a run of {task.epochs + 3} epochs"):
        reproduce.command(task, config, 0)


def test_the_variance_is_measured_on_qat_seed_0_whatever_the_seeds(reproduce, monkeypatch):
    """``--seeds 2`` still measures on QAT seed 0's checkpoint (the plan's model), once;
    ``--no-variance`` trains only."""
    task = reproduce.TASKS["digits"]
    for seed in (0, 2):  # both checkpoints exist: the measurement must pick seed 0's
        run = reproduce.run_dir(task, reproduce.QAT, seed)
        run.mkdir(parents=True)
        (run / "checkpoint.pt").write_bytes(b"")
        reproduce.summary_path(task, reproduce.QAT, seed).parent.mkdir(parents=True, exist_ok=True)
        reproduce.summary_path(task, reproduce.QAT, seed).write_text("{}")
    monkeypatch.setattr(reproduce, "report", lambda tasks: "")
    monkeypatch.setattr(reproduce, "write_report", lambda markdown: None)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append(cmd))
    assert reproduce.main(["--seeds", "2", "--configs", "qat", "--no-variance"]) == 0
    assert calls == []
    assert reproduce.main(["--seeds", "2", "--configs", "qat"]) == 0
    (cmd,) = calls
    assert cmd[cmd.index("--checkpoint") + 1] == str(
        reproduce.run_dir(task, reproduce.QAT, 0) / "checkpoint.pt"
    )


def test_a_variance_measurement_is_done_only_when_its_last_file_is_written(reproduce, monkeypatch):
    """``fqtorch variance`` writes variance.json before its profile: one stopped in the profile
    left it alone, and is measured again; one that wrote variance_details.json is skipped."""
    task = reproduce.TASKS["digits"]
    run = reproduce.run_dir(task, reproduce.QAT, 0)
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    out = reproduce.RESULTS / "digits" / "variance"
    out.mkdir(parents=True)
    (out / "variance.json").write_text("{}")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append(cmd))
    assert reproduce.measure_variance(task) == out and len(calls) == 1
    (out / "variance_details.json").write_text("{}")
    assert reproduce.measure_variance(task) == out and len(calls) == 1


@pytest.mark.slow
def test_runs_once_then_skips_and_reports(reproduce, monkeypatch):
    monkeypatch.setattr(reproduce, "measure_variance", lambda *args: None)  # its own test
    # two real runs at a time, one thread each
    assert reproduce.main(["--seeds", "0", "--configs", "qat", "bhq4", "--jobs", "2"]) == 0
    summary = json.loads((reproduce.RESULTS / "digits" / "bhq4_s0.json").read_text())
    assert summary["diverged"] is False and summary["final"]["epochs"] == 1
    assert summary["environment"]["threads"] == str(reproduce.job_threads(2))
    assert summary["curve"][0]["steps"] == 2
    text = reproduce.RESULTS_MD.read_text()
    assert "| bhq4 |" in text and "| qat |" in text and "old" not in text and "kept" in text
    assert (reproduce.FIGURES / "digits_curves.png").stat().st_size > 0

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    assert reproduce.main(["--seeds", "0", "--configs", "qat", "bhq4"]) == 0
    assert calls == []  # both summarized: nothing trains again


def test_a_non_finite_stop_is_diverged_and_other_failures_raise(reproduce, monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)  # the fixture's runs/ lie under it
    task, config = reproduce.TASKS["digits"], reproduce.configs()[1]
    run = reproduce.run_dir(task, config, 0)

    def fake(stderr_line, code):
        def run_(*args, **kwargs):
            run.mkdir(parents=True, exist_ok=True)
            (run / "metrics.jsonl").write_text("")
            return subprocess.CompletedProcess(args, code, stderr=stderr_line)

        return run_

    monkeypatch.setattr(subprocess, "run", fake("error: non-finite loss or gradient at ...", 3))
    monkeypatch.setattr(reproduce, "environment", lambda threads=None: {})
    summary = reproduce.train(task, config, 0)
    assert summary["diverged"] and "non-finite" in summary["error"]
    assert str(tmp_path) not in summary["command"] and " --out runs/" in summary["command"]
    assert reproduce.cell([summary], "val_acc") == "diverged (1/1)"

    # other stops: their own status (2), whatever the text says
    monkeypatch.setattr(subprocess, "run", fake("error: non-finite in a file name", 2))
    with pytest.raises(RuntimeError, match="non-finite in a file name"):
        reproduce.train(task, config, 1)
    monkeypatch.setattr(subprocess, "run", fake("error: --data-dir x does not exist", 2))
    with pytest.raises(RuntimeError, match="does not exist"):
        reproduce.train(task, config, 1)
    monkeypatch.setattr(subprocess, "run", fake("interrupted", 130))
    with pytest.raises(KeyboardInterrupt):
        reproduce.train(task, config, 1)


def test_a_real_run_that_diverges_is_summarized_as_diverged(reproduce, monkeypatch):
    """fqtorch train itself, at a learning rate no run survives: its stops (in the first epoch,
    before metrics.jsonl has a line; or on a validation loss that is NaN) are summarized as
    diverged, not raised (the grid went on failing on them), and the exit status is the
    library's."""
    from fqtorch.train.errors import EXIT_DIVERGED

    assert reproduce.EXIT_DIVERGED == EXIT_DIVERGED
    task, config = reproduce.TASKS["digits"], reproduce.configs()[1]
    real = reproduce.command
    for seed, lr, extra in ((0, "1e6", ()), (1, "1e30", ("--nonfinite", "skip"))):
        monkeypatch.setattr(
            reproduce, "command", lambda *a, more=("--lr", lr, *extra), **k: [*real(*a, **k), *more]
        )
        summary = reproduce.train(task, config, seed)
        assert summary["diverged"] and summary["curve"] == [], summary
        assert reproduce.summary_path(task, config, seed).exists()


def test_claims_read_the_numbers(reproduce):
    task = reproduce.Task("text", "val_loss", epochs=1)

    def run(config, loss, diverged=False, seeds=2):  # the same value on each seed
        return [
            {"config": config, "seed": s, "diverged": diverged, "final": {"val_loss": loss}}
            for s in range(seeds)
        ]

    runs = {
        "qat": run("qat", 2.0),
        "bhq5": run("bhq5", 2.02),  # 1% worse: does not hold
        **{f"{q}3": run(f"{q}3", 2.1) for q in ("psq", "bhq", "rht")},
        "ptq3": run("ptq3", 2.5),
    }
    variance = {
        "model": "m",
        "results": [
            {"quantizer": q, "bits": b, "quantization_variance": v * 4.0 ** (4 - b),
             "bias_z_rms": 1.0, "bias_z_max": 2.0, "bias_z_limit": 3.0, "layers": []}
            for q, v in (("ptq", 3.0), ("psq", 2.0), ("bhq", 1.0)) for b in (3, 4, 5, 6)
        ],
    }  # fmt: skip
    rows = reproduce.claims(task, runs, variance)
    held = {row.split(" | ")[0].strip("| "): row.split(" | ")[1] for row in rows}
    assert held == {
        "5-bit BHQ within 0.5% of QAT": "no",
        "low-bit PTQ fails first": "yes",
        "BHQ ≤ PSQ ≤ PTQ in variance": "yes",
        "the FQT gradient is unbiased": "yes",
        "variance falls ≈ 4× per bit": "yes",
    }
    variance["results"][0]["bias_z_max"] = 50.0  # informational only: still unbiased
    held = {
        row.split(" | ")[0].strip("| "): row.split(" | ")[1]
        for row in reproduce.claims(task, runs, variance)
    }
    assert held["the FQT gradient is unbiased"] == "yes"
    variance["results"][0]["bias_passed"] = False  # one configuration fails the bias test
    runs["bhq5"] = run("bhq5", 2.005)
    rows = reproduce.claims(task, runs, variance)
    held = {row.split(" | ")[0].strip("| "): row.split(" | ")[1] for row in rows}
    assert held["the FQT gradient is unbiased"] == "no"
    assert held["5-bit BHQ within 0.5% of QAT"] == "yes"

    def verdicts(**changed):
        rows = reproduce.claims(task, {**runs, **changed}, None)
        return {row.split(" | ")[0].strip("| "): row.split(" | ")[1:3] for row in rows}

    # one seed decides nothing (the comparison table asks for 2 too)
    assert verdicts(bhq5=run("bhq5", 2.005, seeds=1))["5-bit BHQ within 0.5% of QAT"][0] == (
        "not decided (1 seed)"
    )
    # a diverged seed is not averaged away: the survivors' mean would say "yes"
    half = run("bhq5", 2.005) + run("bhq5", 0.0, diverged=True, seeds=1)
    verdict, number = verdicts(bhq5=half)["5-bit BHQ within 0.5% of QAT"]
    assert verdict == "no" and "1 of 3 BHQ 5-bit runs diverged" in number
    # PTQ failing by diverging is the claim at its strongest: the row stays, and says it
    gone = verdicts(ptq3=run("ptq3", 0.0, diverged=True))["low-bit PTQ fails first"]
    assert gone[0] == "yes" and "ptq all diverged" in gone[1]
    # 2 of 3 diverged and the survivor good: still the worst
    most = run("ptq3", 0.0, diverged=True) + run("ptq3", 1.9, seeds=1)
    assert verdicts(ptq3=most)["low-bit PTQ fails first"][0] == "yes"
    # another quantizer diverging where PTQ did not: PTQ did not fail first
    assert verdicts(bhq3=run("bhq3", 0.0, diverged=True))["low-bit PTQ fails first"][0] == "no"
    # every one diverged: a tie, not PTQ first by the order of the list
    every = {f"{q}3": run(f"{q}3", 0.0, diverged=True) for q in ("ptq", "psq", "bhq", "rht")}
    assert verdicts(**every)["low-bit PTQ fails first"][0] == "not decided (tie)"
    # one seed decides nothing here either
    assert verdicts(ptq3=run("ptq3", 2.5, seeds=1))["low-bit PTQ fails first"][0] == (
        "not decided (1 seed)"
    )


# ----------------------------------------------------- formats, planned and adaptive precision
def test_the_grid_has_the_formats_the_plan_and_adaptive(reproduce):
    from fqtorch import FQTConfig

    by_name = {c.name: c for c in reproduce.configs()}
    formats = ("fp8_e4m3", "mxfp4_sr", "mxfp4_rht_sr", "nvfp4_sr", "nvfp4_rht_sr")
    for name in formats:
        assert name in FQTConfig.presets() and by_name[name].preset == name
        assert by_name[name].kind == "format"
    assert by_name["plan"].kind == "plan" and by_name["adaptive"].kind == "adaptive"
    task = reproduce.TASKS["digits"]
    plan = str(reproduce.plan_path(task))
    assert plan.endswith("results/digits/plan/plan.json")
    fixed = reproduce.command(task, by_name["plan"], 0)
    adaptive = reproduce.command(task, by_name["adaptive"], 0)
    assert fixed[fixed.index("--bits-plan") + 1] == plan and "--adaptive-precision" not in fixed
    assert adaptive[adaptive.index("--bits-plan") + 1] == plan
    assert "--adaptive-precision" in adaptive and "--variance-every" in adaptive
    assert "--bits-plan" not in reproduce.command(task, by_name["bhq4"], 0)
    for real in _real_tasks().values():  # the fixture replaced TASKS: the script's own
        assert "--adaptive-precision" in real.adaptive_flags
        assert "--variance-every" in real.adaptive_flags
        dataset = real.flags[real.flags.index("--dataset") + 1]
        assert real.plan_flags[real.plan_flags.index("--dataset") + 1] == dataset


def _real_tasks():
    spec = importlib.util.spec_from_file_location("reproduce_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_real"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["reproduce_real"]
    return module.TASKS


METRICS = ("val_acc", "val_loss")


def _runs(name, values, diverged=()):
    return [
        {"config": name, "seed": s, "diverged": s in diverged, "final": dict.fromkeys(METRICS, v)}
        for s, v in enumerate(values)
    ]


def test_matching_qat_is_no_worse_than_the_larger_std(reproduce):
    qat = _runs("qat", [0.990, 0.995, 1.000])  # mean 0.995, std 0.005
    match = reproduce.matches_qat
    assert match(_runs("a", [0.990, 0.991, 0.992]), qat, "val_acc") is True  # |Δ| 0.004
    assert match(_runs("b", [0.988, 0.989, 0.990]), qat, "val_acc") is False  # |Δ| 0.006
    # the configuration's own spread counts when it is the larger (std 0.01, |Δ| 0.008)
    assert match(_runs("c", [0.977, 0.987, 0.997]), qat, "val_acc") is True
    assert match(_runs("d", [0.998, 0.999, 1.000]), qat, "val_acc") is True  # better, |Δ| 0.004
    # better than QAT by more than a std also matches (no worse); for a loss, lower is better
    assert match(_runs("e", [1.003, 1.003, 1.003]), qat, "val_acc") is True
    assert match(_runs("e", [1.003, 1.003, 1.003]), qat, "val_loss") is False
    assert match(_runs("e", [0.987, 0.987, 0.987]), qat, "val_loss") is True
    assert match(_runs("f", [0.995, 0.995, 0.995], diverged=(2,)), qat, "val_acc") is False
    assert match(_runs("g", [0.995]), qat, "val_acc") is None  # one seed: not decided


def _plan():
    """Two layers: a (grad_input GEMM 0: the first layer) and b; the plan's choices."""
    layers = [
        {"name": "a", "grad_quantizer": "bhq", "grad_bits": 4, "grad_weight_quantizer":
         "per_column", "grad_weight_bits": 6, "grad_macs": 0, "grad_weight_macs": 100},
        {"name": "b", "grad_quantizer": "psq", "grad_bits": 5, "grad_weight_quantizer":
         "per_column", "grad_weight_bits": 4, "grad_macs": 300, "grad_weight_macs": 600},
    ]  # fmt: skip
    return {
        "budget": 0.1,
        "sampling_variance": 1.0,
        "predicted_quantization_variance": 0.05,
        "measured_quantization_variance": 0.04,
        "feasible": True,
        "layers": layers,
    }


def test_average_bits_of_uniform_plan_and_adaptive(reproduce):
    plan = _plan()
    macs = reproduce.layer_macs(plan)
    assert macs == {"a": {"grad": 0, "grad_weight": 100}, "b": {"grad": 300, "grad_weight": 600}}
    by_name = {c.name: c for c in reproduce.configs()}
    # uniform: every layer's branches alike; Σ macs = 1000, of which grad_input 300
    assert reproduce.uniform_bits(macs, by_name["bhq4"]) == pytest.approx((300 * 4 + 700 * 8) / 1e3)
    assert reproduce.uniform_bits(macs, by_name["ptq3"]) == pytest.approx((300 * 3 + 700 * 8) / 1e3)
    assert reproduce.gradient_choices(by_name["rht4"]) == {
        "grad": ("rht", 4),
        "grad_weight": ("per_column", 8),
    }
    assert reproduce.uniform_bits(macs, by_name["qat"]) == 32.0  # exact gradients
    assert reproduce.uniform_bits(macs, by_name["mxfp4_sr"]) == pytest.approx(4.25)  # + scales
    # the plan: a's weight gradient 6 bits on 100, b's 5 on 300 and 4 on 600
    fixed = (100 * 6 + 300 * 5 + 600 * 4) / 1e3
    assert reproduce.average_bits(macs, reproduce.plan_bits(plan)) == pytest.approx(fixed)
    assert reproduce.adaptive_bits(plan, [], 40) == pytest.approx(fixed)  # no change: the plan
    # adaptive: at step 10 b's weight gradient 4 -> 8 bits, at step 30 a's 6 -> 4, of 40 steps
    events = [
        {"event": "precision", "step": 30, "layer": "a", "bits": [4, 6], "new_bits": [4, 4],
         "quantizers": ["bhq", "per_column"]},
        {"event": "precision", "step": 10, "layer": "b", "bits": [5, 4], "new_bits": [5, 8],
         "quantizers": ["psq", "per_column"]},
    ]  # fmt: skip
    second = (100 * 6 + 300 * 5 + 600 * 8) / 1e3
    third = (100 * 4 + 300 * 5 + 600 * 8) / 1e3
    want = (10 * fixed + 20 * second + 10 * third) / 40
    assert reproduce.adaptive_bits(plan, events, 40) == pytest.approx(want)
    assert [s for s, _ in reproduce.bits_timeline(plan, events)] == [0, 10, 30]
    events[0]["bits"] = [4, 5]  # not a's bits at step 30: another plan's events
    with pytest.raises(ValueError, match="expected"):
        reproduce.adaptive_bits(plan, events, 40)


def test_the_comparison_and_the_claim(reproduce, monkeypatch):
    plan = _plan()
    reproduce.plan_path(reproduce.TASKS["digits"]).parent.mkdir(parents=True)
    reproduce.plan_path(reproduce.TASKS["digits"]).write_text(json.dumps(plan))
    task = reproduce.TASKS["digits"]

    def runs(name, values, events=()):
        rs = _runs(name, values)
        for r in rs:
            r["curve"] = [{"epoch": 1, "steps": 40, "val_acc": r["final"]["val_acc"]}]
            r["precision_events"] = list(events)
        return rs

    qat = [0.990, 0.995, 1.000]
    grid = {
        "qat": runs("qat", qat),
        "bhq4": runs("bhq4", qat),  # matches at (300 * 4 + 700 * 8) / 1000 = 6.8 bits
        "bhq3": runs("bhq3", [0.9, 0.9, 0.9]),  # fewer bits, does not match
        "plan": runs("plan", qat),  # matches at 4.5 bits
        "adaptive": runs("adaptive", [0.9, 0.91, 0.9]),
    }
    text = "\n".join(reproduce.comparison(task, grid, plan))
    assert "| plan | plan | 99.50 ± 0.50 | +0.00 | yes | 4.50 |" in text
    assert "| bhq4 | uniform | 99.50 ± 0.50 | +0.00 | yes | 6.80 |" in text
    assert "| bhq3 | uniform |" in text and "| no | 6.50 |" in text
    assert "smallest matching is bhq4 at 6.80 bits;" in text  # 3 seeds: nothing more said
    # rows with no more bits than the plan's not run yet: they could still match
    assert "- plan: not decided — 4.50 bits, but bhq3_w3, bhq4_w4, mxfp4_rht_sr, mxfp4_sr" in text
    assert "- adaptive: **not held** — does not match QAT" in text
    low = [0.95, 0.96, 0.95]  # run, and not matching: the claim is decided
    for name in ("bhq3_w3", "bhq4_w4", "mxfp4_sr", "mxfp4_rht_sr", "nvfp4_sr", "nvfp4_rht_sr"):
        grid[name] = runs(name, low)
    text = "\n".join(reproduce.comparison(task, grid, plan))
    assert "- plan: **held** — 4.50 bits < 6.80" in text
    grid["adaptive"] = runs("adaptive", [0.995])  # one seed: neither held nor not
    text = "\n".join(reproduce.comparison(task, grid, plan))
    assert "- adaptive: not decided — fewer than 2 finished seeds." in text
    grid["mxfp4_sr"] = runs("mxfp4_sr", qat)  # a format matches at 4.25 bits: fewer than 4.50
    text = "\n".join(reproduce.comparison(task, grid, plan))
    assert "- plan: **not held** — 4.50 bits ≥ 4.25 (mxfp4_sr)" in text
    # adaptive matching at the plan's 4.50 bits (no events); its measurements counted: every K
    # steps, 4 quantized passes at 4.50, two exact batches, 2 probe passes at (4.5 + 32) / 2
    # and 2 at 32: ((K + 4) · 4.5 + 64 + 36.5 + 64) / (K + 10)
    grid["adaptive"] = runs("adaptive", qat)
    grid["mxfp4_sr"] = runs("mxfp4_sr", low)
    text = "\n".join(reproduce.comparison(task, grid, plan))
    assert "- adaptive: **held** — 4.50 bits < 6.80" in text
    every, samples, probes = reproduce.measuring_cost(task)
    assert (samples, probes) == (4, 2)
    counted = ((every + 4) * 4.5 + 64 + 36.5 + 64) / (every + 10)
    assert counted > 6.8
    assert f"accumulate): **not held** — {counted:.2f} bits ≥ 6.80 (bhq4)" in text
    # a low-bit row (not a preset: it has flags) matches at 3 bits: not held, but held against
    # the presets alone
    grid["bhq3_w3"] = runs("bhq3_w3", qat)
    text = "\n".join(reproduce.comparison(task, grid, plan))
    assert "| bhq3_w3 | uniform | 99.50 ± 0.50 | +0.00 | yes | 3.00 |" in text
    assert (
        "- plan: **not held** — 4.50 bits ≥ 3.00 (bhq3_w3); against the library's presets "
        "alone (no flags: the quantizer × bits presets and the formats; not RHT, which takes "
        "--grad-quantizer), **held** — 4.50 bits < 6.80." in text
    )
    grid["bhq3_w3"] = grid["bhq3_w3"][:2]  # two seeds: the claim says so
    text = "\n".join(reproduce.comparison(task, grid, plan))
    assert "smallest matching is bhq3_w3 at 3.00 bits (2 seeds);" in text
    markdown = "\n".join(reproduce.planned(task, grid))
    assert "| b | 300 | psq5 |" in markdown
    assert (reproduce.FIGURES / "digits_adaptive_bits.png").stat().st_size > 0


def test_the_plan_is_made_once_on_qat_seed_0(reproduce, monkeypatch):
    task = reproduce.TASKS["digits"]
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(_plan()))
        return subprocess.CompletedProcess(cmd, 0, stdout="table\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    qat_run = reproduce.run_dir(task, reproduce.QAT, 0)
    summary = reproduce.summary_path(task, reproduce.QAT, 0)
    with pytest.raises(SystemExit, match="is gone"):  # summarized, but its checkpoint removed
        summary.parent.mkdir(parents=True)
        summary.write_text("{}")
        reproduce.make_plan(task)
    qat_run.mkdir(parents=True)
    (qat_run / "checkpoint.pt").write_bytes(b"")
    path = reproduce.make_plan(task)
    assert path == reproduce.plan_path(task) and len(calls) == 1
    cmd = calls[0]
    assert cmd[cmd.index("--checkpoint") + 1] == str(qat_run / "checkpoint.pt")
    assert cmd[cmd.index("--budget") + 1] == "0.1"
    assert (path.parent / "plan_table.txt").read_text() == "table\n"
    reproduce.make_plan(task)
    assert len(calls) == 1  # reused


def test_cell_reports_a_spread_only_over_two_or_more_seeds(reproduce):
    """One finished seed has no spread: its cell is the value alone, not "± 0.000"."""

    def run(value, diverged=False):
        return {"final": {"val_loss": value}, "diverged": diverged}

    assert reproduce.cell([run(0.9431)], "val_loss") == "0.943"
    assert reproduce.cell([run(1.0), run(2.0)], "val_loss") == "1.500 ± 0.707"
    assert reproduce.cell([run(1.0), run(0, True)], "val_loss") == "1.000 (1/2 diverged)"


def test_flatness_and_provenance_lines(reproduce):
    """QAT's curve is called flat only when every seed's last epoch moved the validation loss by
    less than 1%; the provenance line counts each summary's commit and versions."""
    task = reproduce.TASKS["digits"]  # the fixture's one task

    def qat(*losses, commit="abc1234"):
        curve = [{"epoch": i + 1, "val_loss": v} for i, v in enumerate(losses)]
        env = {"commit": commit, "torch": "2.13.0+cpu", "python": "3.11.7"}
        return {"curve": curve, "diverged": False, "environment": env}

    steep = {"qat": [qat(1.2, 1.0, 0.98), qat(1.2, 1.0, 0.995)]}
    assert "**not flat**: QAT was still improving" in reproduce.flatness(task, steep)
    assert "+2.0%, +0.5%" in reproduce.flatness(task, steep)
    flat = {"qat": [qat(1.2, 1.0, 0.995), qat(1.2, 1.0, 1.001, commit="def5678")]}
    assert "**flat**" in reproduce.flatness(task, flat)
    rising = {"qat": [qat(1.2, 1.0, 1.3)]}  # a 30% rise is not flat either
    assert "**not flat**: QAT's last epoch moved it" in reproduce.flatness(task, rising)
    assert "no finished run" in reproduce.flatness(task, {"qat": [qat(1.0)]})
    line = reproduce.provenance(flat)
    assert "`abc1234` (1), `def5678` (1)" in line and "Python `3.11.7` (2)" in line
    assert "2 summaries from before the start was recorded" in line
    # the commit a run started from counts, not the checkout's when its summary was written
    started = qat(1.0, 1.0, commit="fff0000")
    started["environment"].update(started_commit="abc1234-dirty", resumed_commits=["def5678"])
    line = reproduce.provenance({"qat": [started]})
    assert "`abc1234-dirty` (1)" in line and "fff0000" not in line
    assert "1 resumed under other code" in line and "before the start" not in line


def test_the_schedule_check_runs_qat_seed_0_on_twice_the_epochs(reproduce, monkeypatch):
    """``qat_long`` trains QAT seed 0 only, on ``LONG_FACTOR`` times the task's epochs, whatever
    seeds are asked for; the report compares it with QAT seed 0 by the 1% rule."""
    task = reproduce.TASKS["digits"]
    cmd = reproduce.command(task, reproduce.LONG, 0)
    assert cmd[cmd.index("--epochs") + 1] == str(2 * task.epochs)
    assert cmd[cmd.index("--preset") + 1] == "qat"
    trained = []
    monkeypatch.setattr(reproduce, "train", lambda t, c, s, *_: trained.append((c.name, s)) or {
        "diverged": False, "final": {t.metric: 0.5}, "train_seconds": 1.0})  # fmt: skip
    assert reproduce.main(["--seeds", "0", "1", "2", "--configs", "qat", "qat_long"]) == 0
    assert trained == [("qat", 0), ("qat", 1), ("qat", 2), ("qat_long", 0)]
    trained.clear()
    assert reproduce.main(["--seeds", "1", "--configs", "qat_long"]) == 0
    assert trained == []  # seed 0 only

    def run(*values, seed=0, key="val_loss", loss=None):
        curve = [{"epoch": i + 1, key: v} for i, v in enumerate(values)]
        for c, v in zip(curve, loss or (), strict=False):
            c["val_loss"] = v
        final = {key: values[-1], **({"val_loss": loss[-1]} if loss else {})}
        return {"curve": curve, "diverged": False, "seed": seed, "final": final}

    loss = dataclasses.replace(task, metric="val_loss")
    check = reproduce.schedule_check
    qat = [run(1.2, 1.0), run(1.2, 1.02, seed=1)]  # std 0.01414 > 1% of 1.0: the threshold
    assert "has not run yet" in check(loss, {"qat": qat})
    still = check(loss, {"qat": qat, "qat_long": [run(1.1, 0.98, 0.97, 0.95)]})
    assert "0.9500 at its best (epoch 4)" in still and ": +0.0500, threshold 0.0141" in still
    assert "**not long enough**: a" in still and "still improving" in still
    assert "(std 0.0141 over 2 seeds)" in still
    enough = check(loss, {"qat": qat, "qat_long": [run(1.1, 0.995)]})
    assert ": +0.0050, threshold" in enough and "**long enough**" in enough
    assert "overfits" not in enough
    overfit = check(loss, {"qat": qat, "qat_long": [run(1.0, 0.995, 1.03)]})
    assert "**long enough**" in overfit and "ending at 1.0300 (it overfits)" in overfit
    # lower at its best, then back up past the short run: a longer schedule did help
    dip = check(loss, {"qat": qat, "qat_long": [run(1.2, 0.9, 1.05)]})
    assert ": +0.1000," in dip and "**not long enough**" in dip and "ending at 1.0500" in dip
    # the seeds' spread: a gain of 0.05 is within a spread of 0.07; one seed: 1% of the value
    noisy = [run(1.0), run(1.1, seed=1)]
    assert "**long enough**" in check(loss, {"qat": noisy, "qat_long": [run(1.0, 0.95)]})
    one = check(loss, {"qat": qat[:1], "qat_long": [run(1.0, 0.985)]})
    assert "threshold 0.0100 (one seed)" in one and "**not long enough**" in one
    # accuracy, higher is better, in percent; checked beside the loss. 1% of the error rate,
    # not of the accuracy (1% of 99.7% is more than any run could gain: a check that cannot fail)
    acc = [
        run(0.98, key="val_acc", loss=[0.10]),
        run(0.99, seed=1, key="val_acc", loss=[0.11]),  # loss std 0.0071
    ]
    better = check(
        task, {"qat": acc, "qat_long": [run(0.97, 0.995, key="val_acc", loss=[0.2, 0.1])]}
    )
    assert "accuracy 99.50 % at its best" in better and "+1.50 %" in better
    assert "threshold 0.71 %" in better and "**not long enough**: a" in better
    same = check(task, {"qat": acc, "qat_long": [run(0.97, 0.985, key="val_acc", loss=[0.2, 0.1])]})
    assert "**long enough**" in same
    # saturated accuracy (digits: 99.7%, one seed): no gain against 1% of the 0.3% error, and
    # the loss still says the longer schedule helps
    top = [run(0.997, key="val_acc", loss=[0.031])]
    flat_acc = check(
        task, {"qat": top, "qat_long": [run(0.99, 0.997, key="val_acc", loss=[0.03, 0.021])]}
    )
    assert "threshold 0.00 %" in flat_acc and "+0.0100, threshold 0.0003" in flat_acc
    assert "**not long enough** in validation loss" in flat_acc
    other_seed = {"qat": qat, "qat_long": [run(1.0, 0.5, seed=1)]}  # the check is seed 0's
    assert "has not run yet" in check(loss, other_seed)
    missing = check(loss, {"qat": qat[1:], "qat_long": [run(1.1, 0.99)]})
    assert "QAT seed 0 on 1 epochs has not" in missing
    # and the flatness line carries it
    assert "Schedule check" in reproduce.flatness(loss, {"qat": qat, "qat_long": [run(1.0, 0.99)]})


def test_an_archived_task_is_reported_not_trained(reproduce, monkeypatch, capsys):
    """A superseded task keeps its summaries in the report, under its note; training it is
    refused with one line, and the default tasks leave it out."""
    old = reproduce.Task("old", "val_acc", epochs=1, flags=("--dataset", "digits"),
                         archived="Superseded by digits.")  # fmt: skip
    monkeypatch.setitem(reproduce.TASKS, "old", old)
    summary = {"config": "qat", "seed": 0, "diverged": False, "curve": [],
               "final": {"val_acc": 0.9, "val_loss": 0.3, "epochs": 1}}  # fmt: skip
    (reproduce.RESULTS / "old").mkdir(parents=True)
    (reproduce.RESULTS / "old" / "qat_s0.json").write_text(json.dumps(summary))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing trains"))
    with pytest.raises(SystemExit):
        reproduce.main(["--tasks", "old", "--configs", "qat"])
    assert "old is archived" in capsys.readouterr().err
    assert reproduce.main(["--tasks", "old", "--report-only"]) == 0
    text = reproduce.RESULTS_MD.read_text()
    assert "### old\n\n**Archived.** Superseded by digits." in text
    trained = []
    monkeypatch.setattr(reproduce, "train", lambda t, c, s, *_: trained.append(t.name) or {
        "diverged": False, "final": {t.metric: 0.5}, "train_seconds": 1.0})  # fmt: skip
    assert reproduce.main(["--seeds", "0", "--configs", "qat"]) == 0
    assert trained == ["digits"]
    trained.clear()  # its schedule check may still run
    assert reproduce.main(["--tasks", "old", "--seeds", "0", "--configs", "qat_long"]) == 0
    assert trained == ["old"]


def test_jobs_run_in_parallel_on_split_threads(reproduce, monkeypatch, capsys):
    """--jobs 2 trains every pending run, two at a time, each on half the threads; a failed run
    stops new ones from starting and is raised; --jobs 0 is refused."""
    import threading

    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert reproduce.job_threads(1) is None and reproduce.job_threads(2) == 2
    assert reproduce.job_threads(8) == 1
    both = threading.Barrier(2, timeout=10)  # two runs must be in train() at once
    calls = []

    def fake(t, c, s, threads=None):
        calls.append((c.name, s, threads))
        both.wait()
        return {"diverged": False, "final": {t.metric: 0.5}, "train_seconds": 1.0}

    monkeypatch.setattr(reproduce, "train", fake)
    assert reproduce.main(["--seeds", "0", "1", "--configs", "qat", "--jobs", "2"]) == 0
    assert sorted(calls) == [("qat", 0, 2), ("qat", 1, 2)]
    assert "2 runs at a time, 2 thread(s) each" in capsys.readouterr().err

    started = []

    def failing(t, c, s, threads=None):
        started.append(s)
        raise RuntimeError("boom")

    monkeypatch.setattr(reproduce, "train", failing)
    with pytest.raises(RuntimeError, match="boom"):
        reproduce.main(["--seeds", "0", "1", "2", "3", "--configs", "exact", "--jobs", "1"])
    assert started == [0]  # nothing after the failure started
    started.clear()

    def one_fails(t, c, s, threads=None):
        started.append(s)
        if s == 0:
            raise RuntimeError("boom")
        time.sleep(0.3)  # still running when seed 0 fails: waited for
        finished.append(s)
        return {"diverged": False, "final": {t.metric: 0.5}, "train_seconds": 1.0}

    monkeypatch.setattr(reproduce, "train", one_fails)
    finished = []
    with pytest.raises(RuntimeError, match="boom"):
        reproduce.main(["--seeds", "0", "1", "2", "3", "--configs", "exact", "--jobs", "2"])
    assert finished == [1]  # the running one was waited for
    assert sorted(started) == [0, 1]
    err = capsys.readouterr().err
    assert "digits exact seed 0 failed: boom" in err
    assert "stopping: no new run starts; the running ones (digits exact seed 1) finish" in err
    with pytest.raises(SystemExit):
        reproduce.main(["--jobs", "0"])
    assert "--jobs takes a positive number" in capsys.readouterr().err

    def interrupted(t, c, s, threads=None):
        raise KeyboardInterrupt("fqtorch train: interrupted; saved ... (test)")

    monkeypatch.setattr(reproduce, "train", interrupted)
    assert reproduce.main(["--seeds", "0", "--configs", "exact", "--jobs", "2"]) == 130
    err = capsys.readouterr().err
    assert "digits exact seed 0 stopped: fqtorch train: interrupted" in err
    assert "resume from their last checkpoints" in err


def test_train_gives_the_run_its_threads_and_records_them(reproduce, monkeypatch):
    task, config = reproduce.TASKS["digits"], reproduce.configs()[1]
    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(kwargs)
        out = reproduce.run_dir(task, config, 0)
        out.mkdir(parents=True, exist_ok=True)
        line = {"epoch": 1, "steps": 2, "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5,
                "seconds": 3.0}  # fmt: skip
        (out / "metrics.jsonl").write_text(json.dumps(line) + "\n")
        (out / "final.json").write_text(json.dumps({"val_loss": 1.0, "val_acc": 0.5, **epochs}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    epochs = {"epochs": task.epochs}
    summary = reproduce.train(task, config, 0, threads=3)  # not this process's count
    assert seen["env"]["OMP_NUM_THREADS"] == "3" and summary["environment"]["threads"] == "3"
    seen.clear()
    reproduce.summary_path(task, config, 0).unlink()
    reproduce.train(task, config, 0)
    assert seen["env"] is None  # inherited
    # a run that finished after other epochs than the task's is not summarized
    reproduce.summary_path(task, config, 0).unlink()
    epochs["epochs"] = task.epochs + 1
    with pytest.raises(RuntimeError, match=f"finished after {task.epochs + 1} epochs"):
        reproduce.train(task, config, 0)
    assert not reproduce.summary_path(task, config, 0).exists()


def test_cost_line_counts_runs_and_projects_the_rest(reproduce):
    configs = reproduce.configs()
    runs = {configs[0].name: [{"seed": s, "train_seconds": 600.0} for s in (0, 1, 2)]}
    line = reproduce.cost(reproduce.TASKS["digits"], runs)
    total = len(configs) * 3
    assert line.startswith("Cost: 3 runs, 0.5 h of training in all")
    assert f"{total - 3} of the {total} runs" in line and "median run's 10 min" in line
    assert f"≈ {(total - 3) / 6:.1f} h more" in line
    # a slow configuration's missing seeds at its own time, not the overall median's
    runs[configs[1].name] = [{"seed": 0, "train_seconds": 36000.0}]
    line = reproduce.cost(reproduce.TASKS["digits"], runs)
    left = (total - 6) / 6 + 2 * 10  # 10 min each, and 2 seeds of 10 h
    assert f"≈ {left:.1f} h more" in line and f"; {total - 6} with none yet" in line
    # a run that diverged (in its first epoch: no time logged) is no configuration's time
    runs[configs[1].name].append({"seed": 1, "train_seconds": 0.0, "diverged": True})
    line = reproduce.cost(reproduce.TASKS["digits"], runs)
    assert f"≈ {left - 10:.1f} h more" in line  # seed 2 left, at 10 h (not at 0)
    every = {c.name: [{"seed": s, "train_seconds": 1.0} for s in (0, 1, 2)] for c in configs}
    assert "still to go" not in reproduce.cost(reproduce.TASKS["digits"], every)


def test_threshold_margin_script_counts_the_misses(capsys):
    """experiments/threshold_margin.py (the miss rates docs/method.md §7 quotes) counts, per ν,
    the seeds whose raised Monte Carlo shortfall falls below the exact one-batch value."""
    from fqtorch.stats.null import _one_batch_shortfall, _shortfall_estimate

    path = SCRIPT.parent / "threshold_margin.py"
    spec = importlib.util.spec_from_file_location("threshold_margin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--nu", "3", "--seeds", "40"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 |")]
    exact = _one_batch_shortfall(3, 0.05)
    misses = sum(_shortfall_estimate(3, 1, 0.05, s, draws=20_000) < exact for s in range(40))
    assert len(rows) == 1 and f"| {misses}/40 |" in rows[0], rows
    assert misses > 0  # ν = 3's heavy tail misses often (≈ 22%): the count is not vacuous


def test_method_checks_script_measures_the_epilogue_and_the_bf16_bias(capsys):
    """experiments/method_checks.py (docs/method.md §8 and §9's numbers): the compiled int8
    epilogue is simulate's to float32 rounding on one-signed operands, and rounding Q(G) to bf16
    shows as a bias where Q(G) shows none."""
    path = SCRIPT.parent / "method_checks.py"
    spec = importlib.util.spec_from_file_location("method_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["epilogue", "--lengths", "1024", "--seeds", "1"]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("1024 "))
    gaps = [float(v) for v in row.split()[1:]]
    assert len(gaps) == 6 and max(gaps[:3]) < 1e-6 and max(gaps) < 1e-5, row
    assert module.main(["bf16", "--samples", "500"]) == 0
    out = capsys.readouterr().out
    z = {
        r.split()[0]: float(r.split()[1])
        for r in out.splitlines()
        if r.startswith(("Q(G)", "bf16"))
    }
    assert z["Q(G)"] < 1.5 < 4 < z["bf16(Q(G))"], out
    assert module.main(["grid"]) == 0
    rows = [r.rsplit(None, 3) for r in capsys.readouterr().out.splitlines()[3:]]
    assert len(rows) == 15, rows
    # E[Q(x)] is x to a few ulp of the row's largest magnitude (docs/method.md §4), which can
    # be far more than the uniforms' 2**-24 steps where a row's range is small next to it.
    assert all(float(r[2]) < 3 for r in rows), rows
    assert float(rows[-1][3]) > 1e-3, rows  # 1000 + U[0, 1) at 8 bits
    # §5's ratios, on the BHQ test's own inputs (deterministic: the numbers docs quote)
    assert module.main(["bhq"]) == 0
    ratios = {
        r.split()[0]: float(r.split()[1])
        for r in capsys.readouterr().out.splitlines()
        if r.startswith(("similar_rows", "heavy_rows", "digits_"))
    }
    quoted = {"similar_rows": 0.928, "heavy_rows": 0.161, "digits_classifier.3": 0.995}
    quoted.update(
        {"digits_classifier.1": 0.987, "digits_features.0": 0.9, "digits_features.3": 0.787}
    )
    assert ratios == quoted


def test_make_configs_has_a_help_and_writes_the_committed_configs(tmp_path, capsys):
    """``experiments/make_configs.py --help`` says what it writes and writes nothing; run, it
    writes the committed YAML configs byte for byte (regenerating leaves ``git status`` clean)."""
    path = Path(__file__).resolve().parent.parent / "experiments" / "make_configs.py"
    spec = importlib.util.spec_from_file_location("make_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help", "--out", str(tmp_path / "help")])
    assert exit_.value.code == 0 and not (tmp_path / "help").exists()
    assert "YAML configs" in capsys.readouterr().out
    assert module.main(["--out", str(tmp_path)]) == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    committed = sorted(p.relative_to(path.parent) for p in path.parent.glob("*/*.yaml"))
    assert written == committed and len(written) == 51
    for name in written:
        assert (tmp_path / name).read_bytes() == (path.parent / name).read_bytes(), name
