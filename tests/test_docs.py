"""The Markdown tells the truth about the tree: every repository path it names exists, every link
(and its #anchor) resolves, the README's folder tree names every package and top-level folder (and
only folders that exist), and the README stays a user's guide (at most README_MAX_LINES lines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fvlm_data", "fvlm_model", "fvlm_train")
TOP = (*PACKAGES, "bench", "experiments", "docs", "tests", ".ci")
# The top-level folders the README's tree must show (besides the packages).
TREE_TOP = ("bench", "experiments", "docs", "tests")
README_MAX_LINES = 260
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


def readme_tree() -> list[str]:
    """The folders of the README's layout tree (the first code block under "## Layout"), as paths:
    a line's folder is a name ending in "/"; its depth is its tree prefix ("├── ", "│   ") / 4."""
    readme = (ROOT / "README.md").read_text()
    assert "\n## Layout\n" in readme, "the README has no '## Layout' section"
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    folders, stack = [], []
    for line in block.splitlines():
        m = re.match(r"([│├└─ ]*)([\w.-]+)/(?:\s|$)", line)
        if not m:
            continue
        depth = len(m.group(1)) // 4
        stack = [*stack[:depth], m.group(2)]
        folders.append("/".join(stack))
    return folders


def packages() -> list[str]:
    """Every package and subpackage (a folder holding Python modules) of the project's packages."""
    return sorted({p.parent.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                   if "__pycache__" not in p.parts})


def test_readme_tree_names_every_package_and_top_level_folder() -> None:
    folders = readme_tree()
    missing = [f for f in folders if not (ROOT / f).is_dir()]
    assert not missing, f"the README's folder tree names folders that do not exist: {missing}"
    unnamed = [f for f in [*packages(), *TREE_TOP] if f not in folders]
    assert not unnamed, f"the README's folder tree does not show: {unnamed}"


def test_readme_stays_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move details to "
                                       "docs/ and figures to docs/performance.md")
