"""``fqtorch plan`` / ``autobits`` end to end, and ``fqtorch train --bits-plan``."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from fqtorch.convert import fqt_modules
from fqtorch.stats import load_plan
from fqtorch.train import TrainConfig

from .helpers import fqtorch_main

TINY = ("--batch-size", "16", "--batches", "2", "--samples", "2", "--bits", "4,8")
SHORT = ("--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "8", "--quiet")


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    assert fqtorch_main("autobits", *TINY, "--quantizers", "psq", "--out", out) == 0
    return out / "plan.json"


def test_plan_cli_writes_the_schema_and_prints_the_table(plan_file, tmp_path, capsys):
    payload = json.loads(plan_file.read_text())
    for key in ("budget", "sampling_variance", "predicted_quantization_variance"):
        assert isinstance(payload[key], float)
    assert isinstance(payload["measured_quantization_variance"], float)
    names = [layer["name"] for layer in payload["layers"]]
    assert names == ["features.0", "features.3", "classifier.1", "classifier.3"]
    for layer in payload["layers"]:
        assert layer["grad_quantizer"] == "psq" and layer["grad_bits"] in (4, 8)
        assert layer["grad_weight_quantizer"] == "per_column"
        assert layer["grad_weight_bits"] in (4, 8)
    assert fqtorch_main("plan", *TINY, "--budget", "1000", "--out", tmp_path) == 0
    table = capsys.readouterr().out
    assert "predicted" in table and "measured" in table
    assert "classifier.3             grad_weight  per_column4" in table  # lowest: budget is huge


def test_plan_cli_bad_flags(tmp_path, capsys):
    assert fqtorch_main("plan", "--quantizers", "nope", "--out", tmp_path) == 2
    assert "--quantizers: 'nope' is not a registered quantizer" in capsys.readouterr().err
    assert fqtorch_main("plan", "--batches", "1", "--out", tmp_path) == 2
    assert "--batches must be >= 2" in capsys.readouterr().err
    # variance's NAME+TRANSFORM form and an unknown preset: the line names the flag typed
    assert fqtorch_main("plan", "--weight-quantizers", "psq+rht16", "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert "--weight-quantizers: 'psq+rht16': a plan's candidates are quantizer names" in err
    assert fqtorch_main("plan", "--preset", "nope", "--out", tmp_path) == 2
    assert "error: --preset: unknown preset 'nope'; known presets: exact, qat" in (
        capsys.readouterr().err
    )
    for flags, message in [
        (("--budget", "inf"), "--budget must be a finite number > 0, got inf"),
        (("--block-size", "0"), "--block-size must be >= 1, got 0"),
        (("--device", "nope"), "--device 'nope' is not a device; give cpu, cuda or cuda:N"),
        (("--sampling-batches", "30"), "need 34 batches; the 1437 training samples make 22"),
    ]:
        assert fqtorch_main("plan", *flags, "--out", tmp_path) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_plan_cli_checks_its_out_before_measuring(tmp_path, monkeypatch, capsys):
    """An --out that cannot be made fails before the (long) measurement, not after it."""
    from fqtorch.stats import plan_cli

    def never(*args, **kwargs):
        raise AssertionError("measured before --out was checked")

    monkeypatch.setattr(plan_cli, "plan_precision", never)
    (tmp_path / "file").write_text("x")
    assert fqtorch_main("plan", *TINY, "--out", tmp_path / "file" / "plan") == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_plan_under_a_transforming_preset(tmp_path, caplog):
    """A preset with a transform before the gradient quantizers plans without it (a plan's
    candidates are bare quantizers); training with it then says that the transform, like nearest
    rounding, was not what the plan measured."""
    out = tmp_path / "plan"
    flags = ("--bits", "4", "--quantizers", "psq", "--sampling-batches", "2")
    assert fqtorch_main("plan", *TINY, *flags, "--preset", "mxfp4_rht_sr", "--out", out) == 0
    with_ = load_plan(out / "plan.json").measured_with
    assert with_["backward"]["grad_transform"] is None and with_["sampling_batches"] == 2
    args = ("train", "--bits-plan", out / "plan.json", *SHORT[:4], "--batch-size", "16")
    assert fqtorch_main(*args, "--grad-rounding", "nearest", "--out", tmp_path / "r") == 0
    said = [r.getMessage() for r in caplog.records if "was measured with" in r.getMessage()]
    assert len(said) == 1 and "grad_rounding='stochastic' (this run 'nearest')" in said[0], said
    caplog.clear()  # under the plan's own preset: the transform it left out, and the remedy
    assert fqtorch_main(*args, "--preset", "mxfp4_rht_sr", "--out", tmp_path / "s") == 0
    said = [r.getMessage() for r in caplog.records if "was measured with" in r.getMessage()]
    assert len(said) == 1 and "(--grad-transform none trains as it was measured)" in said[0]


def test_plan_cli_takes_the_sampling_batches_the_data_hold(tmp_path):
    """Without --sampling-batches, 16 or what the training set holds beside the verification
    batches: a batch of 128 on digits makes 11 (a plan that ran before the option is not
    refused); an explicit value the data cannot hold is, before --out is made."""
    out = tmp_path / "p"
    tiny = ("--batches", "2", "--samples", "2", "--bits", "4,8", "--quantizers", "psq")
    assert fqtorch_main("plan", *tiny, "--batch-size", "128", "--out", out) == 0
    assert load_plan(out / "plan.json").measured_with["sampling_batches"] == 9
    refused = tmp_path / "q"
    flags = ("--batch-size", "128", "--sampling-batches", "16", "--out", refused)
    assert fqtorch_main("plan", *tiny, *flags) == 2
    assert not refused.exists()


def test_train_with_a_bits_plan(plan_file, tmp_path):
    from fqtorch.data import build_datasets
    from fqtorch.train.loop import _build_model

    out = tmp_path / "run"
    assert fqtorch_main("train", "--bits-plan", plan_file, *SHORT, "--out", out) == 0
    assert (out / "metrics.jsonl").is_file()
    cfg = TrainConfig(bits_plan=str(plan_file))
    model, _ = _build_model(
        cfg, build_datasets("digits"), SimpleNamespace(device=torch.device("cpu"))
    )
    plan = load_plan(plan_file)
    for name, layer in fqt_modules(model).items():
        chosen = plan.layer(name)
        assert (layer.config.grad_quantizer, layer.config.grad_bits) == chosen.choice("grad")
        assert (layer.config.grad_weight_quantizer, layer.config.grad_weight_bits) == (
            chosen.choice("grad_weight")
        )
        assert layer.config.input_bits == 8  # the forward comes from --preset


def test_a_run_resumes_only_with_the_plan_it_started_with(plan_file, tmp_path, capsys):
    """The plan's file is read again on --resume; a plan changed since is refused (it would
    switch the run's quantizers silently), reformatting it is not a change."""
    plan = tmp_path / "plan.json"
    plan.write_text(plan_file.read_text())
    out = tmp_path / "run"
    assert fqtorch_main("train", "--bits-plan", plan, *SHORT, "--out", out) == 0
    payload = json.loads(plan.read_text())
    plan.write_text(json.dumps(payload))  # the same plan, laid out differently
    assert fqtorch_main("train", "--resume", out, "--epochs", "2") == 0
    payload["layers"][0]["grad_quantizer"] = "ptq"
    plan.write_text(json.dumps(payload, indent=2))
    capsys.readouterr()
    code = fqtorch_main("train", "--resume", out, "--epochs", "3")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "was trained with another plan than" in err and "Traceback" not in err


def test_a_plan_measured_at_another_batch_size_is_said(plan_file, tmp_path, caplog):
    payload = json.loads(plan_file.read_text())
    assert payload["measured_with"]["batch_size"] == 16
    assert payload["measured_with"]["sampling_batches"] == 16  # --sampling-batches' default
    assert payload["measured_with"]["forward"]["input_bits"] == 8
    args = ("train", "--bits-plan", plan_file, "--epochs", "1", "--max-steps-per-epoch", "1")
    assert fqtorch_main(*args, "--batch-size", "8", "--quiet", "--out", tmp_path / "a") == 0
    said = [r.getMessage() for r in caplog.records if "was measured with" in r.getMessage()]
    assert len(said) == 1 and "batch size 16 (this run 8)" in said[0], said
    caplog.clear()
    assert fqtorch_main(*args, "--batch-size", "16", "--quiet", "--out", tmp_path / "b") == 0
    assert not [r for r in caplog.records if "was measured with" in r.getMessage()]


def _edited(plan_file, tmp_path, edit) -> str:
    payload = json.loads(plan_file.read_text())
    edit(payload)
    path = tmp_path / f"edited{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_bad_bits_plans_are_one_line_errors(plan_file, tmp_path, capsys):
    def rename(payload):
        payload["layers"][0]["name"] = "features.9"

    cases = [
        (tmp_path / "missing.json", "does not exist"),
        (_edited(plan_file, tmp_path, lambda p: p.pop("layers")), "lacks the keys ['layers']"),
        (_edited(plan_file, tmp_path, rename), "no layer 'features.0'"),
    ]
    for path, message in cases:
        assert fqtorch_main("train", "--bits-plan", path, *SHORT, "--out", tmp_path / "r") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    args = ("--bits-plan", plan_file, "--grad-bits", "4", "--out", tmp_path / "r")
    assert fqtorch_main("train", *args) == 2
    assert "leave out ['grad_bits']" in capsys.readouterr().err


class _Killed(BaseException):
    pass


ADAPTIVE = ("--variance-every", "1", "--adaptive-precision", "3", "--epochs", "2")
ADAPTIVE += ("--max-steps-per-epoch", "5", "--batch-size", "8", "--checkpoint-every", "4")


def test_adaptive_precision_logs_changes_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    from fqtorch.train import load_checkpoint
    from fqtorch.train import loop as train_loop

    from .helpers import read_metrics

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    with caplog.at_level(logging.INFO, logger="fqtorch"):
        assert fqtorch_main("train", *ADAPTIVE, "--quiet", "--out", whole) == 0
    said = [r.getMessage() for r in caplog.records]
    assert sum("gradient bits re-chosen every 3 steps" in m for m in said) == 1
    for step in (3, 6, 9):  # every window says what it decided, a change or none
        assert any(m.startswith(f"step {step}: ") for m in said), (step, said)
    real_save = train_loop.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if path.name == "checkpoint.pt" and state["step"] == 4:
            raise _Killed  # mid-window: one measurement since the re-plan at step 3

    monkeypatch.setattr(train_loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        fqtorch_main("train", *ADAPTIVE, "--quiet", "--out", killed)
    monkeypatch.setattr(train_loop, "save_checkpoint", real_save)
    assert load_checkpoint(killed / "checkpoint.pt")["precision"]["window"]["count"] == 1
    assert fqtorch_main("train", "--resume", killed) == 0
    a, b = (load_checkpoint(d / "checkpoint.pt") for d in (whole, killed))
    assert a["precision"] == b["precision"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    events = [m for m in read_metrics(whole) if m.get("event") == "precision"]
    assert events, "the digits CNN at bhq5 has room: some layer's bits move"
    assert events == [m for m in read_metrics(killed) if m.get("event") == "precision"]
    assert {"step", "layer", "bits", "new_bits", "ratio"} <= set(events[0])


def test_adaptive_precision_needs_variance_every(tmp_path, capsys):
    args = ("--adaptive-precision", "3", "--out", tmp_path / "r")
    assert fqtorch_main("train", *args) == 2
    assert "give --variance-every K" in capsys.readouterr().err


def test_adaptive_precision_from_a_plan_keeps_its_frontiers(plan_file, tmp_path):
    from fqtorch.train import load_checkpoint

    out = tmp_path / "run"
    args = ("--bits-plan", plan_file, *ADAPTIVE, "--quiet", "--out", out)
    assert fqtorch_main("train", *args) == 0
    state = load_checkpoint(out / "checkpoint.pt")["precision"]
    plan = load_plan(plan_file)
    saved = {(n, b): rows for n, b, rows in state["frontiers"]}
    for layer in plan.layers:  # the plan's frontiers, as fractions of its sampling variance
        rows = layer.frontier["grad_weight"]
        got = saved[(layer.name, "grad_weight")]
        assert [r[:2] for r in got] == [r[:2] for r in rows]
        assert got[0][3] == pytest.approx(rows[0][3] / plan.sampling_variance)


def test_plan_cli_infeasible_budget_warns_in_one_line(tmp_path):
    """The planner's warning is shown after its progress bar, once, as fqtorch's own (the
    command line then says it in one line, ``fqtorch plan: warning: ...``: see
    test_the_command_line_says_a_warning_in_one_line)."""
    import fqtorch

    with pytest.warns(fqtorch.FQTWarning) as said:
        assert fqtorch_main("plan", *TINY, "--budget", "1e-12", "--out", tmp_path) == 0
    said = [str(w.message) for w in said if "not met" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0], said


@pytest.mark.slow
def test_ddp_adaptive_precision_resumes_mid_window_exactly(tmp_path):
    """torchrun, 2 CPU processes: the step-8 checkpoint falls within a re-plan window (steps 7,
    8 of 7..9); it holds the window summed over both ranks (2 ranks x 2 measurements), and the
    resumed run logs the same decisions and ends with the same parameters."""
    import shutil
    import subprocess

    from fqtorch.train import load_checkpoint

    from .helpers import ENV, assert_same_parameters, read_metrics, without_seconds
    from .test_train import DIE_AFTER_STEP_8, TORCHRUN

    if shutil.which("torchrun") is None and not TORCHRUN.exists():
        pytest.skip("torchrun not installed")
    args = ["train", "--epochs", "2", "--max-steps-per-epoch", "6", "--batch-size", "32"]
    args += ["--checkpoint-every", "4", "--quiet", "--variance-every", "1"]
    args += ["--adaptive-precision", "3"]

    def torchrun(*command) -> subprocess.CompletedProcess:
        cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *map(str, command)]
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    result = torchrun("-m", "fqtorch", *args, "--out", full)
    assert result.returncode == 0, result.stderr[-3000:]
    driver = tmp_path / "die_after_step_8.py"
    driver.write_text(DIE_AFTER_STEP_8)
    result = torchrun(driver, *args, "--out", stopped)
    assert result.returncode != 0
    assert load_checkpoint(stopped / "checkpoint.pt")["precision"]["window"]["count"] == 4
    result = torchrun("-m", "fqtorch", "train", "--resume", stopped)
    assert result.returncode == 0, result.stderr[-3000:]
    assert without_seconds(read_metrics(stopped)) == without_seconds(read_metrics(full))
    a, b = (load_checkpoint(d / "checkpoint.pt")["precision"] for d in (full, stopped))
    assert a == b
    assert_same_parameters(full / "checkpoint.pt", stopped / "checkpoint.pt")


def test_plan_for_a_trained_checkpoint(plan_file, tmp_path, capsys):
    """``--checkpoint`` plans for the trained model (its sampling variance is not the fresh
    model's under the same flags); a file that is not a checkpoint gets one clear line."""
    run = tmp_path / "run"
    assert fqtorch_main("train", *SHORT, "--lr", "0.5", "--out", run) == 0
    out = tmp_path / "plan"
    flags = (*TINY, "--quantizers", "psq", "--checkpoint", run / "checkpoint.pt")
    assert fqtorch_main("plan", *flags, "--out", out) == 0
    trained = json.loads((out / "plan.json").read_text())
    fresh = json.loads(plan_file.read_text())
    assert trained["sampling_variance"] != pytest.approx(fresh["sampling_variance"], rel=1e-3)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert fqtorch_main("plan", *TINY, "--checkpoint", bad, "--out", tmp_path / "p2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pt" in err[0], err


def test_adaptive_precision_writes_tensorboard_and_names_drowned_layers(
    tmp_path, monkeypatch, caplog
):
    """End to end: every re-plan writes each layer's bits to TensorBoard (``precision/*``, at
    the re-plan steps), and the low-SNR warning reaches the log. The threshold is raised so
    that every layer measured at its most bits is "drowned" (8-bit gradients, the top)."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fqtorch.stats import plan as plan_module

    class Strict(plan_module.PrecisionController):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, snr_threshold=1e30)

    monkeypatch.setattr(plan_module, "PrecisionController", Strict)
    out = tmp_path / "run"
    args = (*ADAPTIVE, "--grad-bits", "8", "--tensorboard", "--quiet", "--out", out)
    with caplog.at_level(logging.WARNING, logger="fqtorch"):
        assert fqtorch_main("train", *args) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("precision/")]
    layers = set(fqt_modules(_digits_model()))
    assert {t.split("/")[1] for t in tags} == layers
    assert {t.rsplit("/", 1)[1] for t in tags} == {"grad_bits", "grad_weight_bits"}
    assert [e.step for e in events.Scalars(tags[0])] == [3, 6, 9]
    warnings = [r.getMessage() for r in caplog.records if "signal-to-quantization" in r.message]
    assert len(warnings) == 1 and all(n in warnings[0] for n in layers), warnings


def _digits_model():
    from fqtorch import FQTConfig, quantize_model
    from fqtorch.models import build_model

    return quantize_model(build_model("digits_cnn", num_classes=10), FQTConfig())
