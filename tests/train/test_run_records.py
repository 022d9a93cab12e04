"""What a run records and refuses around resuming: options that change the run, a checkpoint's
structure, final.json on an extension, the commit, paths given with ``~``."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import fqtorch
from fqtorch.train import TrainConfig, load_checkpoint, save_checkpoint
from fqtorch.train import loop as train_loop
from fqtorch.train.rundir import new_run_dir
from tests.data.test_datasets import write_text
from tests.train.helpers import fqtorch_main

SHORT = ("--epochs", "1", "--max-steps-per-epoch", "2", "--quiet")
TEXT = ("--dataset", "text", "--block-size", "16", "--batch-size", "8")


def test_another_text_file_on_resume_is_refused(tmp_path, monkeypatch, capsys):
    """A new --data-dir would train the same weights on other tokens and pick best.pt across
    validation sets: refused; the same file named another way is not a change."""
    write_text(tmp_path / "a.txt")
    write_text(tmp_path / "b.txt", chars=5000)
    out = tmp_path / "run"
    assert fqtorch_main("train", *TEXT, "--data-dir", tmp_path / "a.txt", *SHORT, "--out", out) == 0
    assert fqtorch_main("train", "--resume", out, "--data-dir", tmp_path / "b.txt") == 2
    assert "was trained with data_dir=" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert fqtorch_main("train", "--resume", out, "--data-dir", "a.txt", "--epochs", "2") == 0


def test_fqt_flags_on_resume_compare_what_the_layers_get(tmp_path, capsys):
    """--grad-bits 5 repeats bhq5's own width (no change); --grad-bits 4 is refused, naming the
    field."""
    out = tmp_path / "run"
    assert fqtorch_main("train", *SHORT, "--out", out) == 0
    assert fqtorch_main("train", "--resume", out, "--grad-bits", "5", "--epochs", "2") == 0
    assert fqtorch_main("train", "--resume", out, "--grad-bits", "4", "--epochs", "3") == 2
    assert "was written with grad_bits=5 (this run 4); leave the FQT flags out" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("entry", "value", "what"),
    [
        ("rng", [], "its random states"),
        ("scheduler", 3, "its schedule, precision or random states"),
        ("config", 5, "its config"),
        ("config", json.dumps([1]), "its config"),
        ("best", 3, "its best epoch's record"),
    ],
)
def test_a_checkpoint_of_the_wrong_structure_is_one_line(tmp_path, capsys, entry, value, what):
    out = tmp_path / "run"
    assert fqtorch_main("train", *SHORT, "--out", out) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    state[entry] = value
    save_checkpoint(state, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    code = fqtorch_main("train", "--resume", out, "--epochs", "2", "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and f"{what} is malformed" in err and "Traceback" not in err, err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_an_interrupted_extension_leaves_no_stale_final(tmp_path, monkeypatch):
    """final.json describes a finished run; extending it (--epochs more) and stopping midway
    leaves metrics.jsonl and the checkpoint, not the old finish."""
    out = tmp_path / "run"
    assert fqtorch_main("train", *SHORT, "--out", out) == 0
    assert (out / "final.json").is_file()
    real_step = train_loop._Run._train_step

    def stop_after_first_step(self, x, y):
        self.stop.signal = signal.SIGINT  # as Ctrl-C sets it
        return real_step(self, x, y)

    monkeypatch.setattr(train_loop._Run, "_train_step", stop_after_first_step)
    assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 130
    assert not (out / "final.json").exists()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3


def test_run_header_names_a_quantized_weight_gradient_under_qat():
    cfg = TrainConfig(
        preset="qat", fqt={"grad_weight_quantizer": "per_column", "grad_weight_bits": 3}
    )
    described = train_loop._describe_fqt(cfg)
    assert "gradients exact (QAT)" not in described
    assert "grad_output exact, weight-gradient branch per_column 3-bit" in described
    assert "gradients exact (QAT)" in train_loop._describe_fqt(TrainConfig(preset="qat"))


def test_the_commit_is_fqtorch_s_own(tmp_path, monkeypatch):
    """A copy of the package inside another git repository (a virtual environment in a user's
    project) records no commit, not that project's."""
    repo = tmp_path / "project"
    copy = repo / ".venv" / "lib" / "site-packages" / "fqtorch" / "train"
    copy.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.setattr(train_loop, "__file__", str(copy / "loop.py"))
    assert train_loop._git_commit() is None
    monkeypatch.undo()
    here = train_loop._git_commit()
    root = Path(train_loop.__file__).resolve().parents[3]
    if (root / ".git").exists():  # run from fqtorch's own checkout (CI's clone): its HEAD
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert here is not None and here.removesuffix("-dirty") == head
    else:
        assert here is None


def test_paths_with_a_tilde_are_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig(out="~/runs/a")
    assert cfg.out == str(tmp_path / "runs" / "a")


def test_a_file_where_runs_go_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("x")
    with pytest.raises(ValueError, match="runs is a file, not the folder runs are made in"):
        new_run_dir(tmp_path / "runs")


def test_reseed_takes_integers_only():
    model = fqtorch.quantize_model(torch.nn.Linear(3, 2), fqtorch.FQTConfig())
    import numpy as np

    fqtorch.reseed(model, np.int64(3))
    for bad in (None, "a", 1.5):
        with pytest.raises(TypeError, match="seed must be an int"):
            fqtorch.reseed(model, bad)


def test_ctrl_c_after_sigterm_stops_at_once():
    """The SIGTERM line says a Ctrl-C stops at once: it does (it was ignored after SIGTERM)."""
    from fqtorch.train.errors import TrainingInterrupted
    from fqtorch.train.interrupt import StopRequest

    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # a second SIGTERM: still finishing the step
    with pytest.raises(TrainingInterrupted):
        stop._handle(signal.SIGINT, None)


def test_a_bad_transform_names_the_choices(capsys):
    with pytest.raises(SystemExit, match="2"):  # argparse's own exit
        fqtorch_main("train", "--grad-transform", "rht64")
    assert "--grad-transform: 'rht64': give rht16, rht32 or none" in capsys.readouterr().err


def test_resume_and_out_naming_one_run_two_ways(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert fqtorch_main("train", *SHORT, "--out", out) == 0
    monkeypatch.chdir(tmp_path)
    assert fqtorch_main("train", "--resume", "run", "--out", "./run", "--epochs", "2") == 0
    assert fqtorch_main("train", "--bits-plan", tmp_path, *SHORT, "--out", tmp_path / "p") == 2
    assert f"bits plan {tmp_path} is a folder; name its plan.json" in capsys.readouterr().err


def test_a_relative_data_dir_resumes_from_another_folder(tmp_path, monkeypatch):
    """The run keeps its data folder as an absolute path: resumed from elsewhere, naming the
    folder from there is no change (it was refused, and leaving it out failed to find it)."""
    (tmp_path / "a").mkdir()
    write_text(tmp_path / "a" / "c.txt")
    monkeypatch.chdir(tmp_path / "a")
    assert fqtorch_main("train", *TEXT, "--data-dir", "c.txt", *SHORT, "--out", "../run") == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["data_dir"] == str(tmp_path / "a" / "c.txt")
    monkeypatch.chdir(tmp_path)
    assert fqtorch_main("train", "--resume", "run", "--data-dir", "a/c.txt", "--epochs", "2") == 0
    assert fqtorch_main("train", "--resume", "run", "--epochs", "3") == 0


def test_options_compare_as_what_they_name(tmp_path, monkeypatch):
    from fqtorch.train.rundir import _differ

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.json").write_text("{}")
    (tmp_path / "q.json").write_text("{}")
    assert not _differ("bits_plan", "~/p.json", str(tmp_path / "p.json"))
    assert _differ("bits_plan", "~/q.json", str(tmp_path / "p.json"))
    assert not _differ("data_dir", str(tmp_path / "new"), str(tmp_path / "moved"))  # gone
    assert not _differ("label_smoothing", "1e-1", 0.1)  # YAML 1.1 reads 1e-1 as text
    assert _differ("label_smoothing", "0.2", 0.1) and _differ("warmup_epochs", "x", 1.0)


def test_a_skipped_step_leaves_an_expanded_buffer_alone():
    """A buffer that is a broadcast view (no forward writes it in place) is not put back: it
    cannot be written in place."""
    model = torch.nn.BatchNorm1d(4)
    model.register_buffer("position_ids", torch.arange(4).expand(3, 4))
    kept = train_loop._buffers(model)
    assert [b is model.position_ids for b, _ in kept] == [False, False, False]
    model(torch.randn(5, 4))
    train_loop._put_back(kept)
    assert torch.equal(model.running_mean, torch.zeros(4))
    assert int(model.num_batches_tracked) == 0


def test_a_checkpoint_from_before_the_data_order_change_keeps_its_order(tmp_path, monkeypatch):
    """DDP's order was DistributedSampler's ``seed + epoch`` before checkpoints recorded their
    scheme: such a run keeps it (a resume within an epoch continues the order it was in)."""
    data = range(12)
    old = torch.utils.data.DistributedSampler(data, 2, 0, seed=3, drop_last=True)
    old.set_epoch(1)
    sampler = torch.utils.data.DistributedSampler(data, 2, 0, drop_last=True)
    train_loop._seed_order(sampler, 3, 1, "seed+epoch")
    assert list(sampler) == list(old)
    out = tmp_path / "run"
    assert fqtorch_main("train", *SHORT, "--out", out) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["data_order"] == "epoch_seed"
    del state["data_order"]
    save_checkpoint(state, out / "checkpoint.pt")
    schemes = []
    real = train_loop._seed_order
    monkeypatch.setattr(train_loop, "_seed_order", lambda *a: schemes.append(a[-1]) or real(*a))
    assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 0
    assert schemes == ["seed+epoch"]
    assert load_checkpoint(out / "checkpoint.pt")["data_order"] == "seed+epoch"


def test_a_copied_source_tree_in_another_repository_records_no_commit(tmp_path, monkeypatch):
    outer = tmp_path / "outer"
    tree = outer / "vendor" / "fq"
    (tree / "src" / "fqtorch" / "train").mkdir(parents=True)
    (tree / "pyproject.toml").write_text("")
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    commit = ["git", "-C", str(outer), *identity, "commit", "-q", "--allow-empty", "-m", "x"]
    subprocess.run(commit, check=True)
    monkeypatch.setattr(train_loop, "__file__", str(tree / "src" / "fqtorch" / "train" / "loop.py"))
    assert train_loop._git_commit() is None
