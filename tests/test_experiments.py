"""experiments/reproduce.py: runs resume and are skipped when summarized, diverged runs are
recorded as such, and the report rebuilds docs/results.md's tables from the summaries alone."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
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
        "digits", "val_acc", epochs=1, flags=("--dataset", "digits", "--max-steps-per-epoch", "2")
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
    cmd = reproduce.command(task, config, 0)
    assert cmd[cmd.index("--resume") + 1] == str(run)


@pytest.mark.slow
def test_runs_once_then_skips_and_reports(reproduce, monkeypatch):
    monkeypatch.setattr(reproduce, "measure_variance", lambda *args: None)  # its own test
    assert reproduce.main(["--seeds", "0", "--configs", "qat", "bhq4"]) == 0
    summary = json.loads((reproduce.RESULTS / "digits" / "bhq4_s0.json").read_text())
    assert summary["diverged"] is False and summary["final"]["epochs"] == 1
    assert summary["curve"][0]["steps"] == 2
    text = reproduce.RESULTS_MD.read_text()
    assert "| bhq4 |" in text and "| qat |" in text and "old" not in text and "kept" in text
    assert (reproduce.FIGURES / "digits_curves.png").stat().st_size > 0

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    assert reproduce.main(["--seeds", "0", "--configs", "qat", "bhq4"]) == 0
    assert calls == []  # both summarized: nothing trains again


def test_a_non_finite_stop_is_diverged_and_other_failures_raise(reproduce, monkeypatch):
    task, config = reproduce.TASKS["digits"], reproduce.configs()[1]
    run = reproduce.run_dir(task, config, 0)

    def fake(stderr_line, code):
        def run_(*args, **kwargs):
            run.mkdir(parents=True, exist_ok=True)
            (run / "metrics.jsonl").write_text("")
            return subprocess.CompletedProcess(args, code, stderr=stderr_line)

        return run_

    monkeypatch.setattr(subprocess, "run", fake("error: non-finite loss or gradient at ...", 2))
    monkeypatch.setattr(reproduce, "environment", lambda: {})
    summary = reproduce.train(task, config, 0)
    assert summary["diverged"] and "non-finite" in summary["error"]
    assert reproduce.cell([summary], "val_acc") == "diverged (1/1)"

    monkeypatch.setattr(subprocess, "run", fake("error: --data-dir x does not exist", 2))
    with pytest.raises(RuntimeError, match="does not exist"):
        reproduce.train(task, config, 1)
    monkeypatch.setattr(subprocess, "run", fake("interrupted", 130))
    with pytest.raises(KeyboardInterrupt):
        reproduce.train(task, config, 1)


def test_claims_read_the_numbers(reproduce):
    task = reproduce.Task("text", "val_loss", epochs=1)

    def run(config, loss, diverged=False):
        return {"config": config, "seed": 0, "diverged": diverged, "final": {"val_loss": loss}}

    runs = {
        "qat": [run("qat", 2.0)],
        "bhq5": [run("bhq5", 2.02)],  # 1% worse: does not hold
        **{f"{q}3": [run(f"{q}3", 2.1)] for q in ("psq", "bhq", "rht")},
        "ptq3": [run("ptq3", 2.5)],
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
    runs["bhq5"] = [run("bhq5", 2.005)]
    rows = reproduce.claims(task, runs, variance)
    held = {row.split(" | ")[0].strip("| "): row.split(" | ")[1] for row in rows}
    assert held["the FQT gradient is unbiased"] == "no"
    assert held["5-bit BHQ within 0.5% of QAT"] == "yes"
