"""What ``fqtorch variance`` prints: the conversion summary once, not once per configuration."""

from __future__ import annotations

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
