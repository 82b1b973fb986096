"""The int4 cache backend's per-layer CUDA path reads no device tensor on the host, so a decode
step can be captured in a CUDA graph (and no step waits for the GPU once per layer).

A structural check that needs neither a GPU nor vLLM: from the CUDA backend's per-layer entry
points (``RotqKV4Impl.forward`` and ``do_kv_cache_update``), follow every call into
serving/kv4_attention.py, kernels/kv4.py and kernels/hadamard.py and refuse the constructs that
copy a device value to the host: ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``.nonzero()``, ``.any()``, ``.all()``, ``synchronize()``, ``bool(...)``, and ``int(...)`` or
``float(...)`` of anything but a plain name (a host number passed in). On a GPU,
tests/kernels/test_kv4.py runs the kernels under ``torch.cuda.set_sync_debug_mode("error")``
and replays a captured decode.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = ("serving/kv4_attention.py", "kernels/kv4.py", "kernels/hadamard.py")
ROOTS = (("serving/kv4_attention.py", "RotqKV4Impl", "forward"),
         ("serving/kv4_attention.py", "RotqKV4Impl", "do_kv_cache_update"))
SYNCING_METHODS = frozenset({"item", "tolist", "cpu", "numpy", "nonzero", "any", "all", "synchronize"})


def host_syncs(fn: ast.FunctionDef) -> list[str]:
    """The constructs in ``fn`` that would read a device tensor on the host."""
    found = []
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in SYNCING_METHODS:
            found.append(f".{f.attr}() at line {node.lineno}")
        elif isinstance(f, ast.Name) and f.id == "bool":
            found.append(f"bool() at line {node.lineno}")
        elif isinstance(f, ast.Name) and f.id in ("int", "float") and not all(
                isinstance(a, (ast.Name, ast.Constant)) for a in node.args):
            found.append(f"{f.id}({ast.unparse(node.args[0])}) at line {node.lineno}")
    return found


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Module-level plain functions (not Triton kernels) by name."""
    def jitted(fn):
        return any("jit" in ast.unparse(d) for d in fn.decorator_list)
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and not jitted(n)}


def _called_names(fn: ast.FunctionDef) -> set[str]:
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def per_layer_path() -> dict[str, ast.FunctionDef]:
    """Every function the CUDA backend's per-layer entry points reach in FILES, by qualified name."""
    trees = {f: ast.parse((ROOT / f).read_text()) for f in FILES}
    functions = {name: (f, fn) for f in FILES for name, fn in _functions(trees[f]).items()}
    todo = []
    for f, cls, method in ROOTS:
        klass = next(n for n in trees[f].body if isinstance(n, ast.ClassDef) and n.name == cls)
        todo.append((f"{cls}.{method}", next(n for n in klass.body if isinstance(n, ast.FunctionDef)
                                               and n.name == method)))
    reached = {}
    while todo:
        name, fn = todo.pop()
        if name in reached:
            continue
        reached[name] = fn
        todo += [(f"{functions[c][0]}:{c}", functions[c][1]) for c in _called_names(fn) if c in functions]
    return reached


def test_the_check_finds_host_syncs():
    code = ("def f(x, n, s):\n    a = x.sum().item()\n    if bool(x.all()):\n        pass\n"
            "    return int(x[0]) + int(n) + float(s) + len(x.tolist())\n")
    fn = ast.parse(code).body[0]
    assert sorted(s.split(" at")[0] for s in host_syncs(fn)) == [".all()", ".item()", ".tolist()", "bool()",
                                                                 "int(x[0])"]


def test_the_cuda_per_layer_path_has_no_host_sync():
    path = per_layer_path()
    # the walk reaches the kernels' launchers and R3 (else it checks nothing)
    assert {"kernels/kv4.py:kv4_decode", "kernels/kv4.py:kv4_prefill", "kernels/kv4.py:kv4_gather",
            "kernels/kv4.py:kv_quant_store", "kernels/hadamard.py:hadamard"} <= set(path), sorted(path)
    found = {name: s for name, fn in path.items() if (s := host_syncs(fn))}
    assert not found, f"host syncs on the CUDA per-layer path: {found}"
