"""``fqtorch train`` end to end: outputs, config files, errors, fault tolerance, resume, DDP,
loader workers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import fqtorch
from fqtorch.data import build_datasets
from fqtorch.train import CheckpointError, TrainConfig, load_checkpoint, save_checkpoint, train
from tests.data.test_datasets import write_cifar, write_text
from tests.train.helpers import (
    ENV,
    assert_same_parameters,
    fqtorch_cli,
    fqtorch_main,
    read_metrics,
    without_seconds,
)

SHORT = ("--epochs", "1", "--max-steps-per-epoch", "2", "--quiet")


class TestEndToEnd:
    """One epoch on digits and on a text corpus writes config, metrics, final and checkpoint."""

    @pytest.mark.slow
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
        assert json.loads(state["config"])["model"] == "digits_cnn"

    def test_text_corpus(self, tmp_path):
        corpus = write_text(tmp_path / "corpus.txt", chars=6000)
        out = tmp_path / "lm"
        args = ("--dataset", "text", "--data-dir", corpus, "--block-size", "32")
        assert fqtorch_main("train", *args, "--batch-size", "8", *SHORT, "--out", out) == 0
        final = json.loads((out / "final.json").read_text())
        assert 0 < final["val_acc"] <= 1 and final["val_loss"] > 0
        assert final["best"]["metric"] == "val_loss"  # perplexity, not character accuracy

    def test_config_files_that_are_not_text_or_not_a_mapping(self, tmp_path):
        from fqtorch.train import load_config_file

        latin = tmp_path / "latin.yaml"
        latin.write_bytes(b"preset: bhq5  # caf\xe9\n")
        with pytest.raises(ValueError, match=r"latin.yaml is not UTF-8 text .*save it as UTF-8"):
            load_config_file(latin)
        with pytest.raises(ValueError, match="is a directory; name a .yaml"):
            load_config_file(tmp_path)
        with pytest.raises(ValueError, match="fqt must be a mapping of FQTConfig fields"):
            TrainConfig.from_dict({"fqt": [1]})
        twice = tmp_path / "twice.yaml"
        twice.write_text("grad_bits: 6\nfqt: {grad_bits: 4, grad_quantizer: psq}\n")
        with pytest.raises(ValueError, match="twice.yaml sets grad_bits twice, .* keep one"):
            load_config_file(twice)
        twice.write_text("grad_bits: 4\nfqt: {grad_bits: 4}\n")  # the same value is no conflict
        assert TrainConfig.from_dict(load_config_file(twice)).fqt == {"grad_bits": 4}

    def test_config_file_and_flag_override(self, tmp_path):
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("epochs: 3\nlr: 0.02\ngrad_quantizer: psq\ngrad_bits: 4\npreset: qat\n")
        out = tmp_path / "run"
        args = ("--config", cfg, "--epochs", "1", "--grad-bits", "6", "--out", out)
        assert fqtorch_main("train", *args, "--quiet", "--max-steps-per-epoch", "3") == 0
        resolved = json.loads((out / "config.json").read_text())
        assert resolved["config"]["epochs"] == 1 and resolved["config"]["lr"] == 0.02
        assert resolved["fqt"]["grad_quantizer"] == "psq" and resolved["fqt"]["grad_bits"] == 6

    def test_attention_products_from_file_and_flag(self, tmp_path):
        """``attention_products`` is an FQT field a config file and a flag can set."""
        from fqtorch.cli import _train_options, build_parser
        from fqtorch.train import load_config_file

        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("attention_products: true\n")
        assert TrainConfig.from_dict(load_config_file(cfg)).fqt_config().attention_products
        for flags, expected in ((["--attention-products"], True), ([], False)):
            args = build_parser().parse_args(["train", *flags])
            assert TrainConfig.from_dict(_train_options(args)).fqt_config().attention_products is (
                expected
            )
        args = build_parser().parse_args(["train", "--config", str(cfg), "--no-attention-products"])
        assert TrainConfig.from_dict(_train_options(args)).fqt == {"attention_products": False}

    def test_grad_transform_from_file_and_flag(self, tmp_path):
        """``grad_transform`` is an FQT field: a flag sets it, ``none`` turns a preset's off, and
        a config file's bad value is one clear error."""
        from fqtorch.cli import _train_options, build_parser
        from fqtorch.train import load_config_file

        def fqt(*flags):
            args = build_parser().parse_args(["train", *flags])
            return TrainConfig.from_dict(_train_options(args)).fqt_config()

        assert fqt("--preset", "mxfp4_sr", "--grad-transform", "rht32").grad_transform == "rht32"
        assert fqt("--preset", "mxfp4_rht_sr").grad_transform == "rht32"
        assert fqt("--preset", "mxfp4_rht_sr", "--grad-transform", "none").grad_transform is None
        with pytest.raises(SystemExit):
            fqt("--grad-transform", "rht8")
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("preset: psq4\ngrad_transform: rht7\n")
        with pytest.raises(ValueError, match="grad_transform must be one of"):
            TrainConfig.from_dict(load_config_file(cfg)).fqt_config()

    @pytest.mark.slow
    def test_fused_int8(self, tmp_path, monkeypatch):
        """The loss stays finite, and the GEMMs really ran as integer products."""
        calls = []
        int_mm = torch._int_mm

        def counting(a, b, **kwargs):
            calls.append((a.dtype, b.dtype))
            return int_mm(a, b, **kwargs)

        monkeypatch.setattr(torch, "_int_mm", counting)
        out = tmp_path / "run"
        args = ("--fused", "--backend", "int8", "--epochs", "1", "--max-steps-per-epoch", "3")
        assert fqtorch_main("train", *args, "--out", out, "--quiet") == 0
        resolved = json.loads((out / "config.json").read_text())
        assert resolved["fqt"]["fused"] is True and resolved["fqt"]["backend"] == "int8"
        (metrics,) = read_metrics(out)
        assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
        assert metrics["skipped_steps"] == 0
        # 4 FQT layers × 3 GEMMs × 3 training steps at least (validation adds forward GEMMs)
        assert len(calls) >= 4 * 3 * 3
        assert set(calls) == {(torch.int8, torch.int8)}

    def test_exact_preset_is_float(self, tmp_path):
        out = tmp_path / "run"
        assert fqtorch_main("train", "--preset", "exact", *SHORT, "--out", out) == 0
        assert json.loads((out / "config.json").read_text())["fqt"] is None

    def test_exact_preset_with_gradient_flags_keeps_a_float_forward(self):
        """``--preset exact --grad-quantizer bhq``: quantized gradients under the float
        forward the preset names (it turned into QAT's 8-bit forward before)."""
        cfg = TrainConfig(preset="exact", fqt={"grad_quantizer": "bhq", "grad_bits": 4})
        fqt = cfg.fqt_config()
        assert (fqt.input_quantizer, fqt.weight_quantizer) == ("identity", "identity")
        assert (fqt.grad_quantizer, fqt.grad_bits) == ("bhq", 4)

    def test_help_lists_models(self, capsys):
        with pytest.raises(SystemExit) as exit_:
            fqtorch_main("train", "--help")
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        for name in ("preact_resnet56", "resnet50", "char_gpt", "digits_cnn", "--tensorboard"):
            assert name in text


def test_quiet_drops_the_bar_and_the_progress_lines(tmp_path, monkeypatch, caplog, capsys):
    """``--quiet`` is no progress at all, as README and ``--help`` say: where stderr is not a
    terminal, not even the progress log line (here due after every step); the epoch's line
    stays."""
    import logging

    import fqtorch.cli

    monkeypatch.setattr(fqtorch.cli, "LOG_PROGRESS_EVERY_S", 0.0)
    args = ("--epochs", "1", "--max-steps-per-epoch", "3")
    lines = {}
    for quiet in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            flags = (*args, "--quiet") if quiet else args
            assert fqtorch_main("train", *flags, "--out", tmp_path / str(quiet)) == 0
        lines[quiet] = [r.getMessage() for r in caplog.records]
    progress = re.compile(r"epoch 1/1: \d/3 \(")
    assert sum(bool(progress.match(m)) for m in lines[False]) == 2, lines[False]  # steps 1, 2
    assert not any(map(progress.match, lines[True])), lines[True]
    assert any(m.startswith("epoch 1/1: train_loss") for m in lines[True])
    with pytest.raises(SystemExit):
        fqtorch_main("train", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--quiet no progress: neither the bar on a terminal nor, in a log file," in text


def test_the_command_line_says_a_warning_in_one_line():
    """A warning raised while a command runs is one line, ``fqtorch CMD: warning: MESSAGE``,
    not the warnings module's two (the entry script's path and its ``sys.exit(main())``);
    a warning repeated from one place still shows once; another library's, a RuntimeWarning
    too, keeps its category and says where it was raised (it is not taken for fqtorch's); and
    after ``main`` returns Python's own format is back (a library user sees no change).
    In a process of its own: pytest records the warnings of its tests instead of showing them."""
    code = "\n".join(
        [
            "import sys, warnings",
            "import fqtorch, fqtorch.stats.cli",
            "def run(args):",
            "    for _ in range(3):",
            "        warnings.warn(\"FQT layer 'a': falls back\", fqtorch.FQTWarning)",
            "    warnings.warn('old', FutureWarning)",
            "    warnings.warn('overflow in exp', RuntimeWarning)",
            "    return 0",
            "fqtorch.stats.cli.run_variance = run",
            "from fqtorch.cli import main",
            "code = main(['variance'])",
            "warnings.warn('from Python', RuntimeWarning)",
            "sys.exit(code)",
        ]
    )
    env = {k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "fqtorch variance: warning: FQT layer 'a': falls back",
        "fqtorch variance: warning: FutureWarning: old (<string>:6)",
        "fqtorch variance: warning: RuntimeWarning: overflow in exp (<string>:7)",
        "<string>:12: RuntimeWarning: from Python",
    ], result.stderr


def test_fqtorchs_own_warnings_are_fqt_warnings():
    """Every ``warnings.warn`` in the package names FQTWarning (or passes its category on, as
    ``warn_once`` does): the command line says those without a category."""
    import ast

    package = Path(fqtorch.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
                category = ast.unparse(node.args[1]) if len(node.args) > 1 else None
                assert category in ("FQTWarning", "category"), f"{path.name}:{node.lineno}"


def test_workers_load_the_same_batches(tmp_path):
    """``--workers 2`` trains on exactly the batches ``--workers 0`` does, augmentation
    included (CIFAR-10 crops and flips, seeded per sample, whichever worker loads it)."""
    data = write_cifar(tmp_path / "cifar", per_batch=4)
    args = ("--dataset", "cifar10", "--data-dir", data, "--model", "preact_resnet20")
    args += ("--epochs", "2", "--batch-size", "4", "--max-steps-per-epoch", "2", "--quiet")
    for workers in (0, 2):
        assert (
            fqtorch_main("train", *args, "--workers", workers, "--out", tmp_path / f"{workers}")
            == 0
        )
    a, b = tmp_path / "0", tmp_path / "2"
    assert_same_parameters(a / "checkpoint.pt", b / "checkpoint.pt")
    assert without_seconds(read_metrics(a)) == without_seconds(read_metrics(b))


class TestErrors:
    """Bad input is one clear line, exit code 2, and nothing written before is lost."""

    def test_bad_values(self, tmp_path, capsys):
        def error(*args) -> str:
            assert fqtorch_main("train", *args) == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            return err

        x = tmp_path / "x"
        assert "--grad-bits: grad_bits must be in 2..8" in error("--grad-bits", "9", "--out", x)
        assert "known quantizers" in error("--grad-quantizer", "nope", "--out", x)
        assert "does not exist" in error("--dataset", "cifar10", "--data-dir", tmp_path / "none")
        assert "--checkpoint-every: checkpoint_every must be >= 0" in error(
            "--checkpoint-every", "-1", "--out", x
        )
        if not torch.cuda.is_available():
            assert "CUDA is not available" in error("--device", "cuda", "--out", x)
        if not torch.backends.mps.is_available():
            assert "mps is not available here" in error("--device", "mps", "--out", x)
        for flag, value, message in [
            ("--lr", "-1", "--lr: lr must be a finite number > 0, got -1.0"),
            ("--lr", "nan", "--lr: lr must be a finite number > 0, got nan"),
            ("--lr", "inf", "--lr: lr must be a finite number > 0, got inf"),
            ("--momentum", "-1", "--momentum: momentum must be in [0, 1), got -1.0"),
            ("--momentum", "1", "--momentum: momentum must be in [0, 1), got 1.0"),
            ("--weight-decay", "inf", "--weight-decay: weight_decay must be a finite number >= 0"),
            (
                "--warmup-epochs",
                "-1",
                "--warmup-epochs: warmup_epochs must be a finite number >= 0",
            ),
            ("--warmup-epochs", "inf", "--warmup-epochs: warmup_epochs must be a finite number"),
            ("--label-smoothing", "1", "--label-smoothing: label_smoothing must be in [0, 1)"),
            ("--block-size", "0", "--block-size: block_size must be >= 1"),
            ("--max-steps-per-epoch", "0", "max_steps_per_epoch must be >= 1"),
            ("--device", "tpu", "--device: device must be auto, cpu, cuda, cuda:N"),
            ("--device", "meta", "--device: device must be auto, cpu, cuda, cuda:N"),
        ]:
            assert message in error(flag, value, "--out", x), (flag, value)
        assert "this run has one; start it with torchrun" in error("--fsdp", "--out", x)
        # A bit width its quantizer does not take would be recorded as set and do nothing.
        for args, message in [
            (("--preset", "qat", "--grad-bits", "4"), "grad_quantizer is None"),
            (("--preset", "exact", "--grad-bits", "4"), "grad_quantizer is None"),
            (("--preset", "exact", "--input-bits", "4"), "input_quantizer is identity"),
            (("--preset", "mxfp4_sr", "--grad-bits", "6"), "float format mxfp4"),
            (("--preset", "nvfp4_sr", "--grad-weight-bits", "6"), "float format nvfp4"),
            (
                ("--preset", "bhq5", "--weight-quantizer", "identity", "--weight-bits", "4"),
                "is identity",
            ),
        ]:
            flag = next(a for a in args if a.endswith("-bits"))
            err = error(*args, "--out", x)
            assert f"{flag}: {flag[2:].replace('-', '_')}=" in err and message in err, err
        assert "--variance-every: variance_every needs each rank's whole gradients" in error(
            "--fsdp", "--variance-every", "2", "--out", x
        )
        assert "--variance-every: variance_every estimates the sampling variance" in error(
            "--batch-size", "1", "--variance-every", "2", "--out", x
        )
        assert not x.exists()

    def test_version(self):
        r = fqtorch_cli("--version")
        assert r.stdout.strip() == f"fqtorch {fqtorch.__version__}"

    def test_malformed_config(self, tmp_path, capsys):
        bad = tmp_path / "bad.yaml"
        bad.write_text("epochs: 3\nlr: [0.1\n")
        assert fqtorch_main("train", "--config", bad, "--out", tmp_path / "x") == 2
        assert capsys.readouterr().err == (
            f"fqtorch train: error: {bad} is not valid YAML: expected ',' or ']', but got "
            "'<stream end>' at line 3, column 1\n"
        )
        bad = tmp_path / "bad.json"
        bad.write_text('{"epochs": 3,}')
        assert fqtorch_main("train", "--config", bad, "--out", tmp_path / "x") == 2
        assert f"{bad} is not valid JSON: " in capsys.readouterr().err
        toml = tmp_path / "run.toml"
        toml.write_text("epochs = 3\n")
        assert fqtorch_main("train", "--config", toml, "--out", tmp_path / "x") == 2
        assert f"config file {toml}: expected a .yaml, .yml or .json file" in (
            capsys.readouterr().err
        )
        assert not (tmp_path / "x").exists()

    def test_out_is_a_file(self, tmp_path, capsys):
        file = tmp_path / "notes.txt"
        file.write_text("keep me")
        assert fqtorch_main("train", *SHORT, "--out", file) == 2
        err = capsys.readouterr().err
        assert f"--out {file} is a file; name a directory" in err and "Traceback" not in err
        assert file.read_text() == "keep me"
        below = file / "run"  # a path through a file: the OS's error, said with what to do
        assert fqtorch_main("train", *SHORT, "--out", below) == 2
        err = capsys.readouterr().err
        assert f"{below}: part of this path is a file, not a folder; give another path" in err
        assert "Errno" not in err and file.read_text() == "keep me"

    def test_a_directory_of_other_files_is_not_overwritten(self, tmp_path, capsys):
        out = tmp_path / "model"  # say, a model folder with its own config.json
        out.mkdir()
        (out / "config.json").write_text('{"hidden_size": 768}')
        (out / "final.json").write_text("{}")
        assert fqtorch_main("train", *SHORT, "--out", out) == 2
        err = capsys.readouterr().err
        assert f"--out {out} holds files that are not an fqtorch run (config.json, final.json)" in (
            err
        )
        assert (out / "config.json").read_text() == '{"hidden_size": 768}'
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "final.json"]
        empty = tmp_path / "empty"
        empty.mkdir()
        assert fqtorch_main("train", *SHORT, "--out", empty) == 0  # an empty one is taken
        from fqtorch.train.loop import _foreign_files

        early = tmp_path / "early"  # a run's own first files, before its config.json
        (early / "tensorboard").mkdir(parents=True)
        (early / "lock").write_text("1")
        (early / "config.json.tmp").write_text("{")
        assert _foreign_files(early) == []
        (early / "notes.md").write_text("mine")
        assert _foreign_files(early) == ["notes.md"]

    def test_resume_of_a_missing_run_makes_no_directory(self, tmp_path, capsys):
        missing = tmp_path / "typo"
        assert fqtorch_main("train", "--resume", missing) == 2
        assert f"--resume: no checkpoint at {missing / 'checkpoint.pt'}" in capsys.readouterr().err
        assert not missing.exists()

    def test_existing_run_is_not_overwritten(self, tmp_path, capsys):
        out = tmp_path / "run"
        assert fqtorch_main("train", *SHORT, "--out", out) == 0
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert fqtorch_main("train", *SHORT, "--out", out) == 2
        assert "already holds a run (checkpoint.pt); pass --resume" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    def test_stopped_run_without_checkpoint_is_not_overwritten(self, tmp_path, capsys):
        """A run stopped before its first checkpoint (its weights went non-finite) leaves only
        its record: a new run in the same directory is refused, not written over it."""
        out = tmp_path / "run"
        assert fqtorch_main("train", *SHORT, "--out", out) == 0
        for name in ("checkpoint.pt", "best.pt", "final.json"):
            (out / name).unlink()
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert fqtorch_main("train", *SHORT, "--out", out) == 2
        err = capsys.readouterr().err
        assert "holds a stopped run's record (metrics.jsonl, 1 epoch(s); no checkpoint" in err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        # killed within its first epoch (a precision event at most): nothing finished to keep
        (out / "metrics.jsonl").write_text('{"event": "precision", "epoch": 1, "step": 2}\n')
        assert fqtorch_main("train", *SHORT, "--out", out) == 0

    def test_the_same_command_resumes_with_a_config_files_fqt_and_a_flag(self, tmp_path):
        """The fixed options are compared after the file's ``fqt:`` and the flags merge (the
        file's part alone differed from the run's whole)."""
        config = tmp_path / "c.yaml"
        config.write_text("preset: bhq5\nfqt: {grad_weight_bits: 6}\n")
        run = ("train", "--config", config, "--grad-bits", "4", *SHORT, "--out", tmp_path / "r")
        assert fqtorch_main(*run, "--epochs", "1") == 0
        assert fqtorch_main(*run, "--epochs", "2", "--resume") == 0

    def test_a_run_whose_options_now_mean_other_layers_is_not_resumed(self, tmp_path, capsys):
        """A run started when ``--preset exact --grad-quantizer bhq`` meant QAT's 8-bit forward
        (its config.json says ptq) is not continued on the float forward those options give
        now; a bit width that did nothing then does not stop its resume."""
        out = tmp_path / "r"
        args = ("--preset", "exact", "--grad-quantizer", "bhq", *SHORT, "--out", out)
        assert fqtorch_main("train", *args) == 0
        record = json.loads((out / "config.json").read_text())
        record["fqt"]["input_quantizer"] = "ptq"  # as the older fqtorch resolved it
        (out / "config.json").write_text(json.dumps(record))
        before = (out / "checkpoint.pt").read_bytes()
        capsys.readouterr()
        assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 2
        err = capsys.readouterr().err
        assert f"{out} was trained with input_quantizer='ptq', and this fqtorch derives" in err
        assert (out / "checkpoint.pt").read_bytes() == before
        old = TrainConfig(preset="qat", fqt={"grad_bits": 4}, resume=True, out=str(out))
        assert old.fqt_config().grad_quantizer is None

    @pytest.mark.parametrize(
        "flags, says",
        [
            (("--optimizer", "adamw", "--momentum", "0.3"), "momentum=0.3 has no effect with"),
            (("--dataset", "text", "--momentum", "0.5"), "optimizer adamw (its betas are"),
            (("--block-size", "7"), "block_size=7 has no effect with dataset digits"),
            (("--image-size", "32"), "image_size=32 has no effect with dataset digits"),
            (("--preset", "exact", "--variance-every", "3"), "--preset exact quantizes nothing"),
            (("--preset", "qat", "--grad-rounding", "nearest"), "grad_rounding=nearest has no"),
            (("--seed", "99999999999999999999999"), "seed must be an integer in [0, 2**63)"),
            (("--seed", "-1"), "seed must be an integer in [0, 2**63), got -1"),
        ],
    )
    def test_an_option_the_run_would_not_read_is_refused(self, tmp_path, capsys, flags, says):
        """Options recorded in config.json and never read (momentum under AdamW, a text or
        ImageNet size on digits, variance without quantizers, a rounding without gradient
        quantizers) were accepted silently, and then held a resume to them; a seed past
        torch's range failed after the data loaded, naming no option."""
        assert fqtorch_main("train", *flags, "--out", tmp_path / "x") == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()

    def test_a_run_s_own_options_and_defaults_given_are_taken(self):
        """What the refusals above must not catch: a text run's recorded options (its momentum
        is the dataset default, which AdamW never reads) started again, defaults given
        explicitly, and a rounding for a --bits-plan's layers under --preset qat."""
        text = TrainConfig(dataset="text")
        assert TrainConfig.from_dict(text.to_dict()).momentum == text.momentum
        TrainConfig(preset="qat", fqt={"grad_transform": None, "grad_rounding": "stochastic"})
        plan = Path(__file__).parents[2] / "experiments/results/digits/plan/plan.json"
        cfg = TrainConfig(preset="qat", bits_plan=str(plan), fqt={"grad_rounding": "nearest"})
        assert cfg.fqt["grad_rounding"] == "nearest"

    def test_unknown_config_key_lists_every_known_one(self, tmp_path, capsys):
        config = tmp_path / "c.yaml"
        config.write_text("grad_bitz: 4\n")
        assert fqtorch_main("train", "--config", config, "--out", tmp_path / "x") == 2
        err = capsys.readouterr().err
        assert "unknown config keys ['grad_bitz']; known: " in err and "epochs" in err
        assert "FQT fields, at the top level or under fqt: " in err and "grad_bits" in err

    def test_resume_with_another_dataset_names_the_runs(self, tmp_path, capsys):
        """A resumed run's dataset or model given anew and different: the run's own value is
        named (it was the model check's 'digits_cnn is an image model', as if the user had
        asked for that model with text)."""
        out = tmp_path / "run"
        assert fqtorch_main("train", *SHORT, "--out", out) == 0
        for flag, value, saved in [("--dataset", "text", "digits"), ("--seed", "3", 0)]:
            assert fqtorch_main("train", "--resume", out, flag, value) == 2
            err = capsys.readouterr().err
            assert f"{out} was trained with {flag[2:]}={saved!r}; leave it out" in err, err
            assert len(err.strip().splitlines()) == 1

    def test_corrupt_checkpoint(self, tmp_path, capsys):
        out = tmp_path / "run"
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
        assert fqtorch_main("train", "--resume", out) == 2
        err = capsys.readouterr().err
        assert err == (
            f"fqtorch train: error: {out / 'checkpoint.pt'} is corrupt or not an fqtorch "
            "checkpoint (not a torch.save file)\n"
        )
        save_checkpoint(empty_state(), out / "best.pt")  # the run's other checkpoint is named
        assert fqtorch_main("train", "--resume", out) == 2
        assert f"; {out / 'best.pt'} (its best epoch) may still load: copy it over" in (
            capsys.readouterr().err
        )

    def test_checkpoint_of_another_config_is_refused(self, tmp_path, capsys):
        out = tmp_path / "run"
        assert fqtorch_main("train", *SHORT, "--out", out) == 0
        before = (out / "checkpoint.pt").read_bytes()
        with pytest.raises(CheckpointError, match="written with preset='bhq5'; this run has"):
            train(TrainConfig(out=str(out), resume=True, preset="psq4", epochs=2))
        assert fqtorch_main("train", "--resume", out, "--batch-size", "32") == 2
        assert "was trained with batch_size=64; leave it out" in capsys.readouterr().err
        # the schedule's shape and the loss are the run's too (a new lr is taken: TestResume)
        assert fqtorch_main("train", "--resume", out, "--warmup-epochs", "3") == 2
        assert "was trained with warmup_epochs=1.0; leave it out" in capsys.readouterr().err
        assert fqtorch_main("train", "--resume", out, "--label-smoothing", "0.5") == 2
        assert "was trained with label_smoothing=0.0; leave it out" in capsys.readouterr().err
        assert (out / "checkpoint.pt").read_bytes() == before

    def test_variance_checkpoint_of_another_model(self, tmp_path, capsys):
        out = tmp_path / "run"
        assert fqtorch_main("train", *SHORT, "--out", out) == 0
        ckpt = out / "checkpoint.pt"
        v = tmp_path / "v"
        args = ("variance", "--checkpoint", ckpt, "--out", v)
        assert fqtorch_main(*args, "--model", "preact_resnet20") == 2
        assert capsys.readouterr().err == (
            f"fqtorch variance: error: --checkpoint {ckpt} was made with --model digits_cnn on "
            "--dataset digits, not --model preact_resnet20; pass those (or leave --model out: "
            "it defaults to the checkpoint's)\n"
        )
        assert not v.exists()

    def test_nonfinite_loss_stops_or_skips(self, tmp_path, capsys):
        args = ("--lr", "1e30", "--epochs", "1", "--max-steps-per-epoch", "4", "--quiet")
        assert fqtorch_main("train", *args, "--out", tmp_path / "a") == 3  # diverged: exit status 3
        assert "non-finite loss or gradient" in capsys.readouterr().err
        # lr 1e30: after the first step every forward overflows (skipped), and validation's
        # too: the run stops before a checkpoint would keep the model
        assert fqtorch_main("train", *args, "--out", tmp_path / "b", "--nonfinite", "skip") == 3
        err = capsys.readouterr().err
        assert "the validation loss is nan after epoch 1: the model's outputs are no " in err, err
        assert not (tmp_path / "b" / "checkpoint.pt").exists()
        # a finite step that leaves a weight infinite stops the run at the next checkpoint
        from fqtorch.train import loop

        real_step = loop._Run._train_step

        def infinite_weight_at_step_2(self, x, y):
            result = real_step(self, x, y)
            if self.step == 1:  # counted after the call: this is step 2
                with torch.no_grad():
                    next(self.model.parameters())[0].fill_(float("inf"))
            return result

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loop._Run, "_train_step", infinite_weight_at_step_2)
            every_2 = ("--checkpoint-every", "2", "--out", tmp_path / "d")
            assert fqtorch_main("train", *args[2:], *every_2) == 3
        err = capsys.readouterr().err
        assert "the weights or BatchNorm statistics are no longer finite at step 2, in " in err
        assert not (tmp_path / "d" / "checkpoint.pt").exists()
        # nor does a checkpoint within the epoch keep them
        every = ("--checkpoint-every", "1", "--nonfinite", "skip", "--out", tmp_path / "c")
        assert fqtorch_main("train", *args, *every) == 3
        if (tmp_path / "c" / "checkpoint.pt").exists():
            model = load_checkpoint(tmp_path / "c" / "checkpoint.pt")["model"]
            assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())

    def test_skipped_steps_are_said_and_not_counted_as_loss(self, tmp_path, monkeypatch, caplog):
        from fqtorch.train import loop

        calls = []

        def loss_nan_at_second_step(*args):
            loss = real_loss(*args)
            calls.append(1)
            return loss * float("nan") if len(calls) == 2 else loss

        real_loss = loop._loss
        monkeypatch.setattr(loop, "_loss", loss_nan_at_second_step)
        args = ("--epochs", "1", "--max-steps-per-epoch", "4", "--quiet", "--nonfinite", "skip")
        with caplog.at_level("WARNING", logger="fqtorch.train.loop"):
            assert fqtorch_main("train", *args, "--out", tmp_path / "b") == 0
        metrics = read_metrics(tmp_path / "b")[0]
        assert metrics["skipped_steps"] == 1 and math.isfinite(metrics["train_loss"])
        assert "epoch 1: skipped 1 step(s) with a non-finite loss or gradient" in caplog.text

    def test_a_skipped_step_leaves_batchnorm_statistics(self, tmp_path, monkeypatch):
        """A NaN input reaches BatchNorm's running statistics in the forward: a skipped step
        puts them back, and the run goes on (the epoch's end found them NaN before)."""
        from fqtorch.train import loop

        real_batches = loop._Run._batches

        def nan_in_second_batch(self):
            for i, (x, y) in enumerate(real_batches(self)):
                if i == 1:
                    x = x.clone()
                    x[0] = float("nan")
                yield x, y

        monkeypatch.setattr(loop._Run, "_batches", nan_in_second_batch)
        args = ("--epochs", "1", "--max-steps-per-epoch", "4", "--quiet", "--nonfinite", "skip")
        assert fqtorch_main("train", *args, "--out", tmp_path / "r") == 0
        metrics = read_metrics(tmp_path / "r")[0]
        assert metrics["skipped_steps"] == 1 and math.isfinite(metrics["val_loss"])
        model = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["model"]
        assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())
        counts = [int(t) for k, t in model.items() if k.endswith("num_batches_tracked")]
        assert counts and set(counts) == {3}  # the skipped step's forward is not counted

    @pytest.mark.parametrize("nonfinite", ["stop", "skip"])
    def test_a_skipped_step_keeps_the_schedule(self, tmp_path, monkeypatch, capsys, nonfinite):
        """The learning-rate schedule follows the steps, taken or skipped, so it ends where it
        was planned (it fell one step behind per skip); a first step skipped before any update
        says nothing about the scheduler. Stopped, the message names the step that failed."""
        from fqtorch.train import loop

        calls = []

        def loss_nan_at_steps_1_and_3(*args):
            calls.append(1)
            return real_loss(*args) * (float("nan") if len(calls) in (1, 3) else 1.0)

        real_loss = loop._loss
        monkeypatch.setattr(loop, "_loss", loss_nan_at_steps_1_and_3)
        args = ("--epochs", "1", "--max-steps-per-epoch", "4", "--quiet", "--nonfinite")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning (the scheduler's) fails the run
            code = fqtorch_main("train", *args, nonfinite, "--out", tmp_path / "r")
        err = capsys.readouterr().err
        if nonfinite == "stop":
            assert code == 3 and "at epoch 1, step 1 (mean loss nan, grad norm nan)" in err, err
            return
        assert code == 0, err
        assert read_metrics(tmp_path / "r")[0]["skipped_steps"] == 2
        state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
        assert state["scheduler"]["last_epoch"] == 4


def empty_state() -> dict:
    return {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 0, "step": 0, "rng": {}}


class TestCheckpoint:
    """Atomic writes: a failed write leaves the previous checkpoint intact; loads are
    weights-only and errors name what is wrong."""

    def test_a_killed_writer_s_temporary_file_is_removed(self, tmp_path):
        """A process killed mid-write (SIGKILL: no cleanup runs) leaves its temporary file; the
        next save of that checkpoint removes it, and leaves other files' alone."""
        path = tmp_path / "checkpoint.pt"
        stale = tmp_path / ".checkpoint.pt.k1ll3d.tmp"
        stale.write_bytes(b"half a checkpoint")
        other = tmp_path / ".best.pt.x.tmp"
        other.write_bytes(b"")
        save_checkpoint(empty_state(), path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, path.name]

    @pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
    def test_a_checkpoint_has_the_mode_of_the_run_s_other_files(self, tmp_path):
        """A checkpoint is created as open() creates a file (0666 less the umask), as the
        run's metrics are: it was 0600 (tempfile.mkstemp), unreadable to the group whatever the
        umask said."""
        for umask in (0o022, 0o002, 0o077):
            old = os.umask(umask)
            try:
                save_checkpoint(empty_state(), tmp_path / f"{umask:o}.pt")
                (tmp_path / f"{umask:o}.jsonl").write_text("")
            finally:
                os.umask(old)
            mode = (tmp_path / f"{umask:o}.pt").stat().st_mode & 0o777
            assert mode == 0o666 & ~umask == (tmp_path / f"{umask:o}.jsonl").stat().st_mode & 0o777

    def test_roundtrip_and_failed_write(self, tmp_path, monkeypatch):
        path = tmp_path / "ck.pt"
        state = {**empty_state(), "model": {"w": torch.ones(2)}, "step": 3}
        save_checkpoint(state, path)
        assert load_checkpoint(path)["step"] == 3
        real_save = torch.save

        def fail_halfway(obj, f, exc):
            real_save(obj, f)
            f.truncate(20)  # half a file on disk, then the failure
            raise exc

        for exc in (OSError(28, "No space left on device"), KeyboardInterrupt()):
            monkeypatch.setattr(torch, "save", lambda obj, f, exc=exc: fail_halfway(obj, f, exc))
            with pytest.raises(type(exc)) as raised:
                save_checkpoint({**state, "step": 4}, path)
            assert raised.value is exc
            assert load_checkpoint(path)["step"] == 3
            assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
        # torch's zip writer reports a full disk as a RuntimeError: one line, old file kept;
        # any other RuntimeError is a bug and keeps its traceback
        full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        other = RuntimeError("CUDA error: an illegal memory access was encountered")
        for exc in (full, other):
            monkeypatch.setattr(torch, "save", lambda obj, f, exc=exc: fail_halfway(obj, f, exc))
            with pytest.raises(RuntimeError) as raised:
                save_checkpoint({**state, "step": 4}, path)
            if exc is full:
                assert isinstance(raised.value, CheckpointError)
                assert "could not write" in str(raised.value) and "disk full" in str(raised.value)
            else:
                assert raised.value is other
            assert load_checkpoint(path)["step"] == 3
            assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]

    def test_a_checkpoint_with_malformed_entries_is_one_line(self, tmp_path, capsys):
        out = tmp_path / "run"
        args = ("--epochs", "1", "--max-steps-per-epoch", "2", "--quiet")
        assert fqtorch_main("train", *args, "--out", out) == 0
        state = load_checkpoint(out / "checkpoint.pt")
        for broken in ({"optimizer": {}}, {"epoch": "two"}):
            save_checkpoint({**state, **broken}, out / "checkpoint.pt")
            capsys.readouterr()
            assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 2
            err = capsys.readouterr().err
            assert "is malformed" in err and "Traceback" not in err
        # A checkpoint within an epoch (made from the epoch's end one): its schedule and its
        # random states broken, each one line before anything is written.
        rank = state["rng"]["ranks"][0]
        within = {**state, "epoch": 0, "step": 1, "epoch_step": 1}
        layer = next(iter(rank["fqt"]))
        for what, broken in [
            ("schedule", {"scheduler": {}}),
            ("random", {"rng": {"ranks": [{**rank, "torch": rank["torch"][:10]}]}}),
            ("random", {"rng": {"ranks": [{**rank, "fqt": {"nope": rank["fqt"][layer]}}]}}),
            ("random", {"rng": {"ranks": [{k: v for k, v in rank.items() if k != "sums"}]}}),
        ]:
            save_checkpoint({**within, **broken}, out / "checkpoint.pt")
            before = (out / "config.json").read_text()
            capsys.readouterr()
            assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 2, what
            err = capsys.readouterr().err
            assert "its schedule, precision or random states is malformed" in err, err
            assert "Traceback" not in err and (out / "config.json").read_text() == before
        # Written within an epoch on CUDA (a CUDA random state among the rank's): said so, not
        # "malformed" (the FQT layers' CUDA generator states do not fit CPU generators)
        cuda = {"rng": {"ranks": [{**rank, "cuda": torch.zeros(16, dtype=torch.uint8)}]}}
        save_checkpoint({**within, **cuda}, out / "checkpoint.pt")
        capsys.readouterr()
        assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 2
        err = capsys.readouterr().err
        assert "was written within an epoch on cuda; its random streams are cuda's" in err, err
        assert "Resume it on cuda" in err and "Traceback" not in err
        first = next(iter(state["model"]))
        model = {k: v for k, v in state["model"].items() if k != first}
        save_checkpoint({**state, "model": model}, out / "checkpoint.pt")
        capsys.readouterr()
        assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 2
        err = capsys.readouterr().err
        assert "does not fit model digits_cnn: Missing key(s)" in err and first in err, err

    def test_truncated_and_foreign(self, tmp_path):
        path = tmp_path / "ck.pt"
        save_checkpoint(empty_state(), path)
        path.write_bytes(path.read_bytes()[:40])
        with pytest.raises(CheckpointError, match=r"corrupt or not an fqtorch checkpoint \(trunc"):
            load_checkpoint(path)
        torch.save({"weights": torch.ones(1)}, path)
        with pytest.raises(CheckpointError, match="not an fqtorch checkpoint: it lacks the keys"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="no checkpoint"):
            load_checkpoint(tmp_path / "missing.pt")

    def test_loading_runs_no_code(self, tmp_path):
        """A checkpoint that would run code when unpickled is refused, and runs none."""
        marker = tmp_path / "code_ran"

        class RunsCode:
            def __reduce__(self):
                return (os.mkdir, (str(marker),))

        path = tmp_path / "ck.pt"
        torch.save({**empty_state(), "model": {"x": RunsCode()}}, path)
        with pytest.raises(CheckpointError, match=r"it holds Python objects \(posix.mkdir\)"):
            load_checkpoint(path)
        assert not marker.exists()


@pytest.mark.slow
def test_sigkill_and_resume_match_uninterrupted(tmp_path):
    """A run killed mid-training (SIGKILL) and resumed ends exactly like an uninterrupted one,
    and the resumed process starts from the saved epoch and step and runs only the rest."""
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
    saved = load_checkpoint(out / "checkpoint.pt")
    epoch, step = saved["epoch"], saved["step"]
    assert 1 <= epoch < 4  # (the epoch's metrics line is written before its checkpoint)
    resumed = fqtorch_cli("train", "--resume", str(out)).stderr
    assert f"run     {out} (resuming after epoch {epoch}, step {step}; 4 epochs)" in resumed
    ran = [int(e) for e in re.findall(r"^epoch (\d+)/4:", resumed, re.M)]
    assert ran == list(range(epoch + 1, 5))
    full = json.loads((tmp_path / "full" / "final.json").read_text())
    resumed_final = json.loads((out / "final.json").read_text())
    assert (resumed_final["val_acc"], resumed_final["val_loss"]) == (
        full["val_acc"],
        full["val_loss"],
    )
    assert [m["val_loss"] for m in read_metrics(out)] == [
        m["val_loss"] for m in read_metrics(tmp_path / "full")
    ]
    assert_same_parameters(tmp_path / "full" / "checkpoint.pt", out / "checkpoint.pt")


TORCHRUN = Path(sys.executable).with_name("torchrun")


def _patched_cli(patch: str) -> str:
    """A script that runs ``fqtorch`` with ``patch`` applied first (a failure planted in the
    training loop), to start under torchrun."""
    head = "import os, signal, sys\nfrom fqtorch.cli import main\n"
    head += "from fqtorch.train import TrainingError, loop\n"
    return head + patch + "\nsys.exit(main(sys.argv[1:]))\n"


DIE_AFTER_STEP_8 = _patched_cli(
    """
save = loop._Run.save


def save_then_die(self, best=False):
    save(self, best)
    if self.step == 8:  # every rank, just after the checkpoint of step 8 (within epoch 2)
        raise SystemExit(17)


loop._Run.save = save_then_die
"""
)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed"
)
def test_ddp_noise_sync_and_exact_resume(tmp_path):
    """torchrun with 2 CPU processes (gloo): the ranks draw different quantization noise in the
    same steps, end with identical parameters, and a run stopped within an epoch resumes (every
    rank from its own RNG states) to exactly the uninterrupted result."""
    args = ["train", "--epochs", "2", "--max-steps-per-epoch", "6", "--batch-size", "32"]
    args += ["--checkpoint-every", "4", "--quiet"]

    full = tmp_path / "full"
    result = _torchrun("-m", "fqtorch", *args, "--out", str(full))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("FQT conversion:") == 1, result.stderr[-3000:]  # rank 0 logs
    final = json.loads((full / "final.json").read_text())
    assert final["world_size"] == 2 and len(read_metrics(full)) == 2
    a, b = final["rank_param_checksums"]
    assert a == b
    ranks = load_checkpoint(full / "checkpoint.pt")["rng"]["ranks"]
    assert len(ranks) == 2 and set(ranks[0]["fqt"]) == set(ranks[1]["fqt"])
    assert len(ranks[0]["fqt"]) == 4  # every FQT layer has drawn noise
    for layer, state in ranks[0]["fqt"].items():
        assert not torch.equal(state, ranks[1]["fqt"][layer]), f"{layer}: same noise on both ranks"
    # The reported validation loss is the saved model's (rank 0's BatchNorm statistics on
    # every rank's shard), not each rank scoring its shard with its own last-batch statistics
    # (those differ by about 1e-3 of the loss).
    assert final["val_loss"] == pytest.approx(_sharded_val_loss(full, 2), rel=1e-6, abs=0)

    stopped = tmp_path / "stopped"
    driver = tmp_path / "die_after_step_8.py"
    driver.write_text(DIE_AFTER_STEP_8)
    result = _torchrun(str(driver), *args, "--out", str(stopped))
    assert result.returncode != 0 and not (stopped / "final.json").exists()
    state = load_checkpoint(stopped / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, 8, 2)
    result = _torchrun("-m", "fqtorch", "train", "--resume", str(stopped))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming in epoch 2 at step 8 (2 of its 6 steps done)" in result.stderr
    assert json.loads((stopped / "final.json").read_text())["rank_param_checksums"] == [a, b]
    assert without_seconds(read_metrics(stopped)) == without_seconds(read_metrics(full))
    assert_same_parameters(full / "checkpoint.pt", stopped / "checkpoint.pt")


INF_LOSS_ON_RANK_1 = _patched_cli(
    """
calls = []
real_loss = loop._loss


def loss(*args):
    # An infinite loss with finite gradients (a constant added), on rank 1's second step.
    calls.append(1)
    out = real_loss(*args)
    return out + float("inf") if os.environ["RANK"] == "1" and len(calls) == 2 else out


loop._loss = loss
"""
)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed"
)
def test_one_ranks_infinite_loss_stops_every_rank_with_one_line(tmp_path):
    """Rank 1's loss alone is infinite, its gradients finite: every rank sees the sum of the
    losses, so all stop at the same step (rank 0 stepped on and hung up before), and rank 0
    alone prints the one line."""
    driver = tmp_path / "inf_loss.py"
    driver.write_text(INF_LOSS_ON_RANK_1)
    args = ["train", "--epochs", "1", "--max-steps-per-epoch", "4", "--batch-size", "32"]
    result = _torchrun(str(driver), *args, "--quiet", "--out", str(tmp_path / "r"))
    assert result.returncode != 0
    lines = [r for r in result.stderr.splitlines() if "fqtorch train: error:" in r]
    assert len(lines) == 1 and "at epoch 1, step 2 (mean loss over 2 processes inf" in lines[0]
    assert "/fqtorch/" not in result.stderr, result.stderr  # no traceback through fqtorch
    assert "Connection closed" not in result.stderr  # no rank went on to a lone collective


SAVE_FAILS_ON_RANK_0 = _patched_cli(
    """

def save(self, best=False):
    if os.environ["RANK"] == "0":
        raise TrainingError("could not write checkpoint.pt (planted)")


loop._Run.save = save
"""
)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed"
)
def test_a_rank_left_alone_says_one_line(tmp_path):
    """Rank 0 stops on an error of its own (a failed save) while rank 1 waits in a collective:
    rank 0's line comes first and rank 1 adds one line pointing at it, not a traceback."""
    driver = tmp_path / "save_fails.py"
    driver.write_text(SAVE_FAILS_ON_RANK_0)
    args = ["train", "--epochs", "2", "--max-steps-per-epoch", "2", "--batch-size", "32"]
    result = _torchrun(str(driver), *args, "--quiet", "--out", str(tmp_path / "r"))
    assert result.returncode != 0
    ours = [r for r in result.stderr.splitlines() if r.startswith("fqtorch train:")]
    assert ours[0] == "fqtorch train: error: could not write checkpoint.pt (planted)", ours
    assert len(ours) == 2 and ours[1].startswith("fqtorch train: rank 1 stopped: another"), ours
    assert "/fqtorch/" not in result.stderr, result.stderr  # no traceback through fqtorch


RANK_1_ARGS = _patched_cli(
    """
if os.environ["RANK"] == "1":  # a process started with other options than its peers
    sys.argv += os.environ["RANK_1_ARGS"].split()
"""
)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed"
)
@pytest.mark.parametrize("differ", ["option", "data"])
def test_processes_with_other_options_or_data_are_refused(tmp_path, monkeypatch, differ):
    """Rank 1 started with another --max-steps-per-epoch hung in a collective until gloo's
    30-minute timeout; rank 1 reading another corpus of the same length trained on, validating
    on two sets: now every rank stops before the model is built, rank 0 with one line naming
    the difference."""
    corpus = "".join(f"line {i}: the quick brown fox\n" for i in range(400))
    (tmp_path / "a.txt").write_text(corpus)
    (tmp_path / "b.txt").write_text(corpus[::-1])
    rank_1 = {"option": "--max-steps-per-epoch 3", "data": f"--data-dir {tmp_path / 'b.txt'}"}
    monkeypatch.setitem(ENV, "RANK_1_ARGS", rank_1[differ])
    driver = tmp_path / "rank_1_args.py"
    driver.write_text(RANK_1_ARGS)
    args = ["train", "--dataset", "text", "--data-dir", str(tmp_path / "a.txt"), "--epochs", "1"]
    args += ["--max-steps-per-epoch", "2", "--block-size", "16", "--batch-size", "8", "--quiet"]
    result = _torchrun(str(driver), *args, "--out", str(tmp_path / "r"))
    assert result.returncode != 0
    ours = [r for r in result.stderr.splitlines() if r.startswith("fqtorch train:")]
    says = {
        "option": "differ in their option max_steps_per_epoch: rank 0 has 2, rank 1 3;",
        "data": "differ in their training data: rank 0 has '",
    }
    assert len(ours) == 1 and says[differ] in ours[0], result.stderr
    assert "/fqtorch/" not in result.stderr, result.stderr  # no traceback through fqtorch
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


SIGTERM_ON_RANK_1_ONLY = _patched_cli(
    """
step = loop._Run._train_step


def train_step(self, x, y):
    if os.environ["RANK"] == "1" and self.step == 2:  # a signal that reached rank 1 alone
        self.stop.signal = signal.SIGTERM
    return step(self, x, y)


loop._Run._train_step = train_step
"""
)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed"
)
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """The stop flag travels with the step's loss in one collective: a signal that reached
    rank 1 alone, before its third step, stops both ranks after that step, with one
    checkpoint of step 3 (as when the flag had a collective of its own)."""
    driver = tmp_path / "sigterm_rank_1.py"
    driver.write_text(SIGTERM_ON_RANK_1_ONLY)
    args = ["train", "--epochs", "1", "--max-steps-per-epoch", "6", "--batch-size", "32"]
    result = _torchrun(str(driver), *args, "--quiet", "--out", str(tmp_path / "r"))
    assert result.returncode != 0, result.stderr[-3000:]
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["epoch_step"]) == (0, 3, 3)
    ours = [r for r in result.stderr.splitlines() if r.startswith("fqtorch train:")]
    assert len(ours) == 1 and "interrupted; saved" in ours[0], ours
    assert "step 3, in epoch 1" in ours[0]


BROADCAST_BUFFERS = """
import os

import torch
import torch.distributed as dist

from fqtorch.train import loop

dist.init_process_group("gloo")
rank = dist.get_rank()
module = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
module.register_buffer("transposed", torch.full((4, 3), float(rank)).t())
module.register_buffer("flags", torch.tensor([rank == 1, True]))
module.register_buffer("position_ids", (torch.arange(5) + rank).expand(1, -1))  # as in HF
module.register_buffer("expanded", torch.arange(5).expand(2, -1))  # a broadcast view
module.register_buffer("empty", torch.zeros(0))
module[0].running_mean.fill_(rank + 1.0)
module[0].num_batches_tracked.fill_(10 * rank + 3)
loop._broadcast_buffers(module)
assert module[0].running_mean.tolist() == [1.0] * 3
assert module[0].num_batches_tracked.item() == 3
assert module.transposed.tolist() == [[0.0] * 4] * 3 and module.transposed.stride() == (1, 3)
assert module.flags.tolist() == [False, True]
assert module.position_ids.tolist() == [[0, 1, 2, 3, 4]]
assert module.expanded.stride() == (0, 1)
dist.destroy_process_group()
print(f"rank {rank} ok")
"""


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed"
)
def test_buffers_are_broadcast_by_dtype_in_place(tmp_path):
    """Before validating, every rank takes rank 0's buffers: of every dtype, non-contiguous
    ones written in place (the flattened broadcast NCCL needs), a broadcast view left alone."""
    driver = tmp_path / "broadcast_buffers.py"
    driver.write_text(BROADCAST_BUFFERS)
    result = _torchrun(str(driver))
    assert result.returncode == 0, result.stderr[-3000:]
    # the two ranks share the launcher's stdout: their lines can interleave mid-line
    assert sorted(re.findall(r"rank \d ok", result.stdout)) == ["rank 0 ok", "rank 1 ok"]


def _sharded_val_loss(run: Path, world: int) -> float:
    """The validation loss of ``run``'s checkpoint scored as a ``world``-rank run scores it:
    each rank's strided shard in batches of the run's size (the forward's per-batch input
    scales depend on them), summed over the ranks."""
    record = json.loads((run / "config.json").read_text())
    cfg = record["config"]
    model = fqtorch.quantize_model(
        fqtorch.models.build_model(cfg["model"]), fqtorch.FQTConfig(**record["fqt"])
    )
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    model.eval()
    val = build_datasets(cfg["dataset"], seed=cfg["seed"]).val
    total, count = 0.0, 0
    with torch.no_grad():
        for rank in range(world):
            shard = torch.utils.data.Subset(val, range(rank, len(val), world))
            for x, y in torch.utils.data.DataLoader(shard, cfg["batch_size"]):
                total += float(torch.nn.functional.cross_entropy(model(x), y)) * len(y)
                count += len(y)
    return total / count


def _torchrun(*command: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *command]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed"
)
def test_fsdp_trains_checkpoints_and_resumes(tmp_path):
    """``--fsdp`` under torchrun (2 CPU processes, gloo): the loss falls, the ranks end with the
    same (gathered) parameters, the checkpoint holds the whole tensors, not a rank's shards, and
    a run stopped within an epoch resumes to exactly the uninterrupted result."""
    args = ["train", "--fsdp", "--epochs", "2", "--max-steps-per-epoch", "6", "--batch-size"]
    args += ["32", "--checkpoint-every", "4", "--quiet"]
    full = tmp_path / "full"
    result = _torchrun("-m", "fqtorch", *args, "--out", str(full))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (FSDP2: parameters sharded per FQT layer)" in result.stderr
    first, second = read_metrics(full)
    assert second["train_loss"] < 0.7 * first["train_loss"]
    assert second["val_loss"] < first["val_loss"]
    final = json.loads((full / "final.json").read_text())
    a, b = final["rank_param_checksums"]
    assert a == b
    state = load_checkpoint(full / "checkpoint.pt")
    model = fqtorch.quantize_model(
        fqtorch.models.build_model("digits_cnn"), fqtorch.FQTConfig.preset("bhq5")
    )
    model.load_state_dict(state["model"])  # whole tensors, the model's own names
    params = [p.detach().double() for p in model.parameters()]
    assert float(sum(p.sum() + p.square().sum() for p in params)) == pytest.approx(a, rel=1e-12)

    stopped = tmp_path / "stopped"
    driver = tmp_path / "die_after_step_8.py"
    driver.write_text(DIE_AFTER_STEP_8)
    result = _torchrun(str(driver), *args, "--out", str(stopped))
    assert result.returncode != 0 and not (stopped / "final.json").exists()
    result = _torchrun("-m", "fqtorch", "train", "--resume", str(stopped))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming in epoch 2 at step 8 (2 of its 6 steps done)" in result.stderr
    assert json.loads((stopped / "final.json").read_text())["rank_param_checksums"] == [a, b]
    assert without_seconds(read_metrics(stopped)) == without_seconds(read_metrics(full))
    assert_same_parameters(full / "checkpoint.pt", stopped / "checkpoint.pt")


FULLY_SHARD_MLP = """
import copy
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import fqtorch

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
fqtorch.quantize_model(model, fqtorch.FQTConfig.preset("bhq5"))
g = torch.Generator().manual_seed(rank)
teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(123))  # learnable labels
x = torch.randn(64, 16, generator=g)
y = (x @ teacher).argmax(1)


def loss_of(m):
    return nn.functional.cross_entropy(m(x), y)


# The reference: every rank's FQT gradient on its own batch and noise, unsharded, averaged.
plain = copy.deepcopy(model)
fqtorch.reseed(plain, 1 + rank)
loss_of(plain).backward()
expected = [p.grad for p in plain.parameters()]
for grad in expected:
    dist.all_reduce(grad)
    grad /= dist.get_world_size()

fqtorch.reseed(model, 1 + rank)
for layer in reversed(list(fqtorch.fqt_modules(model).values())):
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
losses = []
for step in range(30):
    optimizer.zero_grad()
    loss = loss_of(model)
    loss.backward()
    if step == 0:
        for p, grad in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad.full_tensor(), grad, rtol=1e-5, atol=1e-6)
    optimizer.step()
    losses.append(loss.item())
assert losses[-1] < 0.5 * losses[0], losses
print("ok", rank, losses[0], losses[-1], flush=True)
# Tear gloo down while Python is fully alive, as fqtorch.train does (_shut_down): the sharded
# model freed during interpreter shutdown aborted a rank at exit ("terminate called without an
# active exception") in 3 of 8 runs, at this session's code and before it, and once more in CI
# with a barrier alone. Every check above has passed by now; skip the interpreter's teardown.
del optimizer, model, loss
gc.collect()
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed"
)
def test_fully_shard_over_quantize_model(tmp_path):
    """FSDP2's ``fully_shard`` over FQT layers (2 gloo ranks): the first step's gradient is the
    ranks' average FQT gradient, each rank with its own batch and noise, and training lowers
    the loss."""
    script = tmp_path / "fully_shard_mlp.py"
    script.write_text(FULLY_SHARD_MLP)
    result = _torchrun(str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 2


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
