"""The layout the project keeps for its readers: lines a reader takes in at a glance, functions short
enough to read whole, the method's data half short and first, the three hops written one statement at
a time, a trainer that knows nothing of its demo, and no package registry's address in the code."""

import ast

import pytest

from conftest import ROOT

PRODUCT = sorted(ROOT.glob("*.py"))
# The three hops of the method (METHOD.md §2-§4): module → functions (Class.method for methods).
HOPS = {"data": ["tokenize_conversation", "message_weight", "shift_to_predictions"],
        "model": ["weighted_cross_entropy", "fused_weighted_cross_entropy",
                  "FusedWeightedCrossEntropy.forward", "FusedWeightedCrossEntropy.backward"],
        "train": ["conversation_weights", "step_weight_sum", "forward_backward"]}


def functions(tree, prefix=""):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, prefix + node.name + ".")


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: p.name)
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
    assert len(source.splitlines()) <= 590
    order = [source.index(f"\ndef {name}(") for name in
             ("tokenize_conversation", "shift_to_predictions", "prepare", "multipack", "pack_stream")]
    assert order == sorted(order)


def test_the_three_hops_assign_one_name_at_a_time():
    for module, names in HOPS.items():
        found = dict(functions(ast.parse((ROOT / f"{module}.py").read_text())))
        for name in names:
            parallel = [n.lineno for n in ast.walk(found[name]) if isinstance(n, ast.Assign)
                        and isinstance(n.targets[0], ast.Tuple) and isinstance(n.value, ast.Tuple)]
            assert not parallel, f"{module}.{name}: parallel assignment at lines {parallel}"


def test_the_trainer_imports_nothing_of_its_demo():
    imported = set()
    for node in ast.walk(ast.parse((ROOT / "train.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"demo", "ablation"}


def test_no_package_registry_address_is_written_in_the_repository():
    files = [*PRODUCT, *ROOT.glob("tests/*.py"), *ROOT.glob("*.md"), *ROOT.glob("*.txt"),
             ROOT / ".ci" / "run"]
    for path in files:
        if path.name == "test_layout.py":  # this file names the hosts to look for them
            continue
        text = path.read_text()
        for host in ("pypi.org", "pythonhosted.org", "pypi.python.org"):
            assert host not in text, f"{path.name} names {host}: take the index from pip's configuration"
