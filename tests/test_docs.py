"""Every Python example of the documentation runs: the ```python blocks of each page of
``docs/`` and of the README, in order, in one fresh interpreter per page (a page's blocks share
their names, as a reader running them one after the other would)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO_ROOT

FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", re.DOTALL | re.MULTILINE)
PAGES = sorted(
    p
    for p in [*(REPO_ROOT / "docs").rglob("*.md"), REPO_ROOT / "README.md"]
    if FENCE.search(p.read_text())
)


def examples(page: Path) -> str:
    """The page's Python blocks, dedented (blocks in tabs are indented), one after the other."""
    return "\n\n".join(textwrap.dedent(m.group(2)) for m in FENCE.finditer(page.read_text()))


def test_the_pages_have_examples() -> None:
    names = {p.relative_to(REPO_ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/how-to/lightning.md"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.setdefault("TORCH_HOME", str(REPO_ROOT / ".cache" / "torch"))
    result = subprocess.run(
        [sys.executable, "-c", examples(page)],
        cwd=tmp_path,  # files an example writes land here
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_links_resolve() -> None:
    """The README is read on GitHub and PyPI, outside the site: each relative link must name a
    file or folder of the repository (pages the site generates do not exist there)."""
    links = [m for m in LINK.findall((REPO_ROOT / "README.md").read_text()) if "://" not in m]
    assert links
    missing = [link for link in links if not (REPO_ROOT / link).exists()]
    assert not missing, missing


def test_the_build_refuses_broken_code_fences() -> None:
    sys.path.insert(0, str(REPO_ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(REPO_ROOT / "docs"))
    assert hooks.fence_problem("# t\n\n```bash\nmake\n```\n\ntext\n") is None
    assert "never closed" in hooks.fence_problem("```bash\nmake test\n\nprose\n")
    # A stray bare fence swallows the prose, then the ```text block's opener:
    assert "inside the block" in hooks.fence_problem("```\n\nprose\n\n```text\nout\n```\n")
