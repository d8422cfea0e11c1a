"""The layer rules of docs/architecture.md ("Layers"), enforced on the source: every lens_det module's imports of
other lens_det modules (module level and inside functions, read with `ast`; imports under `if TYPE_CHECKING:`
never run and are skipped) go only to the layers its own layer may use, and no lens_det modules import each other
in a cycle. An import that breaks a rule must be in ALLOWED_LAZY (function level only, with its reason).

A module that matches no layer fails the test: place it in LAYERS (and in docs/architecture.md) when you add it.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lens_det"

# layer -> (the modules in it, the layers its modules may import). Lower layers never import higher ones. The
# patterns are fnmatch patterns on dotted module names; a layer's modules may import each other (no cycles).
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "blas": (("lens_det.blas",), ()),
    "memory": (("lens_det.memory",), ()),
    "presets": (("lens_det.presets",), ()),  # named configs: data (it reads JSON and, on call, transformers)
    "hooks": (("lens_det.hooks",), ()),
    "config": (("lens_det.config",), ("presets",)),  # re-exports the named configs at their old path
    "ops": (("lens_det.ops",), ("blas",)),
    "components": (("lens_det.components", "lens_det.components.*"), ("config", "ops", "blas", "hooks")),
    "kv_cache": (("lens_det.kv_cache",), ("config",)),
    "tokenizer": (("lens_det.tokenizer",), ("config",)),
    # everything that knows HF's names; lens_det.convert is its old path (a re-export)
    "hf": (("lens_det.hf", "lens_det.hf.*", "lens_det.convert", "lens_det.convert.*"), ("config", "presets")),
    "devices": (("lens_det.devices", "lens_det.placement"), ("hf",)),
    # SAEs and transcoders: their weights, file formats, splice sites (HF paths through hf's tables), model methods
    "sae": (("lens_det.sae", "lens_det.sae.*"), ("hooks", "ops", "blas", "config", "presets", "hf")),
    # HookedDecoder and what it is made of: its argument checks (inputs), its TransformerLens surface (tl mixins,
    # weight processing); within the layer only lens_det.model imports nothing back (see test_no_module_imports_model)
    "model": (("lens_det.model", "lens_det.inputs", "lens_det.tl", "lens_det.tl.*", "lens_det.weight_processing"),
              ("components", "kv_cache", "config", "presets", "ops", "blas", "hooks", "hf", "devices", "tokenizer",
               "memory", "sae")),
    # the features built on the model; nothing below imports them. lens_det (the package) is the public API.
    "top": (("lens_det", "lens_det.generation", "lens_det.patching", "lens_det.loading", "lens_det.parity",
             "lens_det.parity.*", "lens_det.determinism", "lens_det.determinism.*", "lens_det.cli"),
            ("model", "components", "kv_cache", "config", "presets", "ops", "blas", "hooks", "hf", "devices",
             "tokenizer", "memory", "sae")),
}

# (importer pattern, imported module): imports that break the rules above and must stay, each inside a function
# (a module-level one is refused), each with its reason. They are left out of the cycle check for that reason.
ALLOWED_LAZY: dict[tuple[str, str], str] = {
    ("lens_det.config", "lens_det.hf"): "LensConfig.from_hf_config / from_name (public API) delegate to lens_det.hf, "
                                        "which imports config",
    ("lens_det.hf", "lens_det.components.moe"): "hf_experts_implementation's default is the components' "
                                                "DEFAULT_EXPERTS_IMPLEMENTATION (one constant, what HF picks)",
    ("lens_det.model", "lens_det.generation"): "HookedDecoder.generate delegates to lens_det.generation",
    ("lens_det.tl.*", "lens_det.generation"): "the TL generate mixin delegates to lens_det.generation",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported lens_det module, line, inside a function) for each import `module` runs."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def resolve(name: str) -> str | None:
        """The lens_det module that `name` is, or the nearest enclosing one (a name imported from a module)."""
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            found.extend((target, node.lineno, lazy) for alias in node.names
                         if alias.name.split(".")[0] == "lens_det" and (target := resolve(alias.name)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "lens_det":
                for alias in node.names:  # `from lens_det import ops` imports the module lens_det.ops
                    target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else resolve(base)
                    if target:
                        found.append((target, node.lineno, lazy))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return [(target, line, lazy) for target, line, lazy in found if target != module]


def _layer(module: str) -> str | None:
    for layer, (patterns, _) in LAYERS.items():
        if any(fnmatchcase(module, p) for p in patterns):
            return layer
    return None


def _allowed_lazy(importer: str, imported: str) -> str | None:
    for (pattern, target), reason in ALLOWED_LAZY.items():
        if fnmatchcase(importer, pattern) and (imported == target or imported.startswith(target + ".")):
            return reason
    return None


EDGES = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if _layer(m) is None)
    assert not unplaced, (f"{unplaced} belong to no layer: add them to LAYERS in tests/api/test_import_layers.py and "
                          "to the Layers section of docs/architecture.md")


def test_imports_follow_the_layer_rules():
    broken = []
    for module, imports in EDGES.items():
        layer = _layer(module)
        if layer is None:
            continue  # reported by test_every_module_has_a_layer
        may = {layer, *LAYERS[layer][1]}
        for target, line, lazy in imports:
            if _layer(target) in may:
                continue
            if lazy and _allowed_lazy(module, target):
                continue
            where = "inside a function" if lazy else "at module level"
            broken.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} ({layer}) imports "
                          f"{target} ({_layer(target)}) {where}")
    assert not broken, ("imports against docs/architecture.md's Layers (move the code to the right layer, or add a "
                        "function-level import to ALLOWED_LAZY with its reason):\n" + "\n".join(broken))


def test_no_module_imports_model():
    """HookedDecoder is built from its layer's other modules (the tl mixins, inputs), so none of them imports it back
    (type hints go under `if TYPE_CHECKING:`)."""
    back = [f"{m} (line {line})" for m, imports in EDGES.items() if _layer(m) == "model" and m != "lens_det.model"
            for target, line, _ in imports if target == "lens_det.model"]
    assert not back, f"{back} import lens_det.model, which imports them"


def test_allowed_lazy_imports_are_used_and_inside_functions():
    """Every ALLOWED_LAZY entry whose importer exists still matches an import, and only one inside a function."""
    for (pattern, target) in ALLOWED_LAZY:
        importers = [m for m in MODULES if fnmatchcase(m, pattern)]
        if not importers:
            continue  # a module another change has not created (or has removed) yet
        uses = [(m, line, lazy) for m in importers for t, line, lazy in EDGES[m]
                if t == target or t.startswith(target + ".")]
        top = [f"{m}:{line}" for m, line, lazy in uses if not lazy]
        assert not top, f"ALLOWED_LAZY ({pattern!r}, {target!r}) allows function-level imports only: {top}"


def _cycle() -> list[str] | None:
    """One import cycle among lens_det modules (the ALLOWED_LAZY imports left out), or None."""
    graph = {m: sorted({t for t, _, lazy in imports if not (lazy and _allowed_lazy(m, t))})
             for m, imports in EDGES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for module in graph:
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, cycle", [
    ("import lens_det.b\n", ["lens_det.a", "lens_det.b", "lens_det.a"]),
    ("def f():\n    from lens_det import b\n", ["lens_det.a", "lens_det.b", "lens_det.a"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lens_det.b\n", None),
])
def test_the_checker_sees_module_and_function_level_imports(tmp_path, monkeypatch, source, cycle):
    """The checker itself: a cycle through a module-level or a function-level import is found; a type-only
    import is not an import."""
    package = tmp_path / "lens_det"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(source)
    (package / "b.py").write_text("from lens_det import a\n")
    module = globals()  # the checker reads these module globals
    monkeypatch.setitem(module, "PACKAGE", package)
    monkeypatch.setitem(module, "MODULES", _modules())
    monkeypatch.setitem(module, "EDGES", {m: _imports(m) for m in _modules()})
    assert _cycle() == cycle
