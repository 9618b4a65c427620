"""Every example in README.md and docs/*.md runs as pasted.

Each ```python block runs as a script in a fresh interpreter (in a scratch folder, with a timeout). The HTML
comment on the line right before a block's opening fence changes that:

- ``<!-- doctest: torchrun N -->``: the block runs under ``torchrun --standalone --nproc-per-node N``;
- ``<!-- doctest: skip -->``: not run; allowed only for a fragment whose first line is a visible
  ``# fragment: <why>`` comment, so the reader sees it is not complete;
- ``<!-- doctest: run -->`` before a ```bash block: the commands run (bash -e, from the repository root, with
  this interpreter first on PATH). Other bash blocks are not run, but every benchmark or example script a bash
  block names must also appear in a run block (its quickest form).

Relative links between the pages must resolve. Pages added later to docs/ are picked up by the glob.
"""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
MARKER = re.compile(r"^\s*<!--\s*doctest:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
TIMEOUT_S = 240


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    marker: Optional[str]
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> List[Block]:
    blocks = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, language = m.group(1), m.group(2), m.group(3).lower()
        previous = MARKER.match(lines[i - 1]) if i > 0 else None
        body = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(Block(path, i + 1, language, previous.group(1) if previous else None, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


BLOCKS = [b for page in PAGES for b in extract_blocks(page)]
PYTHON = [b for b in BLOCKS if b.language == "python"]
BASH_RUN = [b for b in BLOCKS if b.language in ("bash", "sh", "shell") and b.marker == "run"]


def clean_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")  # examples build models from configs: nothing may download
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def run(command: List[str], cwd: Path, block: Block) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                                timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.id}: still running after {TIMEOUT_S} s\n{e.stdout or ''}\n{e.stderr or ''}")
    if result.returncode != 0:
        pytest.fail(f"{block.id} failed (exit {result.returncode}):\n--- code\n{block.code}--- stdout\n"
                    f"{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}")


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs(block, tmp_path):
    if block.marker == "skip":
        first = block.code.lstrip("\n").splitlines()[0] if block.code.strip() else ""
        assert first.startswith("# fragment:"), (
            f"{block.id}: a skipped block must be a fragment that says so on its first line (# fragment: why)")
        pytest.skip("a fragment, marked as such")
    script = tmp_path / "block.py"
    script.write_text(block.code)
    if block.marker is None:
        run([sys.executable, str(script)], tmp_path, block)
        return
    m = re.fullmatch(r"torchrun (\d+)", block.marker)
    assert m, f"{block.id}: unknown marker {block.marker!r} (torchrun N or skip)"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    run([torchrun, "--standalone", "--nproc-per-node", m.group(1), str(script)], tmp_path, block)


@pytest.mark.parametrize("block", BASH_RUN, ids=[b.id for b in BASH_RUN])
def test_bash_block_runs(block, tmp_path):
    script = tmp_path / "block.sh"
    script.write_text("set -euo pipefail\n" + block.code)
    run(["bash", str(script)], ROOT, block)


def test_markers_are_known_and_placed_on_code_blocks():
    for block in BLOCKS:
        if block.marker is None:
            continue
        if block.language == "python":
            assert block.marker == "skip" or re.fullmatch(r"torchrun \d+", block.marker), block.id
        elif block.language in ("bash", "sh", "shell"):
            assert block.marker == "run", f"{block.id}: bash blocks take only <!-- doctest: run -->"
        else:
            pytest.fail(f"{block.id}: a doctest marker on a {block.language or 'plain'} block is never run")
    for block in BLOCKS:
        assert block.language not in ("py", "python3", "pycon"), f"{block.id}: spell the language `python`"


def test_every_script_shown_runs_in_its_quickest_form():
    script = re.compile(r"\b((?:benchmarks|examples)/[\w./-]+\.py)")
    shown = {(m.group(1), b.id) for b in BLOCKS if b.language in ("bash", "sh", "shell")
             for m in script.finditer(b.code)}
    run_somewhere = {m.group(1) for b in BASH_RUN for m in script.finditer(b.code)}
    missing = sorted(f"{name} ({where})" for name, where in shown if name not in run_somewhere)
    assert not missing, "shown in a bash block but run in no <!-- doctest: run --> block: " + ", ".join(missing)
    for name in run_somewhere:
        assert (ROOT / name).is_file(), name


def test_relative_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in link.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue
            resolved = (page.parent / target).resolve()
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_readme_is_a_door_not_the_manual():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; the manual belongs in docs/"
    text = "\n".join(lines)
    assert "bash scripts/test.sh" in text  # CI (.ci/run) runs the command the README gives
    assert "python -m torchmoe info" in text
