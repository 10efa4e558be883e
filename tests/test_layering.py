"""Imports point down only: the layer table of /work/shared/STYLE.md ("Dependency direction"),
enforced by parsing every goheap/*.py with ast. Modules not written yet are simply absent.

Beyond STYLE.md's table: `heap` sits beside `malloc` (DESIGN.md allows either name for the
façade), and layer 9 holds the tools on top of the public API (`__main__`, `cli`, `demo`,
`heapmap`); they may import any public goheap module, never `_ffi` or `_native`. `block` and
`mtrace` sit at layer 6 so that `Heap.alloc`/`Heap.ndarray`/`Heap(trace=True)` can use them.
A new module fails this test until it is added to LAYERS with the layer it belongs to."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "goheap"
LAYERS = {
    "_ffi": 0, "_native": 1, "errors": 1, "debug": 1, "mstats": 2, "mem": 2, "sizeclasses": 2,
    "mspan": 3, "mheap": 4, "mcentral": 5, "mbitmap": 5, "mcache": 6, "efence": 6, "block": 6, "mtrace": 6,
    "malloc": 7, "heap": 7, "__init__": 8, "numpy_handler": 8,
    "__main__": 9, "cli": 9, "demo": 9, "heapmap": 9, "efence_demo": 9, "pytest_plugin": 9,
}  # fmt: skip
# Where STYLE.md narrows "any lower layer" to a list.
EXCEPTIONS = {
    "_native": {"_ffi", "errors"},
    "errors": set(),
    "debug": set(),
    "mem": {"_native", "errors", "debug", "mstats"},
    "mtrace": {"_native", "errors"},
    "__init__": {"malloc", "heap", "mstats", "errors", "sizeclasses", "numpy_handler"},
}


def allowed(module):
    if module in EXCEPTIONS:
        return EXCEPTIONS[module]
    if LAYERS[module] == 9:
        return {m for m in LAYERS if not m.startswith("_")} | {"__init__"}
    return {m for m, layer in LAYERS.items() if 1 <= layer < LAYERS[module]}


def goheap_imports(path):
    """The goheap modules `path` imports (`__init__` for the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "goheap"]
            found.update(n.split(".")[1] if "." in n else "__init__" for n in names)
        elif isinstance(node, ast.ImportFrom) and (
            node.level or node.module == "goheap" or (node.module or "").startswith("goheap.")
        ):
            if node.module and node.module != "goheap":
                found.add(node.module.split(".")[-1 if node.level else 1])
            else:  # `from . import x` / `from goheap import x`: x is a module or a name in __init__
                found.update(a.name if a.name in LAYERS else "__init__" for a in node.names)
    return found


def layering_problems(package):
    problems = []
    for path in sorted(package.glob("*.py")):
        module = path.stem
        if module not in LAYERS:
            problems.append(f"{path.name}: unknown module; add it to LAYERS in {__file__}")
            continue
        for target in sorted(goheap_imports(path) - {module}):
            if target not in LAYERS:
                problems.append(f"{path.name} imports unknown goheap.{target}; add it to LAYERS")
            elif target not in allowed(module):
                problems.append(
                    f"{path.name} (layer {LAYERS[module]}) may not import {target} "
                    f"(layer {LAYERS[target]})"
                )
    return problems


def test_layering_every_import_points_down():
    problems = layering_problems(PACKAGE)
    assert not problems, "\n".join(problems)


def test_layering_checker_sees_violations(tmp_path):
    # Every import spelling must be seen, or the test above passes vacuously.
    (tmp_path / "mem.py").write_text(
        "import goheap.mheap\nfrom goheap import malloc, Heap\nfrom .errors import throw\n"
        "def f():\n    from goheap._ffi import lib\n"
    )
    (tmp_path / "mspan.py").write_text("from . import sizeclasses, errors\n")
    (tmp_path / "tracer.py").write_text("")
    assert goheap_imports(tmp_path / "mem.py") == {"mheap", "malloc", "__init__", "errors", "_ffi"}
    problems = layering_problems(tmp_path)
    assert len(problems) == 5, problems
    assert sum("mem.py (layer 2) may not import" in p for p in problems) == 4
    assert "tracer.py: unknown module; add it to LAYERS" in problems[-1]
