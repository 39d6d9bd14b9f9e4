"""The package's import structure, read from the source (imports inside functions included).

The rules are the package docstring's: no cycles; ``kernels`` imports nothing else of the package;
``core`` only itself; ``blocks`` the core and the kernels; a method the core, the blocks, the
kernels, the shared (non-method) files of its own family and, for a declared variant, its parent.
Methods never import interop, the training loop or the notebook side.
"""
from __future__ import annotations

import ast
from pathlib import Path

import peft_from_scratch
from peft_from_scratch.core import registry

ROOT = Path(peft_from_scratch.__file__).parent
PKG = "peft_from_scratch"
FAMILY_FOLDERS = {"additive": "additive", "selective": "selective", "reparameterized": "reparameterized",
                  "quantized": "quantized", "optimizers": "optim"}


def module_name(path: Path) -> str:
    parts = (PKG,) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The package modules ``name`` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] == PKG and t in MODULES}
    found.discard(name)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def under(name: str, *prefixes: str) -> bool:
    return any(name == f"{PKG}.{p}" or name.startswith(f"{PKG}.{p}.") for p in prefixes)


def test_the_reader_sees_every_module():
    assert f"{PKG}.reparameterized.lora" in MODULES and f"{PKG}.core.registry" in MODULES
    assert f"{PKG}.core.adapter" in GRAPH[f"{PKG}.reparameterized.lora"] or f"{PKG}.core" in GRAPH[f"{PKG}.reparameterized.lora"]


def test_no_import_cycles():
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_kernels_import_no_method_nor_anything_else():
    for name, deps in GRAPH.items():
        if under(name, "kernels"):
            assert all(under(d, "kernels") for d in deps), f"{name} imports {deps}"


def test_core_imports_only_itself():
    for name, deps in GRAPH.items():
        if under(name, "core"):
            assert all(under(d, "core") for d in deps), f"{name} imports {sorted(deps)}"


def test_blocks_import_only_the_core_and_kernels():
    for name, deps in GRAPH.items():
        if under(name, "blocks"):
            assert all(under(d, "core", "kernels", "blocks") for d in deps), f"{name} imports {sorted(deps)}"


def test_methods_import_only_core_blocks_kernels_their_family_and_their_parent():
    method_modules = {m.module: m for m in registry.methods()}
    assert len(method_modules) >= 8
    for module, method in method_modules.items():
        family = FAMILY_FOLDERS[method.family]
        assert under(module, family), f"{method.name} ({method.family}) lives in {module}"
        parents = {registry.get(p).module for m in registry.methods() if m.module == module for p in m.parents}
        for dep in GRAPH[module]:
            shared = under(dep, family) and dep not in method_modules and not dep.endswith(f".{family}")
            assert under(dep, "core", "blocks", "kernels") or shared or dep in parents, \
                f"{method.name} ({module}) imports {dep}"


def test_shared_family_files_import_no_other_family_and_no_lab_code():
    for family in FAMILY_FOLDERS.values():
        for name, deps in GRAPH.items():
            if under(name, family) and not name.endswith(f".{family}"):
                for dep in deps:
                    assert under(dep, "core", "blocks", "kernels", family) or dep in {
                        registry.get(p).module for m in registry.methods() if m.module == name for p in m.parents}, \
                        f"{name} imports {dep}"
