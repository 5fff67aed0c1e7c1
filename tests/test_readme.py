"""Every command in README.md runs here, so that none goes stale: grids with --dry-run, cells with
--print-config, reports on a copy of the committed folder they name, the set-up script parsed."""
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import grid, report, run

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks (comments dropped, ``a && b`` split)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [part.strip() for line in lines if line and not line.startswith("#") for part in line.split("&&")]


COMMANDS = readme_commands()


def test_the_readme_is_short_and_has_its_commands():
    assert len(README.splitlines()) <= 160
    assert "bash scripts/setup.sh" in COMMANDS and ".venv/bin/python -m pytest -q" in COMMANDS
    assert sum(c.split()[:3] == ["python", "-m", "benchmarks.grid"] for c in COMMANDS) >= 4


def copy_results(names: list[str], into: Path) -> None:
    """The committed grid folders ``names`` (their grid.json and records) under ``into``."""
    for name in names:
        source = ROOT / name
        for path in [source / "grid.json", *source.glob("cells/*/record.json")]:
            target = into / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


@pytest.mark.parametrize("command", [c for c in COMMANDS if "python -m benchmarks." in c])
def test_readme_command_runs(command, monkeypatch, tmp_path, capsys):
    words = shlex.split(command)
    for word in [w for w in words if "=" in w and w.split("=")[0] == "PYTHONPATH"]:
        monkeypatch.syspath_prepend(str(ROOT / word.split("=", 1)[1]))
        words.remove(word)
    module, args = words[words.index("-m") + 1], words[words.index("-m") + 2:]
    monkeypatch.chdir(ROOT)
    if module == "benchmarks.grid":
        assert grid.main(args + ["--dry-run"] if "--dry-run" not in args else args) == 0
        assert "grid '" in capsys.readouterr().out
    elif module == "benchmarks.run":
        assert run.main(args + ["--print-config"]) == 0
    elif module == "benchmarks.report":
        folders = [a for a in args if a.startswith("results")]
        copy_results(["results/default-cpu"], tmp_path)
        monkeypatch.chdir(tmp_path)
        assert folders and report.main(args) == 0
        assert "wrote" in capsys.readouterr().out
    else:
        pytest.fail(f"the README names a module no test runs: {module}")


def test_the_setup_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")]).returncode == 0


def test_the_readme_example_defense_is_the_tested_file():
    example = (ROOT / "docs" / "examples" / "clip_defense.py").read_text().split("\n", 1)[1]
    assert f"```python\n{example}```" in README
