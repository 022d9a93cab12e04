"""The benchmark scripts run and print their ratios (no timing is asserted: speed is measured
by running them, docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str, script: str = "gemm.py", compile: bool = True) -> subprocess.CompletedProcess:
    """The script's run; ``compile=False`` runs torch.compile'd code eagerly (the script's own
    logic and output are under test, not the kernels: tests/quantizers test those)."""
    env = None if compile else {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_gemm_prints_every_variant_with_ratios():
    done = _run("--shapes", "64x32x16", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    for variant in ("fp32", "bf16_autocast", "int_mm", "int_mm_bt"):
        assert any(line.startswith(variant + " ") for line in done.stdout.splitlines()), variant
    assert "fp32/x" in done.stdout and "bf16/x" in done.stdout


def test_conv_step_runs_channels_last_layers():
    """A layer step with channels-last input and ``grad_output`` (as inside a model) runs every
    baseline and the int8 step, and prints the overhead measure."""
    done = _run(
        *("--layers", "r56_stage3", "--batch", "2", "--repeats", "1", "--channels-last"),
        *("--variants", "fp32,bf16*,fqt_int8_psq5"),
        script="conv_step.py",
        compile=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(x.strip().startswith("fqt_int8_psq5") and "outside" in x for x in lines), lines
    assert "fell back" not in done.stdout


def test_linear_step_measures_both_roundings():
    """The int8 step with stochastic and with round-to-nearest gradients (what the noise costs)
    runs beside the baselines, each with its overhead measure."""
    done = _run(
        *("--shapes", "64x32x16", "--repeats", "1", "--top-ops", "3"),
        *("--variants", "fp32,bf16*,fqt_int8_psq5_fused*"),
        script="linear_step.py",
        compile=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("fqt_int8_psq5_fused", "fqt_int8_psq5_fused_nearest"):
        assert f"{name}: outside _int_mm" in done.stdout, name
    assert "ms/step" in done.stdout  # --top-ops


def test_weight_gradient_checks_and_prints_both_products():
    done = _run(
        "--shapes", "64x32x16", "--repeats", "1", script="weight_gradient.py", compile=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "64x32x16 | weight gradient |" in done.stdout
    assert "64x32x16 | grad_input |" in done.stdout
    bad = _run("--shapes", "63x32x16", script="weight_gradient.py")
    assert bad.returncode != 0 and "--shapes: expected MxKxO" in bad.stderr


def test_conv_weight_gradient_checks_and_prints_both_paths():
    """Both integer paths of a strided layer's weight gradient (checked equal by the script),
    from both code layouts, beside fp32 and bf16, and which one the backend takes."""
    done = _run(
        "--layers", "2x8x4x9x3x2", "--repeats", "1", script="conv_weight_gradient.py",
        compile=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(the backend takes im2col)" in done.stdout
    for path in ("taps", "im2col"):
        for layout in ("NCHW", "channels-last"):
            assert f"int8 {path}, {layout} codes |" in done.stdout
    assert "fp32 / path | bf16 / path" in done.stdout
    bad = _run("--layers", "2x8x4", script="conv_weight_gradient.py")
    assert bad.returncode != 0 and "--layers: expected NxCxOxSxKxSTRIDE" in bad.stderr


def test_gradient_grid_checks_and_prints_every_layer():
    done = _run("--repeats", "1", script="gradient_grid.py", compile=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [x for x in done.stdout.splitlines() if x.endswith((" | True", " | False"))]
    assert len(rows) == 6 and rows[0].startswith("ResNet-50 conv2")


def test_gemm_bad_shape_is_one_line():
    done = _run("--shapes", "64x32")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("--shapes: expected MxKxN")


def test_train_step_counts_integer_convolutions_as_integer_kernels(tmp_path):
    """ResNet-18 (small images here) runs fp32, bf16 and the int8 step; the overhead measure
    counts oneDNN's integer convolutions with ``_int_mm`` as integer kernels."""
    out = tmp_path / "train_step.json"
    done = _run(
        *("--models", "resnet18", "--image-size", "32", "--batch", "2", "--repeats", "1"),
        *("--variants", "fp32,bf16*,fqt_int8_psq5", "--json", str(out)),
        script="train_step.py",
        compile=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resnet18, batch 2" in done.stdout
    assert any(x.startswith("fqt_int8_psq5: outside") for x in done.stdout.splitlines())
    from fqtorch.backends.int8_qconv import qconv_verdict

    int8 = json.loads(out.read_text())["models"]["resnet18"]["fqt_int8_psq5"]
    qconv, int_mm = int8["onednn::qconv2d_pointwise"], int8["aten::_int_mm"]
    assert int_mm > 0, int8  # the classifier (and the convolutions' fallback)
    if qconv_verdict() is None:  # this CPU's integer convolutions are exact: they run
        assert qconv > 0, int8
    inside = sum(v for k, v in int8.items() if "::" in k)
    assert int8["integer_kernels"] == pytest.approx(inside, rel=1e-9)  # every one counted
    assert int8["float_products"] > 0 and int8["outside_float_products"] >= 0, int8
    assert int8["ceiling"] > 0 and int8["integer_kernels_median"] > 0, int8
    assert any(x.startswith("fqt_int8_psq5: ceiling ") for x in done.stdout.splitlines())


def test_float_parts_count_a_product_once(monkeypatch):
    """A convolution's forward and backward are products, counted once with what they call
    (aten::convolution calls _convolution calls the kernel), so they stay within the step's op
    time and hold most of a convolution's step; an op outside them (a large elementwise one)
    lands outside."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 64, 64, requires_grad=True)
    big = torch.randn(4_000_000)

    def step() -> None:
        conv(x).sum().backward()

    def step_and_more() -> None:
        step()
        for _ in range(5):
            big.mul(2.0).add_(1.0)

    def parts(fn) -> tuple[float, float]:  # (products, outside) of one profiled step
        return common._float_parts(common._profiled(fn))

    step()  # warm
    products, outside = parts(step)
    # the backward (about two thirds of the products) counted too: outside is what is left
    assert 0 <= outside < 0.5 * products, (products, outside)
    products, outside = parts(step_and_more)
    assert outside > 0.1 * products, (products, outside)
    # every level of the forward convolution named: each of them nests in the one above
    nested = ("aten::convolution", "aten::_convolution", *common.FLOAT_PRODUCTS)
    monkeypatch.setattr(common, "FLOAT_PRODUCTS", nested)
    products, outside = parts(lambda: conv(x))
    assert 0 <= outside < products, (products, outside)
    assert common.ceiling(3.0, 1.0, 1.0) == pytest.approx(2.0)


def test_train_step_unknown_model_is_one_line():
    done = _run("--models", "resnet1", script="train_step.py")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("--models: unknown model 'resnet1'")


def test_column_ranges_prints_both_reductions():
    done = _run(
        "--shapes", "130x24,64x8", "--repeats", "1", script="column_ranges.py", compile=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "130x24 | " in done.stdout and "64x8 | " in done.stdout
    row = next(x for x in done.stdout.splitlines() if x.startswith("130x24 | "))
    assert len(row.split(" | ")) == 8  # the shape, five column reductions, two row reductions
    assert "one stage: " in done.stdout and "two stages: " in done.stdout
    bad = _run("--shapes", "130", script="column_ranges.py")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("--shapes: expected ROWSxCOLS")


def test_uniform_encode_checks_and_prints_every_quantizer():
    done = _run("--shapes", "96x40", "--repeats", "1", script="uniform_encode.py", compile=False)
    assert done.returncode == 0, done.stderr[-2000:]
    names = ("ptq", "psq", "per_column", "symmetric", "symmetric_per_row")
    rows = [x.split(" | ") for x in done.stdout.splitlines() if x.split(" | ")[0] in names]
    assert [r[0] for r in rows] == list(names) and all(len(r) == 4 for r in rows)
    bad = _run("--shapes", "96", script="uniform_encode.py")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("--shapes: expected ROWSxCOLS")


def test_first_step_times_compiled_and_eager_steps():
    # the script's logic at a small size (its 2048 × 1024 default takes a minute on AVX2 CPUs)
    done = _run(
        "--steps", "2", "--rows", "64", "--features", "64", script="first_step.py", compile=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [x for x in done.stdout.splitlines() if x.startswith("linear int8 psq5")]
    assert len(lines) == 2 and "compiled" in lines[0] and "fused=False" in lines[1]
    assert all(x.split(": steps ")[1].count(",") == 1 and x.endswith(" s") for x in lines)
    bad = _run("--steps", "0", script="first_step.py")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == "--steps: expected at least 1, got 0"


def test_im2col_checks_and_prints_every_layer():
    done = _run("--batch", "1", "--repeats", "1", script="im2col.py")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [x for x in done.stdout.splitlines() if x.endswith("x") and " | " in x]
    layers = ["stem 7x7 s2", "layer2 3x3 s2", "layer2 shortcut 1x1 s2", "layer3 3x3 s2"]
    layers += ["PreAct ResNet-20 stage2 3x3 s2", "PreAct ResNet-20 stage3 3x3 s2"]
    assert [x.split(" | ")[0] for x in rows] == layers * 2  # im2col, then the product
    orders = [x for x in done.stdout.splitlines() if x.endswith((" | True", " | False"))]
    assert [x.split(" | ")[0] for x in orders] == layers  # (C, kh, kw) against (kh, kw, C)
    bad = _run("--batch", "0", script="im2col.py")
    assert bad.returncode != 0 and "--batch" in bad.stderr.strip().splitlines()[-1]


def test_code_sums_checks_and_prints_every_row():
    done = _run("--repeats", "1", script="code_sums.py")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [x.split(" | ")[0] for x in done.stdout.splitlines() if x.endswith("x") and " | " in x]
    assert len(rows) == 4 and rows[-1].startswith("fits_float32")
    bad = _run("--repeats", "0", script="code_sums.py")
    assert bad.returncode != 0 and "--repeats" in bad.stderr.strip().splitlines()[-1]


def test_epilogues_checks_and_prints_every_shape():
    done = _run("--repeats", "1", script="epilogues.py", compile=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for c in (64, 128, 256, 512):
        assert f"({c}, {c}, 3, 3) |" in done.stdout
    bad = _run("--repeats", "0", script="epilogues.py")
    assert bad.returncode != 0 and "--repeats: expected a positive integer" in bad.stderr


def test_qconv_packing_prints_every_layer():
    from fqtorch.backends.int8_qconv import qconv_verdict

    if qconv_verdict() is not None:
        pytest.skip(f"oneDNN's int8 convolution is not exact here: {qconv_verdict()}")
    done = _run("--batch", "1", "--repeats", "1", script="qconv_packing.py")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for c, side in ((64, 56), (128, 28), (256, 14), (512, 7), (16, 32), (32, 16), (64, 8)):
        # the packing table's row, then the channel of sums' row (with its positions per channel)
        rows = [line for line in lines if line.startswith(f"({c}, {c}, 3, 3) on {side}×{side}")]
        assert len(rows) == 2 and rows[1].endswith(f"| {side * side / c:.3g}"), (c, rows)
    bad = _run("--batch", "0", script="qconv_packing.py")
    assert bad.returncode != 0 and "--batch" in bad.stderr.strip().splitlines()[-1]
    bad = _run("--layers", "16x3²", script="qconv_packing.py")
    assert bad.returncode != 0 and "--layers" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("layers", ["64x", "16x3²", "0x8", "4x4x4", "1_6x8", "+16x8", "٣x8"])
def test_qconv_packing_refuses_malformed_layers(layers, monkeypatch):
    """``--layers`` takes ASCII ``CxS`` items of positive integers and refuses anything else with
    a parser error naming the flag (no traceback)."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import qconv_packing

    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        qconv_packing.parse_layers(parser, layers)
    assert qconv_packing.parse_layers(parser, "16x32, 64x8") == [(16, 32), (64, 8)]


def test_every_variant_that_falls_back_is_flagged(monkeypatch, capsys):
    """A fallback to simulate is said once per process by fqtorch: the benchmarks still flag it
    on every variant it happens to (they flagged the first only), and leave out the overhead
    measure where no integer kernel ran."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common
    import conv_step
    from fqtorch.backends import int8_conv

    monkeypatch.setattr(int8_conv, "int_mm_verdict", lambda device: "not exact here (test)")
    torch.manual_seed(0)
    spec = (2, 4, 4, 3, 1, 6)
    names = ["fp32", "bf16_autocast", "fqt_int8_ptq5", "fqt_int8_psq5"]
    results = conv_step.run_layer(spec, None, "cpu", 1, names)
    for name in names[2:]:
        assert results[name]["fell_back_to_simulate"], name
        assert (
            "not exact here (test); using the simulate backend"
            in (results[name]["fell_back_to_simulate"][0])
        )
    assert not results["fp32"]["fell_back_to_simulate"]
    out = capsys.readouterr().out
    assert out.count("fell back to simulate") == 2 and "no integer kernel ran" in out

    # interleaved rounds report the median (it took the upper of two middle values): a scripted
    # clock, two warm-up rounds (one reading each) and two timed rounds of 0.1 s and 10.1 s
    clock = iter([0.0, 0.0, 0.0, 0.1, 0.0, 10.1])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    assert common.interleaved({"a": lambda: None}, 2)["a"]["median"] == pytest.approx(5.1)


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("linear_step.py", ("--shapes", "64x32"), "--shapes: expected MxKxN"),
        ("linear_step.py", ("--repeats", "0"), "--repeats: expected an integer >= 1"),
        ("conv_step.py", ("--batch", "0"), "--batch: expected an integer >= 1"),
        ("conv_step.py", ("--device", "gpu"), "--device: expected cpu or cuda"),
        ("train_step.py", ("--models", "preact_resnet20,resnet1"), "unknown model 'resnet1'"),
    ],
)
def test_bad_options_are_one_line(script, args, message):
    """Checked before anything is measured (train_step measured its first model first)."""
    done = _run(*args, script=script)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and done.stdout.count("\n") <= 1


def test_rounding_ab_times_both_formulas():
    """The old formula is really the one run in its turns (the script checks that the codes
    differ, and stops otherwise), and every row has both."""
    done = _run("--size", "64", "--repeats", "1", script="rounding_ab.py")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [x for x in done.stdout.splitlines() if x.startswith(("rounding alone", "8-bit"))]
    assert len(rows) == 3 and all(x.count("[") == 2 for x in rows), done.stdout


def _benchmark_module(name: str):
    """A benchmark script imported under a name of its own, leaving ``sys.path`` as it was and
    no benchmark module (``common``) in ``sys.modules``: the library's own modules it imported
    stay, since dropping them would make later imports build second copies of their classes."""
    import importlib.util

    saved = dict(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))
        for added in set(sys.modules) - set(saved):
            origin = getattr(sys.modules[added], "__file__", None) or ""
            if Path(origin).parent == BENCHMARKS:
                del sys.modules[added]


def _declared_options(script: str) -> set[str]:
    """The options ``script``'s parser declares: the option lines of its ``--help``, not its
    description (whose prose names options too)."""
    usage = _run("--help", script=script).stdout
    section = usage.split("options:", 1)[1]
    return {
        token.rstrip(",")
        for line in section.splitlines()
        if line.startswith("  -")
        for token in line.split()
        if token.startswith("-")
    }


@pytest.mark.slow
def test_gpu_check_fits_a_lease_and_names_real_options(tmp_path):
    """``gpu_check.sh`` runs once on a lent GPU, where a wrong option or value costs the lease:
    run here with ``timeout`` replaced by a recorder, every benchmark it calls declares the
    options it is given, every variant pattern, layer, model and shape is one the script knows,
    and every JSON is written under ``$OUT``; its steps' limits with their kill grace fit the
    570 s its header asks of the run; at most 8 files come back."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls"
    (fake / "timeout").write_text(
        f"#!/usr/bin/env bash\nprintf '%s\\037' \"$@\" >> '{log}'\nprintf '\\n' >> '{log}'\n"
    )
    (fake / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'name, driver_version'\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out)}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
    assert len(calls) >= 4
    grace = [int(call[0].removeprefix("--kill-after=")) for call in calls]
    limits = [int(call[1]) for call in calls]
    assert sum(limits) + sum(grace) <= 570 - 10, (limits, grace)  # 10 s: nvidia-smi, versions
    common = _benchmark_module("common")
    known = {
        "--layers": set(_benchmark_module("conv_step").LAYERS),
        "--models": {"char_gpt", *_benchmark_module("train_step").IMAGES},
    }
    returned = {p.name for p in out.iterdir()}  # status.txt and each step's text
    for call in calls:
        command = call[2:]
        if command[1:3] == ["-m", "pytest"]:
            continue
        script = command[1]
        assert (BENCHMARKS.parent / script).exists(), script
        flags = [arg for arg in command[2:] if arg.startswith("--")]
        declared = _declared_options(Path(script).name) if flags else set()
        assert set(flags) <= declared, (script, set(flags) - declared)
        options = {arg: value for arg, value in zip(command, [*command[1:], ""], strict=True)}
        for pattern in options.get("--variants", "fp32").split(","):
            assert common.select(pattern), (script, pattern)  # SystemExit if none matches
        for option, names in known.items():
            if option in options:
                assert set(options[option].split(",")) <= names, (script, options[option])
        if "--shapes" in options:
            assert common.matrix_shapes(options["--shapes"], "MxKxN")
        if "--json" in options:
            path = Path(options["--json"])
            assert path.parent == out, path  # else it does not come back
            returned.add(path.name)
    assert len(returned) <= 8, sorted(returned)
