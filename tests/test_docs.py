"""Every code sample in README.md and docs/*.md runs, so the docs cannot rot.

```python blocks of one file run in order in one namespace; ```bash blocks run line by line in the same
temporary folder, except `make ...` lines (CI runs `make test` itself, and `make demo` is tested by the
demo's own test).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(path.read_text())]


def run_shell(code: str, cwd: Path) -> None:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    for line in code.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith(("#", "make ")):
            continue
        proc = subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"`{line}` failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_samples_run(doc: Path, tmp_path: Path, monkeypatch):
    found = blocks(doc)
    if not found:
        pytest.skip(f"{doc.name} has no code samples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"doc_{doc.stem}"}
    for lang, code in found:
        if lang == "python":
            exec(compile(code, f"{doc.name}:python", "exec"), namespace)
        else:
            run_shell(code, tmp_path)


def test_readme_states_exactly_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line)[0:2] for line in setup.splitlines() if line.strip().startswith("make ")]
    assert commands == [["make", "demo"], ["make", "test"]]
