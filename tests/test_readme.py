"""The README's Python quick start runs as written, and its main command runs twice in a row."""

import re
from pathlib import Path

import torch

from fqtorch.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    assert "FQTLinear" in capsys.readouterr().out


def test_main_command_runs_twice(tmp_path, monkeypatch):
    """The set-up's ``fqtorch train``, as typed, twice in one folder: two runs, two directories
    (shortened to two steps, as flags appended to the command)."""
    setup = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    command = setup.split("&&")[-1].split()
    assert command == ["fqtorch", "train"]
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):
            assert main([*command[1:], "--epochs", "1", "--max-steps-per-epoch", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "final.json").is_file() for run in runs)


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs the README's test command, character for character."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    command = next(line for block in blocks for line in block.splitlines() if "pytest" in line)
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert command.strip() in [line.strip() for line in ci]


def test_readme_names_every_file_variance_writes():
    """The README's section on ``fqtorch variance`` names each file the command writes."""
    from fqtorch.stats.cli import VARIANCE_OUTPUTS

    text = README.read_text()
    section = text.split("## Measuring: `fqtorch variance`", 1)[1].split("\n## ", 1)[0]
    for name in VARIANCE_OUTPUTS:
        assert f"`{name}`" in section, name
