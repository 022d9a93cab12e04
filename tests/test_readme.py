"""The README's Python quick start runs as written."""

import re
from pathlib import Path


def test_quick_start_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    assert "FQTLinear" in capsys.readouterr().out
