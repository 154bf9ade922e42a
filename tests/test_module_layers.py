"""The package's imports point down its layers (docs/module_graph.py draws them)."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "module_graph.py")
_spec = importlib.util.spec_from_file_location("module_graph", _PATH)
module_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(module_graph)


def test_no_import_points_up_a_layer():
    assert module_graph.upward_edges() == []


def test_every_module_has_a_layer():
    for module in module_graph.modules():
        module_graph.layer_of(module)  # Raises for a module LAYERS forgot.


def test_imports_inside_functions_count_and_name_modules(tmp_path):
    known = module_graph.modules()
    path = tmp_path / "late.py"
    path.write_text("def f():\n    from mtss_train import tasks\n    from mtss_train.model.trunk import TRUNK_SIZES\n")
    assert sorted(module_graph.imports(str(path), known)) == ["mtss_train.model.trunk", "mtss_train.tasks"]
    assert module_graph.layer_of("mtss_train.tasks") > module_graph.layer_of("mtss_train.task")


def test_an_unplaced_module_is_named():
    with pytest.raises(KeyError, match="mtss_train.nowhere"):
        module_graph.layer_of("mtss_train.nowhere")


def test_the_graph_lists_every_module_in_its_layer():
    lines = module_graph.dot().splitlines()
    for module in module_graph.modules():
        name = module.removeprefix("mtss_train.") or "mtss_train"
        layer = f"layer{module_graph.layer_of(module)} [label="
        holders = [line for line in lines if " [label=" in line and f"  {name}  " in line.replace("\\l", "  ").replace("\\n", "  ")]
        assert [line.strip().split(" ")[0] for line in holders] == [layer.split(" ")[0]], module
