"""``fqtorch train`` end to end: outputs, config files, fault tolerance, resume, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fqtorch
from fqtorch.train import CheckpointError, load_checkpoint, save_checkpoint
from tests.data.test_datasets import write_text

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fqtorch_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "fqtorch", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fqtorch {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class TestEndToEnd:
    """One epoch on digits and on a text corpus writes config, metrics, final and checkpoint."""

    def test_digits(self, tmp_path):
        out = tmp_path / "run"
        fqtorch_cli("train", "--epochs", "1", "--out", str(out), "--quiet")
        config = json.loads((out / "config.json").read_text())
        assert config["config"]["preset"] == "bhq5" and config["versions"]["torch"]
        assert config["fqt"]["grad_quantizer"] == "bhq" and "git_commit" in config
        (metrics,) = read_metrics(out)
        for key in ("epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"):
            assert key in metrics
        final = json.loads((out / "final.json").read_text())
        assert final["epochs"] == 1 and final["val_acc"] > 0.5
        state = load_checkpoint(out / "checkpoint.pt")
        assert state["epoch"] == 1 and "features.0.weight" in state["model"]

    def test_text_corpus(self, tmp_path):
        corpus = write_text(tmp_path / "corpus.txt", chars=6000)
        out = tmp_path / "lm"
        fqtorch_cli(
            "train",
            "--dataset",
            "text",
            "--data-dir",
            str(corpus),
            "--epochs",
            "1",
            "--block-size",
            "32",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--quiet",
        )
        final = json.loads((out / "final.json").read_text())
        assert 0 < final["val_acc"] <= 1 and final["val_loss"] > 0

    def test_config_file_and_flag_override(self, tmp_path):
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("epochs: 3\nlr: 0.02\ngrad_quantizer: psq\ngrad_bits: 4\npreset: qat\n")
        out = tmp_path / "run"
        fqtorch_cli(
            "train",
            "--config",
            str(cfg),
            "--epochs",
            "1",
            "--grad-bits",
            "6",
            "--out",
            str(out),
            "--quiet",
            "--max-steps-per-epoch",
            "3",
        )
        resolved = json.loads((out / "config.json").read_text())
        assert resolved["config"]["epochs"] == 1 and resolved["config"]["lr"] == 0.02
        assert resolved["fqt"]["grad_quantizer"] == "psq" and resolved["fqt"]["grad_bits"] == 6

    def test_fused_int8(self, tmp_path):
        out = tmp_path / "run"
        fqtorch_cli(
            "train",
            "--fused",
            "--backend",
            "int8",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--max-steps-per-epoch",
            "3",
        )
        resolved = json.loads((out / "config.json").read_text())
        assert resolved["fqt"]["fused"] is True and resolved["fqt"]["backend"] == "int8"
        (metrics,) = read_metrics(out)
        assert metrics["train_loss"] == metrics["train_loss"]  # finite, not NaN

    def test_exact_preset_is_float(self, tmp_path):
        out = tmp_path / "run"
        fqtorch_cli(
            "train",
            "--preset",
            "exact",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--max-steps-per-epoch",
            "3",
        )
        assert json.loads((out / "config.json").read_text())["fqt"] is None

    def test_help_lists_models(self):
        text = fqtorch_cli("train", "--help").stdout
        for name in ("preact_resnet56", "resnet50", "char_gpt", "digits_cnn"):
            assert name in text


class TestErrors:
    """Bad input is one clear line, exit code 2, and nothing written before is lost."""

    def test_bad_values(self, tmp_path):
        r = fqtorch_cli("train", "--grad-bits", "9", "--out", str(tmp_path / "x"), check=False)
        assert r.returncode == 2 and "--grad-bits: grad_bits must be in 2..8" in r.stderr
        assert "Traceback" not in r.stderr
        r = fqtorch_cli(
            "train", "--grad-quantizer", "nope", "--out", str(tmp_path / "x"), check=False
        )
        assert r.returncode == 2 and "known quantizers" in r.stderr
        r = fqtorch_cli(
            "train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), check=False
        )
        assert r.returncode == 2 and "does not exist" in r.stderr
        if not torch.cuda.is_available():
            r = fqtorch_cli("train", "--device", "cuda", "--out", str(tmp_path / "x"), check=False)
            assert r.returncode == 2 and "CUDA is not available" in r.stderr

    def test_version(self):
        r = fqtorch_cli("--version")
        assert r.stdout.strip() == f"fqtorch {fqtorch.__version__}"

    def test_existing_run_is_not_overwritten(self, tmp_path):
        out = tmp_path / "run"
        fqtorch_cli(
            "train", "--epochs", "1", "--out", str(out), "--quiet", "--max-steps-per-epoch", "2"
        )
        before = (out / "checkpoint.pt").read_bytes()
        r = fqtorch_cli("train", "--epochs", "1", "--out", str(out), check=False)
        assert r.returncode == 2 and "--resume" in r.stderr
        assert (out / "checkpoint.pt").read_bytes() == before

    def test_corrupt_checkpoint(self, tmp_path):
        out = tmp_path / "run"
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
        r = fqtorch_cli("train", "--resume", "--out", str(out), check=False)
        assert r.returncode == 2 and "truncated or corrupt" in r.stderr

    def test_nonfinite_loss_stops_or_skips(self, tmp_path):
        r = fqtorch_cli(
            "train",
            "--lr",
            "1e30",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "a"),
            "--quiet",
            check=False,
        )
        assert r.returncode == 2 and "non-finite loss or gradient" in r.stderr
        fqtorch_cli(
            "train",
            "--lr",
            "1e30",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "b"),
            "--quiet",
            "--nonfinite",
            "skip",
        )
        assert read_metrics(tmp_path / "b")[0]["skipped_steps"] > 0


class TestCheckpoint:
    """Atomic writes: a failed write leaves the previous checkpoint intact; loads are
    weights-only and errors name what is wrong."""

    def test_roundtrip_and_failed_write(self, tmp_path):
        path = tmp_path / "ck.pt"
        state = {
            "model": {"w": torch.ones(2)},
            "optimizer": {},
            "scheduler": {},
            "epoch": 1,
            "step": 3,
            "rng": {"torch": torch.get_rng_state()},
        }
        save_checkpoint(state, path)
        assert load_checkpoint(path)["step"] == 3
        with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled
            save_checkpoint({**state, "step": lambda: 0}, path)
        assert load_checkpoint(path)["step"] == 3
        assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]

    def test_truncated_and_foreign(self, tmp_path):
        path = tmp_path / "ck.pt"
        save_checkpoint(
            {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 0, "step": 0, "rng": {}}, path
        )
        path.write_bytes(path.read_bytes()[:40])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(path)
        torch.save({"weights": torch.ones(1)}, path)
        with pytest.raises(CheckpointError, match="lacks checkpoint keys"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="no checkpoint"):
            load_checkpoint(tmp_path / "missing.pt")


def test_sigkill_and_resume_match_uninterrupted(tmp_path):
    """A run killed mid-training (SIGKILL) and resumed ends exactly like an uninterrupted one."""
    args = ["train", "--epochs", "4", "--quiet", "--seed", "3"]
    fqtorch_cli(*args, "--out", str(tmp_path / "full"))
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fqtorch", *args, "--out", str(out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final.json").exists(), "the run finished before it could be killed"
    fqtorch_cli(*args, "--out", str(out), "--resume")
    full = json.loads((tmp_path / "full" / "final.json").read_text())
    resumed = json.loads((out / "final.json").read_text())
    assert resumed["val_acc"] == full["val_acc"] and resumed["val_loss"] == full["val_loss"]
    assert [m["val_loss"] for m in read_metrics(out)] == [
        m["val_loss"] for m in read_metrics(tmp_path / "full")
    ]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_ddp_two_processes_stay_in_sync(tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks end with identical parameters."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fqtorch",
        "train",
        "--epochs",
        "2",
        "--max-steps-per-epoch",
        "6",
        "--batch-size",
        "32",
        "--quiet",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == 2
    a, b = final["rank_param_checksums"]
    assert a == b
    assert len(read_metrics(out)) == 2


def test_experiment_configs_are_valid():
    """Every paper config in experiments/ resolves to a valid TrainConfig."""
    from fqtorch.train import TrainConfig, load_config_file

    configs = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*/*.yaml"))
    assert len(configs) == 3 * 17
    for path in configs:
        cfg = TrainConfig.from_dict(load_config_file(path))
        assert cfg.out.endswith(path.stem)


def test_ranks_draw_different_noise():
    """Every epoch reseeds each rank's quantizer noise from (seed, rank, epoch): ranks differ,
    and the same (seed, rank, epoch) replays exactly (what makes resume exact)."""
    import copy

    import torch.nn.functional as F

    import fqtorch
    from fqtorch.models import build_model
    from fqtorch.train.loop import _epoch_seed

    torch.manual_seed(0)
    model = fqtorch.quantize_model(build_model("digits_cnn"), fqtorch.FQTConfig.preset("psq4"))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    def grad(rank: int, epoch: int) -> torch.Tensor:
        m = copy.deepcopy(model)
        fqtorch.reseed(m, _epoch_seed(0, rank, epoch))
        F.cross_entropy(m(x), y).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    assert not torch.equal(grad(0, 0), grad(1, 0))
    assert not torch.equal(grad(0, 0), grad(0, 1))
    assert torch.equal(grad(1, 2), grad(1, 2))
