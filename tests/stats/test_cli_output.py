"""What ``fqtorch variance`` prints: the conversion summary once, not once per configuration."""

from __future__ import annotations

import json
import logging

import pytest

from fqtorch.cli import main


@pytest.mark.slow
def test_variance_says_the_conversion_summary_once(tmp_path, caplog):
    """Three configurations and a profile convert the model five times; the summary of which
    layers are FQT (the same every time) is logged once, and the convert logger's level is
    restored after the run."""
    convert = logging.getLogger("fqtorch.convert")
    level = convert.level
    args = ["variance", "--quantizers", "ptq,psq,bhq", "--bits", "4", "--batch-size", "16"]
    args += ["--batches", "2", "--samples", "4", "--profile-samples", "2", "--full-batches", "1"]
    with caplog.at_level(logging.INFO):
        assert main([*args, "--out", str(tmp_path / "v")]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("FQT conversion:") for m in messages) == 1, messages
    assert sum("3/3," in m for m in messages) == 1  # every configuration still ran and said so
    assert convert.level == level


def test_variance_grad_rounding_reaches_every_configuration(tmp_path, monkeypatch):
    """--grad-rounding nearest measures the biased ablation: every measured configuration and
    the profile run with nearest rounding, and variance.json says which rounding it used."""
    import json

    from fqtorch.stats import cli as stats_cli

    seen = []
    measure = stats_cli._measure_config

    def spy(model, cfg, *args, **kwargs):
        seen.append(cfg.grad_rounding)
        return measure(model, cfg, *args, **kwargs)

    monkeypatch.setattr(stats_cli, "_measure_config", spy)
    args = ["variance", "--quantizers", "ptq,psq", "--bits", "4", "--batch-size", "16"]
    args += ["--batches", "2", "--samples", "4", "--profile", "none", "--full-batches", "1"]
    assert main([*args, "--grad-rounding", "nearest", "--out", str(tmp_path / "v")]) == 0
    assert seen == ["nearest", "nearest"]
    results = json.loads((tmp_path / "v" / "variance.json").read_text())["results"]
    assert [r["rounding"] for r in results] == ["nearest", "nearest"]


def test_variance_and_plan_keep_earlier_results_unless_overwrite(tmp_path, capsys, monkeypatch):
    """A second measurement into the same --out is refused before any work, and replaces every
    earlier file with --overwrite (a profile left from the earlier run would describe another
    measurement)."""
    out = tmp_path / "v"
    args = ["variance", "--quantizers", "ptq", "--bits", "4", "--batch-size", "16",
            "--batches", "2", "--samples", "4", "--out", str(out)]  # fmt: skip
    assert main([*args, "--profile-samples", "2"]) == 0
    assert (out / "variance_profile.png").exists()
    before = (out / "variance.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--profile", "none"]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert (out / "variance.json").read_bytes() == before
    # stopped (Ctrl-C) before it has measured anything, an --overwrite run loses nothing
    from fqtorch.stats import cli as stats_cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stats_cli, "_measure_config", interrupted)
    assert main([*args, "--profile", "none", "--overwrite"]) == 130
    monkeypatch.undo()
    assert (out / "variance.json").read_bytes() == before
    assert (out / "variance_profile.png").exists()
    assert main([*args, "--profile", "none", "--overwrite"]) == 0
    assert not (out / "variance_profile.png").exists()
    plan = ["plan", "--bits", "4,8", "--batch-size", "16", "--batches", "2", "--samples", "2",
            "--quantizers", "psq", "--out", str(tmp_path / "p")]  # fmt: skip
    assert main(plan) == 0
    capsys.readouterr()
    assert main(plan) == 2
    assert "already holds results (plan.json)" in capsys.readouterr().err
    assert main([*plan, "--overwrite"]) == 0


def test_variance_full_batches_must_be_positive(tmp_path, capsys):
    assert main(["variance", "--full-batches", "0", "--out", str(tmp_path / "v")]) == 2
    assert "--full-batches must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_a_repeated_quantizer_or_bit_width_is_refused(tmp_path, capsys):
    """``ptq,,ptq`` measured ptq twice (and drew two rows for it)."""
    assert main(["variance", "--quantizers", "ptq,,ptq", "--out", str(tmp_path / "v")]) == 2
    assert "--quantizers names ptq more than once" in capsys.readouterr().err
    assert main(["plan", "--bits", "4,4", "--out", str(tmp_path / "p")]) == 2
    assert "--bits names 4 more than once" in capsys.readouterr().err


def test_ctrl_c_keeps_the_configurations_measured(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the grid: exit 130, and the configurations already measured are in
    variance.json, marked interrupted (variance_details.json, the sign of a finished run, is
    not written)."""
    from fqtorch.stats import cli as stats_cli

    real, calls = stats_cli._measure_config, []

    def second_is_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stats_cli, "_measure_config", second_is_interrupted)
    out = tmp_path / "v"
    args = ["variance", "--quantizers", "ptq,psq", "--bits", "4", "--batch-size", "16",
            "--batches", "2", "--samples", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 130
    saved = json.loads((out / "variance.json").read_text())
    assert saved["interrupted"] == "after 1 of 2" and len(saved["results"]) == 1
    assert not (out / "variance_details.json").exists()
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["variance", "plan"])
def test_help_gives_every_default(command, capsys):
    """``fqtorch variance --help`` and ``fqtorch plan --help`` say the default of every option
    that has one (``--budget``, ``--bits``, ``--quantizers``, ``--samples``, ...): a value as
    ``(default: VALUE)``, a default resolved at run time (``--model``) in words."""
    import argparse

    from fqtorch.cli import build_parser

    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if action.default in (None, False):  # a flag, a path, or resolved at run time
            if action.dest in ("model", "batch_size", "full_batches", "profile"):
                assert "default: " in action.help, action.dest  # in words
            continue
        assert "(default: %(default)s)" in (action.help or "") or "default: %(default)s)" in (
            action.help or ""
        ), action.dest
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    expected = ["--bits BITS", "(default: 4,5,6,7,8)", "--samples SAMPLES"]
    if command == "plan":
        expected += ["--budget BUDGET fraction of sampling variance (default: 0.1)"]
    else:
        expected += ["--alpha ALPHA", "default: 0.001)", "(default: ptq,psq,bhq,rht)"]
    for phrase in expected:
        assert phrase in text, phrase
