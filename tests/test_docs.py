"""The documents point only at what exists: every relative link names a file or folder of the
repository and, with a #fragment, one of its headings; every METHOD.md section the code cites is a
section of METHOD.md; every `module.name` a document names is a name of that module. And the README
stays a front door, its map of the files the files that are there."""

import importlib
import re

import pytest

from conftest import ROOT

DOCS = sorted([*ROOT.glob("*.md"), *ROOT.glob("docs/*.md")])
MODULES = sorted([p.stem for p in ROOT.glob("*.py")]
                 + [f"{p.parent.name}.{p.stem}" for p in [*ROOT.glob("infra/*.py"), *ROOT.glob("tools/*.py")]
                    if p.stem != "__init__"])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # no headings in code
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_and_a_heading_that_exist(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https: and the like: not the repository's
            continue
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name} links to {target}, which does not exist"
        if fragment:
            assert fragment in anchors(file), f"{doc.name} links to {target}: no such heading"


def test_every_method_section_cited_exists():
    sections = set(re.findall(r"^## §(\d+) ", (ROOT / "METHOD.md").read_text(), flags=re.MULTILINE))
    assert sections == {str(n) for n in range(1, len(sections) + 1)}
    code = [*ROOT.glob("*.py"), *ROOT.glob("infra/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("tests/*.py")]
    for path in [*code, *DOCS]:
        for cited in re.findall(r"METHOD\.md §(\d+)", path.read_text()):
            assert cited in sections, f"{path.name} cites METHOD.md §{cited}, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_name_a_document_names_exists(doc):
    modules = "|".join(re.escape(m) for m in sorted(MODULES, key=len, reverse=True))
    names = re.findall(rf"`({modules})\.([A-Za-z_]\w*)", doc.read_text())
    for module, name in names:
        if name in ("py", "json", "jsonl", "md"):  # a file's name, not a module's attribute
            continue
        assert hasattr(importlib.import_module(module), name), f"{doc.name} names {module}.{name}"


def test_the_readme_is_a_front_door_whose_map_names_every_file():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "pip install -r requirements.txt && python demo.py" in readme  # the main command
    for hop in ("data.tokenize_conversation", "data.shift_to_predictions", "model.weighted_cross_entropy",
                "model.fused_weighted_cross_entropy", "train.step_weight_sum", "train.forward_backward"):
        assert f"`{hop}`" in readme
    assert "[docs/ABLATION.md](docs/ABLATION.md)" in readme and "[docs/BENCHMARKS.md](docs/BENCHMARKS.md)" in readme
    tree = readme[readme.index("## The files"):]
    tree = tree[:tree.index("\n## ")] if "\n## " in tree else tree
    files = [*ROOT.glob("*.py"), *ROOT.glob("infra/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("docs/*.md")]
    for path in files:
        if path.stem != "__init__":
            assert path.name in tree, f"the README's map of the files lacks {path.relative_to(ROOT)}"
