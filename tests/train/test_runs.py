"""Training runs as a user meets them: a new directory per run, resume and extend, the run
header, step checkpoints and best.pt, exact mid-epoch resume, Ctrl-C, TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from fqtorch.models import build_model
from fqtorch.train import TrainConfig, load_checkpoint, new_run_dir
from fqtorch.train import loop as train_loop
from tests.train.helpers import (
    ENV,
    assert_same_parameters,
    fqtorch_main,
    read_metrics,
    without_seconds,
)

SHORT = ("--epochs", "1", "--max-steps-per-epoch", "2", "--quiet")
# Two epochs of 6 steps, a checkpoint every 4 steps (steps 4 and 8 fall within an epoch) and a
# variance measurement every 3 steps (it draws from the layers' noise streams too).
EXACT = (
    "train",
    "--epochs",
    "2",
    "--max-steps-per-epoch",
    "6",
    "--batch-size",
    "32",
    "--checkpoint-every",
    "4",
    "--variance-every",
    "3",
    "--seed",
    "5",
    "--quiet",
)


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run the interrupted ones must reproduce exactly."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert fqtorch_main(*EXACT, "--out", out) == 0
    return out


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in fqtorch handles it."""


def _spy(monkeypatch, read) -> list:
    """Record ``read(run)`` at the start of every training step."""
    seen: list = []
    original = train_loop._Run._train_step

    def spy(self, x, y):
        seen.append(read(self))
        return original(self, x, y)

    monkeypatch.setattr(train_loop._Run, "_train_step", spy)
    return seen


def _spy_steps(monkeypatch) -> list[tuple[int, int]]:
    """Record (epoch, global step) at the start of every training step."""
    return _spy(monkeypatch, lambda run: (run.epoch, run.step))


def _spy_lrs(monkeypatch) -> list[float]:
    """Record each training step's learning rate."""
    return _spy(monkeypatch, lambda run: run.optimizer.param_groups[0]["lr"])


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical parameters, metrics (but for timings), variance log and final metrics."""
    assert_same_parameters(a / "checkpoint.pt", b / "checkpoint.pt")
    assert without_seconds(read_metrics(a)) == without_seconds(read_metrics(b))
    assert (a / "variance.jsonl").read_text() == (b / "variance.jsonl").read_text()
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (a, b))
    assert (fa["val_loss"], fa["val_acc"], fa["best"]) == (
        fb["val_loss"],
        fb["val_acc"],
        fb["best"],
    )


class TestRunDirectories:
    """Without --out every run gets its own directory; the README's command works twice."""

    def test_twice_then_resume_the_latest(self, tmp_path, monkeypatch, info_logs):
        monkeypatch.chdir(tmp_path)
        assert fqtorch_main("train", *SHORT) == 0
        assert fqtorch_main("train", *SHORT) == 0
        first, second = sorted((tmp_path / "runs").iterdir())
        for run in (first, second):
            assert json.loads((run / "final.json").read_text())["epochs"] == 1
            assert f"run     runs/{run.name} (new run, 1 epoch)" in info_logs.text
        before = (first / "checkpoint.pt").read_bytes()
        # --resume with no directory continues the run checkpointed last, with its options
        assert fqtorch_main("train", "--resume", "--epochs", "2") == 0
        assert [m["epoch"] for m in read_metrics(second)] == [1, 2]
        assert read_metrics(second)[1]["steps"] == 4  # its --max-steps-per-epoch 2 carried on
        assert (first / "checkpoint.pt").read_bytes() == before

    def test_names_never_collide(self, tmp_path):
        now = datetime(2025, 1, 2, 3, 4, 5)
        names = [new_run_dir(tmp_path, now).name for _ in range(3)]
        assert names == ["2025-01-02_03-04-05", "2025-01-02_03-04-05-2", "2025-01-02_03-04-05-3"]

    def test_out_and_resume_dir(self, tmp_path, capsys):
        out = tmp_path / "mine"
        assert fqtorch_main("train", *SHORT, "--out", out) == 0
        assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 0
        assert len(read_metrics(out)) == 2
        assert fqtorch_main("train", "--out", out, "--resume", tmp_path / "other") == 2
        assert "name different runs" in capsys.readouterr().err

    def test_resume_with_nothing_to_resume(self, tmp_path, monkeypatch, capsys):
        monkeypatch.chdir(tmp_path)
        assert fqtorch_main("train", "--resume") == 2
        err = capsys.readouterr().err
        assert "no run with a checkpoint under runs/" in err and "Traceback" not in err


def test_run_header(tmp_path, info_logs):
    """Model and parameter count, data and sizes, FQT plan and backend, device, directory."""
    out = tmp_path / "run"
    assert fqtorch_main("train", *SHORT, "--out", out, "--checkpoint-every", "7") == 0
    params = sum(p.numel() for p in build_model("digits_cnn", in_channels=1).parameters())
    text = info_logs.text
    assert f"run     {out} (new run, 1 epoch)" in text
    assert f"model   digits_cnn: {params:,} parameters, 4 FQT layers" in text
    assert "data    digits: 1,437 train / 360 validation samples, batch 64, 2 steps" in text
    assert "fqt     bhq5: input ptq 8-bit, weight symmetric 8-bit; grad_output bhq 5-bit" in text
    assert "backend simulate" in text and "device  cpu" in text
    assert "checkpoint.pt every epoch and every 7 steps; best.pt by val_acc" in text
    # digits' default warm-up (1 epoch) on a 1-epoch run: the header says it never decays
    assert (
        "optim   sgd with momentum 0.9, lr 0.05, weight decay 0.0005; the warm-up covers the "
        "whole run (2 warm-up steps, 2 in the run: --warmup-epochs 1 of --epochs 1), so the "
        "learning rate rises to --lr at the last step and never decays"
    ) in text


def test_run_header_names_formats_without_bits():
    """A format's width is its own (MXFP4 is 4-bit whatever grad_bits says): the header names the
    format alone, where it used to print the unused grad_bits (\"mxfp4 8-bit\")."""
    from fqtorch.train import TrainConfig
    from fqtorch.train.loop import _describe_fqt

    line = _describe_fqt(TrainConfig(preset="mxfp4_rht_sr"))
    assert "input mxfp8, weight mxfp8; grad_output mxfp4, weight-gradient branch mxfp4," in line
    assert "-bit" not in line


class TestExactResume:
    """A run stopped within an epoch and resumed ends bit-identical to the uninterrupted run,
    and the resumed process ran only the steps that were left."""

    def test_killed_after_a_step_checkpoint(self, uninterrupted, tmp_path, monkeypatch, info_logs):
        out = tmp_path / "killed"
        real_save = train_loop.save_checkpoint

        def save_then_die(state, path):
            real_save(state, path)
            if path.name == "checkpoint.pt" and state["step"] == 8:
                raise _Killed

        monkeypatch.setattr(train_loop, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            fqtorch_main(*EXACT, "--out", out)
        monkeypatch.setattr(train_loop, "save_checkpoint", real_save)
        state = load_checkpoint(out / "checkpoint.pt")
        assert (state["epoch"], state["step"], state["epoch_step"]) == (1, 8, 2)
        steps = _spy_steps(monkeypatch)
        assert fqtorch_main("train", "--resume", out) == 0
        assert steps == [(1, 8), (1, 9), (1, 10), (1, 11)]  # the rest of epoch 2, no more
        assert "resuming in epoch 2 at step 8 (2 of its 6 steps done)" in info_logs.text
        assert_same_run(uninterrupted, out)

    def test_ctrl_c_saves_and_says_how_to_resume(
        self, uninterrupted, tmp_path, monkeypatch, capsys
    ):
        out = tmp_path / "ctrl_c"
        original = train_loop._Run._train_step

        def press_ctrl_c(self, x, y):
            result = original(self, x, y)
            if self.step == 4:  # the 5th step of epoch 1: the step finishes, then the run stops
                time.sleep(1.0)  # a slow step: its time must reach the epoch's "seconds"
                signal.raise_signal(signal.SIGINT)
            return result

        monkeypatch.setattr(train_loop._Run, "_train_step", press_ctrl_c)
        before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or in a background job
        assert fqtorch_main(*EXACT, "--out", out) == 130
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == (
            f"fqtorch train: interrupted; saved {out / 'checkpoint.pt'} at step 5, in epoch 1. "
            f"Resume with: fqtorch train --resume {out}"
        )
        assert "Traceback" not in err
        assert signal.getsignal(signal.SIGINT) is before  # the handler restored
        state = load_checkpoint(out / "checkpoint.pt")
        assert (state["epoch"], state["step"], state["epoch_step"]) == (0, 5, 5)
        assert state["epoch_seconds"] >= 1.0
        monkeypatch.setattr(train_loop._Run, "_train_step", original)
        assert fqtorch_main("train", "--resume", out) == 0
        assert_same_run(uninterrupted, out)
        # the epoch's time counts both invocations (it counted the resumed one alone)
        assert read_metrics(out)[0]["seconds"] > state["epoch_seconds"]

    def test_second_ctrl_c_stops_at_once(self, tmp_path, monkeypatch, capsys):
        out = tmp_path / "twice"
        original = train_loop._Run._train_step

        def press_twice(self, x, y):
            if self.step == 5:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
            return original(self, x, y)

        monkeypatch.setattr(train_loop._Run, "_train_step", press_twice)
        assert fqtorch_main(*EXACT, "--out", out, "--variance-every", "0") == 130
        err = capsys.readouterr().err
        assert f"stopped at once; {out / 'checkpoint.pt'} (step 4, in epoch 1) is intact" in err
        assert load_checkpoint(out / "checkpoint.pt")["step"] == 4

    def test_best_checkpoint(self, uninterrupted):
        metrics = read_metrics(uninterrupted)
        best = max(metrics, key=lambda m: m["val_acc"])  # the first of equals
        state = load_checkpoint(uninterrupted / "best.pt")
        assert state["best"] == {
            "metric": "val_acc",
            "value": best["val_acc"],
            "epoch": best["epoch"],
        }
        assert state["epoch"] == best["epoch"]


def test_best_is_by_the_validation_metric():
    """Higher accuracy, lower loss; ties and NaN are not better."""
    better = train_loop._is_better
    assert better("val_acc", 0.5, None) and better("val_acc", 0.8, 0.5)
    assert not better("val_acc", 0.7, 0.8) and not better("val_acc", 0.8, 0.8)
    assert better("val_loss", 1.0, 2.0) and not better("val_loss", 1.5, 1.0)
    assert not better("val_loss", math.nan, None) and not better("val_acc", math.nan, 0.1)


class TestExtend:
    def test_more_epochs_extend_a_finished_run(self, tmp_path, monkeypatch, info_logs):
        """The schedule is recomputed for the new length from the step reached (loop.py)."""
        out = tmp_path / "run"
        args = ("--max-steps-per-epoch", "4", "--warmup-epochs", "0", "--quiet", "--out", out)
        assert fqtorch_main("train", "--epochs", "1", *args) == 0
        assert read_metrics(out)[0]["lr"] == 0.0  # the 1-epoch cosine ended at 0
        lrs = _spy_lrs(monkeypatch)
        assert fqtorch_main("train", "--resume", out, "--epochs", "3") == 0
        assert "resuming after epoch 1, step 4; extending it from 1 to 3 epochs" in info_logs.text
        cosine = [0.05 * 0.5 * (1 + math.cos(math.pi * s / 12)) for s in range(4, 12)]
        assert lrs == pytest.approx(cosine, rel=1e-12, abs=0)  # the first step too
        assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
        assert read_metrics(out)[2]["lr"] == pytest.approx(0.0, abs=1e-15)

    def test_fewer_epochs_than_done_is_refused(self, tmp_path, capsys):
        out = tmp_path / "run"
        assert fqtorch_main("train", *SHORT, "--epochs", "2", "--out", out) == 0
        assert fqtorch_main("train", "--resume", out, "--epochs", "1") == 2
        assert "has done 2 epochs; --epochs 1 ends before that" in capsys.readouterr().err

    def test_finished_run_is_evaluated_again(self, tmp_path, info_logs):
        out = tmp_path / "run"
        assert fqtorch_main("train", *SHORT, "--out", out) == 0
        final = json.loads((out / "final.json").read_text())
        assert fqtorch_main("train", "--resume", out) == 0
        assert "finished its 1 epoch; evaluating it again" in info_logs.text
        assert json.loads((out / "final.json").read_text())["val_acc"] == final["val_acc"]


def test_warm_up_then_cosine(tmp_path, monkeypatch):
    """A linear warm-up over the first round(warmup_epochs · steps) steps, to --lr, then the
    cosine down to 0 at the last step."""
    lrs = _spy_lrs(monkeypatch)
    args = ("--epochs", "2", "--max-steps-per-epoch", "4", "--warmup-epochs", "0.5", "--quiet")
    assert fqtorch_main("train", *args, "--lr", "0.1", "--out", tmp_path / "r") == 0
    cosine = [0.05 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    assert lrs == pytest.approx([0.05, 0.1, *cosine], rel=1e-12, abs=0)
    # the header's account of the same course (the cosine's last step is lrs[-1] > 0: the
    # decay reaches 0 at the step after the run's last)
    cfg = TrainConfig(epochs=2, lr=0.1, warmup_epochs=0.5)
    header = train_loop._describe_schedule(cfg, steps_per_epoch=4)
    assert header.endswith("; warm-up over 2 steps, then cosine decay to 0 over 6 steps")
    # a warm-up longer than the run peaks below --lr: at total / warmup of it (the factor at
    # the last step), not at --lr
    long = train_loop._describe_schedule(TrainConfig(epochs=2, warmup_epochs=4), steps_per_epoch=10)
    assert "(40 warm-up steps, 20 in the run" in long
    assert "rises to 0.5 of --lr (0.025) at the last step" in long


def test_validation_averages_over_samples_not_batches():
    """A ragged last batch weighs by its samples: the loss and accuracy of the whole set."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=2)
    rt = train_loop.Runtime(0, 1, torch.device("cpu"))
    loss, acc = train_loop._evaluate(model, loader, rt, False)
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-6)
    assert acc == int((logits.argmax(-1) == y).sum()) / 5  # 1 of 5 (a mean per batch: 1/6)


def test_data_order_of_one_process_and_of_ranks():
    """Each epoch's order is one permutation from (seed, epoch), which ranks share out; another
    seed's epochs are not this seed's shifted by one (DistributedSampler's seed + epoch)."""
    data = range(10)

    def order(seed, epoch, rank=None):
        if rank is None:
            sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator())
        else:
            sampler = torch.utils.data.DistributedSampler(data, 2, rank, drop_last=True)
        train_loop._seed_order(sampler, seed, epoch)
        return list(sampler)

    one = order(0, 1)
    assert sorted(one) == list(data) and one != order(0, 0)
    assert order(0, 1, rank=0) == one[0::2] and order(0, 1, rank=1) == one[1::2]
    assert order(1, 0) != one and order(1, 0, rank=0) != order(0, 1, rank=0)


class TestTensorBoard:
    def test_scalars_beside_metrics(self, tmp_path):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        out = tmp_path / "run"
        args = ("--max-steps-per-epoch", "4", "--variance-every", "2", "--tensorboard")
        assert fqtorch_main("train", "--epochs", "2", *args, "--quiet", "--out", out) == 0
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        expected = {"train/loss", "train/lr", "epoch/train_loss", "val/loss", "val/acc"}
        assert expected | {"variance_ratio/total", "variance_ratio/classifier.3"} <= tags
        metrics = read_metrics(out)
        # each step's own lr, beside its loss: the warm-up's first step, 1/4 of the peak
        assert [e.step for e in events.Scalars("train/lr")][:2] == [1, 2]
        assert events.Scalars("train/lr")[0].value == pytest.approx(0.05 / 4, rel=1e-6)
        acc = [(e.step, e.value) for e in events.Scalars("val/acc")]
        assert acc == [(m["steps"], pytest.approx(m["val_acc"], rel=1e-6)) for m in metrics]
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
        variance = [json.loads(x) for x in (out / "variance.jsonl").read_text().splitlines()]
        ratio = [(e.step, e.value) for e in events.Scalars("variance_ratio/total")]
        assert ratio == [(v["step"], pytest.approx(v["total_ratio"], rel=1e-6)) for v in variance]

    def test_not_installed_is_one_line(self, tmp_path, monkeypatch, capsys):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
        assert fqtorch_main("train", *SHORT, "--tensorboard") == 2
        err = capsys.readouterr().err
        assert err.strip() == (
            "fqtorch train: error: --tensorboard needs the tensorboard package: pip install "
            "tensorboard (metrics.jsonl holds the same numbers without it)"
        )
        assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_in_a_real_process(tmp_path, signum):
    """Ctrl-C in a terminal, or SIGTERM to the process group (``kill -- -PGID``): the run and
    its loader workers get it. Exit code 128 + the signal, one line saying what was saved and
    how to resume, no traceback, and a checkpoint where that line says."""
    out = tmp_path / "run"
    args = ["train", "--epochs", "50", "--workers", "2", "--checkpoint-every", "5", "--quiet"]
    args += ["--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fqtorch", *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)  # the first checkpoint is of step 5: the loader workers are running
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    # said by the run, not its workers
    assert err.count(f"{signal.Signals(signum).name}: stopping after this step") == 1
    state = load_checkpoint(out / "checkpoint.pt")
    step, epoch, within = state["step"], state["epoch"], state["epoch_step"]
    where = f"step {step}, in epoch {epoch + 1}" if within else f"step {step}, end of epoch {epoch}"
    assert err.strip().splitlines()[-1] == (
        f"fqtorch train: interrupted; saved {out / 'checkpoint.pt'} at {where}. "
        f"Resume with: fqtorch train --resume {out}"
    )
    assert epoch < 50
    assert torch.isfinite(torch.cat([p.flatten() for p in state["model"].values()])).all()


def test_ctrl_c_while_starting_up_is_one_line(monkeypatch, capsys):
    """Ctrl-C before the command runs (building the parser, importing): exit 130 and one line,
    not a KeyboardInterrupt traceback."""
    from fqtorch import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err == "fqtorch: interrupted\n"


def test_progress_is_logged_where_stderr_is_no_terminal(tmp_path, info_logs, monkeypatch):
    """A log file gets a progress line at most every LOG_PROGRESS_EVERY_S (here: every step)
    instead of a bar, never past the last step; --quiet gets none."""
    from fqtorch import cli

    monkeypatch.setattr(cli, "LOG_PROGRESS_EVERY_S", 0.0)
    args = ("train", "--epochs", "1", "--max-steps-per-epoch", "3")
    assert fqtorch_main(*args, "--out", tmp_path / "a") == 0
    lines = [r.getMessage() for r in info_logs.records if "epoch 1/1: " in r.getMessage()]
    assert [line.split(" (")[0] for line in lines[:2]] == ["epoch 1/1: 1/3", "epoch 1/1: 2/3"]
    assert not any(line.startswith("epoch 1/1: 3/3") for line in lines)
    info_logs.clear()
    assert fqtorch_main(*args, "--quiet", "--out", tmp_path / "b") == 0
    assert not any(": 1/3 (" in r.getMessage() for r in info_logs.records)
