"""The Markdown tells the truth about the tree: every repository path it names exists, every link
(and its #anchor) resolves, and the README's code-layout table names every module there is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fvlm_data", "fvlm_model", "fvlm_train")
TOP = (*PACKAGES, "bench", "experiments", "docs", "tests", ".ci")
# A path into one of the project's folders, as prose, a command or a table names it (not `REV:path`, a
# file of an earlier commit).
PATH = re.compile(r"(?<![\w/.:-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w./-]*[\w/])")
MODULE = re.compile(r"python -m ((?:bench|experiments)(?:\.[a-z_][a-z0-9_]*)+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("bench/**/*.md"),
             *ROOT.glob("experiments/**/*.md")]
    return [f for f in files if f.exists()]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in md.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_path_exists(md: Path) -> None:
    text = md.read_text()
    missing = [p for p in PATH.findall(text) if not (ROOT / p.rstrip("/.")).exists()]
    missing += [m for m in MODULE.findall(text) if not (ROOT / (m.replace(".", "/") + ".py")).exists()]
    assert not missing, f"{md.relative_to(ROOT)} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(md: Path) -> None:
    broken = []
    for target in LINK.findall(md.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{md.relative_to(ROOT)} has broken links: {broken}"


def test_code_layout_table_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    modules = [p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if p.name != "__init__.py"]
    modules += ["train.py", "precompute.py", "bench/", "experiments/foveation/", "docs/", "tests/"]
    unnamed = [m for m in modules if f"`{m}`" not in layout]
    assert not unnamed, f"the README's code layout does not name: {unnamed}"
