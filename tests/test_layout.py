"""The layout the project keeps for its readers: the five stages and the demo on top, the machinery one folder
down (infra/, importing no stage but model and data), the programs about the project in tools/ (imported by no
stage); lines a reader takes in at a glance and functions short enough to read whole in every product file; the
method's data half short and first, train.py and sample.py within a screenful of screens, a model file that opens
no file, the three hops written one statement at a time, and no package registry's address in the code."""

import ast

import pytest

from conftest import ROOT

STAGES = {"data", "model", "train", "sample", "eval"}
PRODUCT = sorted([*ROOT.glob("*.py"), *ROOT.glob("infra/*.py"), *ROOT.glob("tools/*.py")])
# The three hops of the method (METHOD.md §2-§4): module → functions (Class.method for methods).
HOPS = {"data": ["tokenize_conversation", "message_weight", "shift_to_predictions"],
        "model": ["weighted_cross_entropy", "fused_weighted_cross_entropy",
                  "FusedWeightedCrossEntropy.forward", "FusedWeightedCrossEntropy.backward"],
        "train": ["conversation_weights", "step_weight_sum", "forward_backward", "sum_gradients_over_ranks"]}


def functions(tree, prefix=""):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, prefix + node.name + ".")


def imported(path) -> set[str]:
    """The modules a file imports, by their full dotted name (`from infra import job` → infra.job)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_top_level_holds_the_five_stages_and_the_demo():
    assert {p.stem for p in ROOT.glob("*.py")} == STAGES | {"demo"}
    assert {p.name for p in ROOT.glob("*.md")} == {"README.md", "METHOD.md"}  # the other documents: docs/


def test_the_package_imports_no_stage_but_model_and_data_and_nothing_of_the_tools():
    for path in ROOT.glob("infra/*.py"):
        names = {n.split(".")[0] for n in imported(path)}
        assert not names & (STAGES - {"model", "data"}) and not names & {"demo", "tools"}, path.name


def test_no_stage_imports_the_tools_or_the_demo():
    for stage in STAGES:
        names = {n.split(".")[0] for n in imported(ROOT / f"{stage}.py")}
        assert not names & {"tools", "demo"}, stage


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_lines_of_at_most_100_columns_and_functions_of_at_most_60_lines(path):
    source = path.read_text()
    long = [n for n, line in enumerate(source.splitlines(), 1) if len(line) > 100]
    assert not long, f"{path.name}: lines over 100 columns: {long}"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}: {node.name} is {length} lines"


def test_data_py_is_short_and_opens_with_the_method():
    source = (ROOT / "data.py").read_text()
    assert len(source.splitlines()) <= 600
    order = [source.index(f"\ndef {name}(") for name in
             ("tokenize_conversation", "shift_to_predictions", "prepare", "multipack", "pack_stream")]
    assert order == sorted(order)


def test_train_and_sample_fit_550_lines_and_the_model_opens_no_file():
    for stage in ("train", "sample"):
        assert len((ROOT / f"{stage}.py").read_text().splitlines()) <= 550, stage
    names = imported(ROOT / "model.py")
    assert not {n for n in names if n.startswith(("safetensors", "infra", "json", "pathlib"))}
    assert "open(" not in (ROOT / "model.py").read_text()


def test_the_normalisation_is_whole_in_one_place_in_train_py():
    """METHOD.md §4 in one section: the step's Σ w, the division by it and the ranks' gradients summed."""
    source = (ROOT / "train.py").read_text()
    step = source[source.index("# 5. The step"):source.index("# 6. The loop")]
    for name in ("conversation_weights", "step_weight_sum", "forward_backward", "sum_gradients_over_ranks"):
        assert f"\ndef {name}(" in step, name
    assert "set_gradient_divide_factor(1.0)" in step


def test_the_three_hops_assign_one_name_at_a_time():
    for module, names in HOPS.items():
        found = dict(functions(ast.parse((ROOT / f"{module}.py").read_text())))
        for name in names:
            parallel = [n.lineno for n in ast.walk(found[name]) if isinstance(n, ast.Assign)
                        and isinstance(n.targets[0], ast.Tuple) and isinstance(n.value, ast.Tuple)]
            assert not parallel, f"{module}.{name}: parallel assignment at lines {parallel}"


def test_no_package_registry_address_is_written_in_the_repository():
    files = [*PRODUCT, *ROOT.glob("tests/*.py"), *ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("*.txt"),
             ROOT / ".ci" / "run"]
    for path in files:
        if path.name == "test_layout.py":  # this file names the hosts to look for them
            continue
        text = path.read_text()
        for host in ("pypi.org", "pythonhosted.org", "pypi.python.org"):
            assert host not in text, f"{path.name} names {host}: take the index from pip's configuration"
