"""The README's Python snippets run as pasted: each alone, in a fresh interpreter, as a user
on a CPU machine would run it (no Triton interpreter flag, no test helpers), and what they
print is checked: each ``print`` is followed by the ``assert`` of what it shows. The
commands the README gives for the example parse with the example's own options."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
SHELL = "\n".join(re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S))


def test_readme_has_its_snippets():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_printed_claim_is_asserted(index):
    lines = BLOCKS[index].splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("print("):
            following = lines[i + 1].lstrip() if i + 1 < len(lines) else ""
            assert following.startswith("assert "), (
                f"README snippet {index}: `{line.strip()}` shows a claim no assert checks")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs_alone_in_a_fresh_interpreter(index, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ""  # no tests/ helpers on the path
    proc = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README snippet {index}:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"


def test_multiscale_snippet_prints_true():
    """The reader expects True: the check runs in eval mode (training moves the EMA codebook)."""
    block = next(b for b in BLOCKS if "MultiScaleResidualVQ" in b)
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items()
                                            if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stdout + proc.stderr[-2000:]


def test_example_commands_parse():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_cifar10", ROOT / "examples" / "train_cifar10.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    commands = [line.split("#")[0] for line in SHELL.splitlines() if "train_cifar10.py" in line]
    assert any("--data photos" in c for c in commands)
    for command in commands:
        words = shlex.split(command)
        example.build_parser().parse_args(words[words.index("examples/train_cifar10.py") + 1:])


def test_quickstart_comes_first_and_runs_offline():
    quickstart = TEXT.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert TEXT.index("## Quickstart") < TEXT.index("## Install")
    assert "python3 -m venv" in quickstart and "--index-url https://download.pytorch.org/whl/cpu" in quickstart
    assert "--data photos" in quickstart and "python -m pytest" in quickstart
    assert ".[download]" not in TEXT
