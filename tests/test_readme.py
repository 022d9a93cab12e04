"""What the README says holds: its Python quick start runs as written, its main command runs twice
in a row, and its outputs and measured numbers are named as they are."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fqtorch.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


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


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in DOCS.glob("*.md"))])
def test_numbers_name_commits_not_sessions(doc):
    """A measured number in the README or docs/ says the commit it came from, not a working
    session ("session 18"), which a reader cannot look up; each commit it names is in the
    history."""
    path = README if doc == "README.md" else DOCS / doc
    text = path.read_text()
    marker = re.search(r".{0,40}\bsessions? \d.{0,20}", text)
    assert marker is None, marker.group(0)
    named = set(re.findall(r"`([0-9a-f]{7,40})`", text))
    assert named or doc != "README.md", "the README names the commits of its measurements"
    root = README.parent
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        pytest.skip("not a git checkout: the named commits cannot be looked up")
    shallow = subprocess.run(
        [git, "rev-parse", "--is-shallow-repository"], cwd=root, capture_output=True, text=True
    )
    if shallow.stdout.strip() != "false":
        pytest.skip("a shallow clone: older commits are not in it")
    for commit in sorted(named):
        found = subprocess.run(
            [git, "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True
        )
        assert found.returncode == 0, f"{doc} names commit {commit}, which is not in the history"


def test_results_digits_column_says_which_runs_it_quotes():
    """The results table's digits column quotes `experiments/reproduce.py`'s digits runs (QAT:
    the mean ± std of their summaries), not docs/results.md's other digits table (from
    `experiments/digits_table.py`, QAT 99.26 ± 0.16), and says so."""
    import json
    import statistics

    text = README.read_text()
    row = re.search(r"^\| QAT \(float gradients\) \|.*\| ([\d.]+) ± ([\d.]+) \| 32 \|$", text, re.M)
    runs = sorted((README.parent / "experiments" / "results" / "digits").glob("qat_s*.json"))
    acc = [100 * json.loads(p.read_text())["final"]["val_acc"] for p in runs]
    assert len(acc) == 3 and row is not None
    assert (row[1], row[2]) == (f"{statistics.mean(acc):.2f}", f"{statistics.stdev(acc):.2f}")
    prose = " ".join(text.split())
    assert "3 seeds of `experiments/reproduce.py`'s digits grid" in prose
    assert "the hand-run `experiments/digits_table.py` table" in prose
