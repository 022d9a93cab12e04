"""Resuming a run whose options, files or process layout changed: new hyperparameters take
effect, a changed number of steps per epoch is refused, a lost config.json falls back to the
checkpoint's, a metrics line cut short is dropped; and the messages of bad options and of an
interrupted rank."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys

import pytest

from fqtorch.train import TrainingError, load_checkpoint, rundir
from fqtorch.train import loop as train_loop
from tests.train.helpers import fqtorch_main, read_metrics

SHORT = ("--max-steps-per-epoch", "2", "--quiet")


def test_hyperparameters_given_anew_take_effect(tmp_path, caplog):
    """--lr, --weight-decay, --momentum given with --resume replace the checkpoint's: the
    schedule goes on from the step reached, scaled to the new lr."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    args = ("--max-steps-per-epoch", "4", "--warmup-epochs", "0", "--quiet")
    assert fqtorch_main("train", "--epochs", "1", *args, "--out", out) == 0
    record = json.loads((out / "config.json").read_text())
    record["argv"] = ["the first start"]  # (in process argv is pytest's: mark the first one)
    (out / "config.json").write_text(json.dumps(record))
    new = ("--lr", "0.02", "--weight-decay", "0.001", "--momentum", "0.5")
    assert fqtorch_main("train", "--resume", out, "--epochs", "3", *new) == 0
    # config.json: the options in force now, the first start kept, the resume added
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["lr"] == 0.02 and record["config"]["epochs"] == 3
    assert record["argv"] == ["the first start"]
    [resumed] = record["resumes"]
    assert (resumed["step"], resumed["epoch"]) == (4, 1) and resumed["argv"] != record["argv"]
    assert {"versions", "git_commit"} <= set(resumed)
    assert "resume: lr 0.05 -> 0.02, weight_decay 0.0005 -> 0.001, momentum 0.9 -> 0.5" in (
        caplog.text
    )
    cosine_at_step_8_of_12 = 0.02 * 0.5 * (1 + math.cos(math.pi * 8 / 12))
    assert read_metrics(out)[1]["lr"] == pytest.approx(cosine_at_step_8_of_12, rel=1e-12)
    decay, no_decay = load_checkpoint(out / "checkpoint.pt")["optimizer"]["param_groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.001, 0.0)
    assert decay["momentum"] == no_decay["momentum"] == 0.5
    assert decay["initial_lr"] == 0.02


def test_other_steps_per_epoch_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert fqtorch_main("train", "--epochs", "1", *SHORT, "--out", out) == 0
    code = fqtorch_main("train", "--resume", out, "--epochs", "2", "--max-steps-per-epoch", "3")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        f"fqtorch train: error: {out / 'checkpoint.pt'} was written by a run of 2 steps per "
        "epoch; this run's epochs have 3 (--max-steps-per-epoch, --batch-size or the number of "
        "processes changed): resume with the run's own, or start a new run"
    )
    assert len(read_metrics(out)) == 1


def test_unreadable_config_json_falls_back_to_the_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    assert fqtorch_main("train", "--epochs", "1", "--seed", "3", *SHORT, "--out", out) == 0
    (out / "config.json").write_text('{"config": {"seed"')  # cut short
    caplog.set_level(logging.INFO)
    assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{out / 'config.json'} is missing or unreadable; resuming with the options saved in "
        f"{out / 'checkpoint.pt'} (the file is kept as config.json.unreadable)"
    ]
    assert read_metrics(out)[1]["steps"] == 4  # its --max-steps-per-epoch 2 carried on
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 3
    # what was there is not lost (it may hold the first start's record: versions, argv)
    assert (out / "config.json.unreadable").read_text() == '{"config": {"seed"'


class TestMetricsLines:
    def test_last_line_cut_short_is_dropped(self, tmp_path, caplog):
        path = tmp_path / "metrics.jsonl"
        path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "val_')
        train_loop._keep_lines(path, lambda m: m["epoch"] <= 1)
        assert path.read_text() == '{"epoch": 1}\n'
        assert f"{path}: dropped its last line 3, cut short" in caplog.text

    def test_bad_line_within_is_an_error_naming_it(self, tmp_path):
        path = tmp_path / "metrics.jsonl"
        path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
        with pytest.raises(TrainingError, match=rf"^{path} line 2 is not valid JSON"):
            train_loop._keep_lines(path, lambda m: True)


def test_option_of_the_wrong_type_is_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: ten\n")
    assert fqtorch_main("train", "--config", config, "--quiet") == 2
    err = capsys.readouterr().err
    assert err.strip() == "fqtorch train: error: epochs: expected an integer, got 'ten'"


def test_only_rank_0_says_it_was_interrupted(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank stops alike; rank 0 alone prints how to resume, and every
    rank exits with the signal's code."""
    original = train_loop._Run._train_step

    def press_ctrl_c(self, x, y):
        signal.raise_signal(signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(train_loop._Run, "_train_step", press_ctrl_c)
    monkeypatch.setenv("RANK", "1")
    assert fqtorch_main("train", *SHORT, "--out", tmp_path / "run") == 130
    assert "Resume with" not in capsys.readouterr().err


SECOND_CTRL_C_AFTER_THE_MESSAGE = """
import os, signal, sys, time
from fqtorch import cli
from fqtorch.train.errors import TrainingInterrupted

def stopped(args):
    raise TrainingInterrupted("interrupted; saved run/checkpoint.pt", 130)

cli._dispatch = stopped
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not inherited)
sys.argv = ["fqtorch", "train"]
code = cli.main()
os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, as the program winds down
time.sleep(0.2)
sys.exit(code)
"""


@pytest.mark.parametrize("argv_given", [False, True])
def test_a_second_ctrl_c_after_the_message_is_quiet(tmp_path, argv_given):
    """Run as the program, ``fqtorch`` ignores Ctrl-C once it has said what it saved (a second
    press used to land in the interpreter's shutdown as a traceback); called from Python with
    ``argv``, the caller keeps its Ctrl-C."""
    script = SECOND_CTRL_C_AFTER_THE_MESSAGE
    if argv_given:
        script = script.replace("cli.main()", "cli.main(['train'])")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "fqtorch train: interrupted; saved run/checkpoint.pt" in result.stderr
    if argv_given:
        assert "KeyboardInterrupt" in result.stderr and result.returncode != 130
    else:
        assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr


class TestLock:
    """One process per run directory: a second run there is refused while the first lives;
    a bare --resume passes over a run in use."""

    @pytest.fixture
    def live_pid(self):
        with subprocess.Popen(["sleep", "60"]) as proc:
            yield proc.pid
            proc.kill()

    def test_in_use_is_refused_and_stale_taken_over(self, tmp_path, live_pid, capsys):
        out = tmp_path / "run"
        out.mkdir()
        (out / "lock").write_text(f"{live_pid}\n")
        assert fqtorch_main("train", "--epochs", "1", *SHORT, "--out", out) == 2
        err = capsys.readouterr().err
        assert err.strip() == (
            f"fqtorch train: error: {out} is in use by another fqtorch train (process "
            f"{live_pid}); wait for it to end, or give another --out (if no run is going on "
            f"there, delete {out / 'lock'})"
        )
        assert not (out / "checkpoint.pt").exists()
        gone = _dead_pid()
        (out / "lock").write_text(f"{gone}\n")
        assert fqtorch_main("train", "--epochs", "1", *SHORT, "--out", out) == 0
        assert not (out / "lock").exists()  # released at the end

    def test_a_reused_process_id_is_stale_and_another_hosts_lock_is_kept(
        self, tmp_path, live_pid, capsys
    ):
        """A lock whose id now names a process that started at another time (a restarted
        machine reuses small ids) is taken over; one written on another host is refused (its
        process cannot be looked at from here), saying how to clear it."""
        if rundir._start_time(live_pid) is None:
            pytest.skip("no /proc: process start times cannot be read here")
        out = tmp_path / "run"
        out.mkdir()
        here = socket.gethostname()
        (out / "lock").write_text(f"{live_pid} {here} {rundir._start_time(live_pid)}\n")
        assert rundir._holder(out) == live_pid
        (out / "lock").write_text(f"{live_pid} {here} 1\n")  # started at another time
        assert rundir._holder(out) is None
        assert fqtorch_main("train", "--epochs", "1", *SHORT, "--out", out) == 0
        (out / "lock").write_text(f"{os.getpid()} elsewhere.example 1\n")
        assert fqtorch_main("train", "--resume", out) == 2
        err = capsys.readouterr().err
        assert f"(process {os.getpid()} on elsewhere.example)" in err
        assert f"delete {out / 'lock'}" in err

    def test_bare_resume_stops_at_the_latest_runs_foreign_lock(self, tmp_path, monkeypatch, capsys):
        """The latest run locked on another host (its process cannot be looked at): a bare
        --resume says so instead of passing over it to an older run."""
        monkeypatch.chdir(tmp_path)
        for name in ("a", "b"):
            assert fqtorch_main("train", "--epochs", "1", *SHORT, "--out", f"runs/{name}") == 0
        (tmp_path / "runs/b/lock").write_text("123 elsewhere.example 1\n")
        capsys.readouterr()
        assert fqtorch_main("train", "--resume", "--epochs", "2") == 2
        err = capsys.readouterr().err
        assert "the latest run, runs/b, is locked by process 123 on elsewhere.example" in err
        assert [len(read_metrics(tmp_path / "runs" / n)) for n in "ab"] == [1, 1]

    def test_bare_resume_passes_over_a_run_in_use(self, tmp_path, monkeypatch, live_pid, caplog):
        monkeypatch.chdir(tmp_path)
        caplog.set_level(logging.INFO)
        for name in ("a", "b"):
            assert fqtorch_main("train", "--epochs", "1", *SHORT, "--out", f"runs/{name}") == 0
        (tmp_path / "runs/b/lock").write_text(f"{live_pid}\n")  # b was checkpointed last
        assert fqtorch_main("train", "--resume", "--epochs", "2") == 0
        assert "--resume: passing over runs/b, in use by a running process" in caplog.text
        assert [len(read_metrics(tmp_path / "runs" / n)) for n in "ab"] == [2, 1]


def _dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
