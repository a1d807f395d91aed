"""The shape of the library: no import cycles, one editor registry, one hyperparameter loader."""

import ast
from pathlib import Path

import pytest

from pmet.editing import EDITORS, display_label, edit, editor_names, get_editor, load_hparams
from pmet.experiments import _hparams_id, method_hparams

SRC = Path(__file__).resolve().parents[1] / "src"


# ----------------------------------------------------------------------------------------- import graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """The pmet modules ``path`` imports at module level (not inside functions or classes' methods)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()

    def add(target: str) -> None:
        while target and target not in modules:  # "pmet.editing.ft.apply_ft" -> "pmet.editing.ft"
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:
                    add(f"{mod}.{alias.name}")
            else:
                visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    return out


def import_graph() -> dict[str, set[str]]:
    files = sorted((SRC / "pmet").rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _module_imports(f, modules) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_no_import_cycles_in_pmet():
    graph = import_graph()
    assert "pmet.editing.registry" in graph and "pmet.editing.ft" in graph["pmet.editing.registry"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # a package importing its submodule and the submodule importing a sibling is no cycle
    assert _cycle({"p": {"p.x"}, "p.x": {"p.y"}, "p.y": set()}) is None


# --------------------------------------------------------------------------------------------- registry
def test_registry_holds_every_editor_in_table_order():
    assert editor_names() == (
        "ft",
        "mend",
        "rome",
        "memit",
        "memit-ffn",
        "pmet",
        "pmet-no-attn-delta",
        "pmet-with-attn-weights",
        "pmet-even-spread",
        "pmet-ns",
        "memit-ns",
    )
    assert [display_label(m) for m in ("none", "ft", "pmet", "memit-ffn")] == [
        "Unedited",
        "FT-W",
        "PMET",
        "MEMIT (δ on m^L)",
    ]
    assert {n for n, s in EDITORS.items() if s.sequential} == {"rome"}
    assert {n for n, s in EDITORS.items() if s.artifact_id is not None} == {"mend"}


def test_unknown_method_is_one_error_listing_the_registered_names():
    with pytest.raises(ValueError, match="unknown editing method 'PMET'; registered: ft, mend, rome, memit"):
        get_editor("PMET")
    with pytest.raises(ValueError, match="registered: .*pmet-even-spread"):
        edit(None, None, [], method="foo")


def test_edit_rejects_options_the_editor_does_not_take(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-llama"]
    req = [{"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "Paris"}]
    with pytest.raises(ValueError, match="only for sequential editors"):
        edit(model, tok, req, method="ft", on_step=print)
    with pytest.raises(TypeError, match="ft takes no option"):
        edit(model, tok, req, method="ft", use_value_cache=False)
    with pytest.raises(TypeError, match="must be FTHparams"):
        edit(model, tok, req, method="ft", hparams=load_hparams("pmet", model))


# ------------------------------------------------------------------------------------- hyperparameters
# The run ids of the committed smollm2 results (tables/*.json, "hparams"): the restructuring of the
# hyperparameter schema must not change them (values, statistics and runs are cached under them).
PINNED_IDS = {
    ("pmet", None): "76c83d683e",
    ("memit", None): "378163e79c",
    ("rome", None): "c57062b9d1",
    ("ft", None): "fbe808be91",
    ("mend", None): "b33a54cd64",
    ("pmet", "bfloat16"): "23225eb36c",
    ("rome", "bfloat16"): "ec13f71539",
}


@pytest.mark.parametrize("method,autocast", list(PINNED_IDS))
def test_hparams_ids_of_committed_configurations_are_unchanged(method, autocast):
    hp = method_hparams(method, "smollm2", "counterfact", {"v_autocast": autocast})
    assert _hparams_id(hp) == PINNED_IDS[method, autocast]
    assert _hparams_id(load_hparams(method, "smollm2", "zsre")) == PINNED_IDS[method, None]


def test_misspelled_override_raises_naming_the_valid_fields():
    with pytest.raises(
        ValueError,
        match=r"unknown hyperparameter\(s\) \['v_autocats'\].*valid fields of "
        r"EditHparams: .*v_autocast",
    ):
        load_hparams("pmet", "smollm2", v_autocats="bfloat16")
    # a misspelling raises even where overrides apply only where they exist (experiments' call)
    with pytest.raises(ValueError, match="v_autocats"):
        load_hparams("ft", "smollm2", "counterfact", {"v_autocats": "bfloat16"}, only_where_present=True)
    with pytest.raises(ValueError, match="v_autocats"):
        method_hparams("ft", "smollm2", "counterfact", {"v_autocats": "bfloat16"})


def test_override_of_another_editor_raises_unless_only_where_present():
    with pytest.raises(
        ValueError,
        match=r"\['v_autocast'\] for ft .*only_where_present.*valid fields of "
        r"FTHparams: .*num_steps",
    ):
        load_hparams("ft", "smollm2", v_autocast="bfloat16")
    ft = load_hparams(
        "ft", "smollm2", "counterfact", {"v_autocast": "bfloat16", "num_steps": 3}, only_where_present=True
    )
    assert ft.num_steps == 3 and ft == load_hparams("ft", "smollm2", num_steps=3)
    assert (
        load_hparams("rome", "smollm2", "counterfact", {"v_autocast": "bfloat16"}, only_where_present=True).v_autocast
        == "bfloat16"
    )
    # None-valued overrides are dropped by the experiments' call, as before
    assert method_hparams("pmet", "smollm2", "counterfact", {"v_autocast": None}) == load_hparams("pmet", "smollm2")


def test_every_editor_loads_through_the_one_loader():
    for method, spec in EDITORS.items():
        hp = load_hparams(method, "tiny-llama")
        assert isinstance(hp, spec.hparams_cls), method
        for name, value in spec.fixed.items():
            assert getattr(hp, name) == value, (method, name)
