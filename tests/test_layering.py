"""The dependency direction of rotq's packages, enforced.

Primitives (public names, no calibration state, imported by everyone): rotq.quant.scheme,
quantizer, hadamard, errors, arch, prefix_kv and rotq.kernels.packing. Above them:

* kernels/ imports only kernels/ and primitives;
* export/ imports only export/ and primitives;
* serving's plugin modules (what vLLM loads: config, kv4_attention, prefix_attention, moe, plugin, kv_cache_dtype)
  import only each other, kernels/, export/ (its readers) and primitives, never the offline
  engine (serving/engine.py) or lm_eval_vllm;
* no serving module imports calibration (rotq.quant beyond the primitives: pipeline,
  perplexity, models, online, ...);
* no module of kernels/, export/ or serving/ uses an underscore-prefixed name of another rotq
  module.

Three checks: every import statement, at module level or inside a function (ast); the rotq
modules that importing each module really loads (a fresh process per module: a fork of one
process per layer that has loaded the third-party libraries first); private names (ast).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"rotq.quant": "quant", "rotq.kernels": "kernels", "rotq.export": "export", "rotq.serving": "serving"}
PRIMITIVES = frozenset({"rotq.quant.scheme", "rotq.quant.quantizer", "rotq.quant.hadamard", "rotq.quant.errors",
                        "rotq.quant.arch", "rotq.quant.prefix_kv", "rotq.kernels.packing"})
PACKAGES = frozenset({"rotq", *FOLDERS})  # namespace and package __init__s (rotq.quant's loads its API lazily)
PLUGIN = frozenset({"rotq.serving.config", "rotq.serving.kv4_attention", "rotq.serving.plugin",
                    "rotq.serving.kv_cache_dtype", "rotq.serving.onednn_linear", "rotq.serving.prefix_attention",
                    "rotq.serving.moe"})
CALLS = {"rotq.serving.plugin": "register"}  # what vLLM runs after importing the module


def module_file(name: str) -> Path | None:
    """The source file of rotq module ``name`` (a package: its __init__.py), or None."""
    parts = name.split(".")
    package = ".".join(parts[:2])
    if parts[0] != "rotq" or package not in FOLDERS or len(parts) > 3:
        return None
    path = ROOT / FOLDERS[package] / (f"{parts[2]}.py" if len(parts) == 3 else "__init__.py")
    return path if path.is_file() else None


def modules_of(package: str) -> list[str]:
    return sorted(f"{package}.{p.stem}" for p in (ROOT / FOLDERS[package]).glob("*.py") if p.stem != "__init__")


def _within(*packages: str) -> Callable[[str], bool]:
    return lambda m: any(m == p or m.startswith(p + ".") for p in packages)


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]
    own: Callable[[str], bool]  # what the layer may import besides primitives and package inits
    rule: str

    def allows(self, module: str) -> bool:
        return module in PACKAGES or module in PRIMITIVES or self.own(module)


SERVING = modules_of("rotq.serving")
LAYERS = [
    Layer("primitives", tuple(sorted(PRIMITIVES)), lambda m: False,
          "primitives (rotq.quant.scheme, quantizer, hadamard, errors, arch, prefix_kv, rotq.kernels.packing) import only "
          "primitives"),
    Layer("kernels", tuple(modules_of("rotq.kernels")), _within("rotq.kernels"),
          "kernels/ imports only kernels/ and primitives"),
    Layer("export", tuple(modules_of("rotq.export")), _within("rotq.export"),
          "export/ imports only export/ and primitives"),
    Layer("serving plugin", tuple(m for m in SERVING if m in PLUGIN),
          lambda m: m in PLUGIN or _within("rotq.kernels", "rotq.export")(m),
          "serving's plugin modules import only plugin modules, kernels/, export/ (readers) and primitives; "
          "nothing from the offline engine (serving/engine.py, lm_eval_vllm.py) nor calibration"),
    Layer("serving", tuple(m for m in SERVING if m not in PLUGIN), _within("rotq.serving", "rotq.kernels", "rotq.export"),
          "serving imports no calibration internals: only serving/, kernels/, export/ and primitives"),
]


# ----------------------------------------------------------------------------- static analysis

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


@dataclass(frozen=True)
class Import:
    target: str  # the rotq module imported
    name: str  # a name imported from it ("" for the module itself)
    line: int
    top_level: bool  # runs at import time (not inside a function)


@dataclass
class Source:
    module: str
    path: Path
    imports: list[Import]
    private_uses: list[tuple[int, str]]  # (line, "rotq.module._name") of another module
    third_party: list[str]  # modules imported at import time, not rotq


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str):
        self.module = module
        self.depth = 0
        self.bindings: dict[str, str] = {}  # local name -> rotq module
        self.source = Source(module, module_file(module), [], [], [])

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, node, target: str, name: str = "") -> None:
        self.source.imports.append(Import(target, name, node.lineno, self.depth == 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != "rotq":
                if self.depth == 0:
                    self.source.third_party.append(alias.name)
                continue
            self._add(node, alias.name)
            self.bindings[alias.asname or "rotq"] = alias.name if alias.asname else "rotq"

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            package = self.module.split(".")[: -node.level]
            base = ".".join(package + ([base] if base else []))
        if base.split(".")[0] != "rotq":
            if self.depth == 0 and base:
                self.source.third_party += [base] + [f"{base}.{a.name}" for a in node.names]
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if module_file(sub) is not None:
                self._add(node, sub)
                self.bindings[alias.asname or alias.name] = sub
            else:
                self._add(node, base, alias.name)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node.value)
        if dotted is not None and _private(node.attr):
            head, _, rest = dotted.partition(".")
            if head in self.bindings:
                target = self.bindings[head] + (f".{rest}" if rest else "")
                if target != self.module and (target in PACKAGES or module_file(target) is not None):
                    self.source.private_uses.append((node.lineno, f"{target}.{node.attr}"))
        self.generic_visit(node)


@functools.cache
def source(module: str) -> Source:
    path = module_file(module)
    visitor = _Visitor(module)
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return visitor.source


def _where(module: str, imp: Import) -> str:
    what = f"{imp.name} from {imp.target}" if imp.name else imp.target
    return f"{source(module).path.relative_to(ROOT)}:{imp.line}: {module} imports {what}"


def _all_modules() -> list[str]:
    return sorted(m for package in FOLDERS for m in [package, *modules_of(package)])


def import_chain(start: str, goal: str) -> list[str]:
    """The import statements (at import time; for a module of CALLS also inside its functions) by
    which importing ``start`` loads ``goal``."""
    seen, queue = {start: None}, deque([start])
    while queue:
        m = queue.popleft()
        if m == goal:
            break
        if module_file(m) is None:
            continue
        for imp in source(m).imports:
            targets = [imp.target]
            parts = imp.target.split(".")
            targets += [".".join(parts[:i]) for i in range(2, len(parts))]  # the packages on the way
            for t in targets:
                if (imp.top_level or (m == start and start in CALLS)) and t not in seen:
                    seen[t] = (m, imp)
                    queue.append(t)
    if goal not in seen:
        return [f"(no static path from {start} to {goal}: a dynamic import?)"]
    chain, m = [], goal
    while seen[m] is not None:
        parent, imp = seen[m]
        chain.append(_where(parent, imp))
        m = parent
    return chain[::-1]


def test_the_primitives_exist():
    missing = sorted(m for m in PRIMITIVES | PLUGIN if module_file(m) is None)
    if missing:
        pytest.fail(f"layer rules name modules that do not exist: {missing}; update tests/test_layering.py",
                    pytrace=False)


def test_every_module_belongs_to_a_layer():
    covered = {m for layer in LAYERS for m in layer.modules}
    loose = [m for p in ("rotq.kernels", "rotq.export", "rotq.serving") for m in modules_of(p) if m not in covered]
    if loose:
        pytest.fail(f"modules outside every layer rule: {loose}", pytrace=False)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_import_statements_follow_the_layers(layer):
    """Every rotq import of the layer's modules, at module level or inside a function."""
    bad = []
    for module in layer.modules:
        for imp in source(module).imports:
            if imp.name and imp.target in FOLDERS:
                bad.append(f"{_where(module, imp)}: a name from a package's __init__ (rotq.quant's lazy API "
                           "loads calibration); import it from the module that defines it")
            elif not layer.allows(imp.target):
                bad.append(f"{_where(module, imp)}, against the rule: {layer.rule}")
    if bad:
        pytest.fail("\n".join(bad), pytrace=False)


def test_no_private_names_across_modules():
    """kernels/, export/ and serving/ use only public names of other rotq modules."""
    bad = []
    for package in ("rotq.kernels", "rotq.export", "rotq.serving"):
        for module in modules_of(package):
            src = source(module)
            rel = src.path.relative_to(ROOT)
            for imp in src.imports:
                names = imp.target.split(".") + ([imp.name] if imp.name else [])
                if imp.target != module and any(_private(n) for n in names):
                    bad.append(f"{_where(module, imp)}: a private (underscore) name of another module")
            bad += [f"{rel}:{line}: {module} uses {name}: a private (underscore) name of another module"
                    for line, name in src.private_uses]
    if bad:
        pytest.fail("\n".join(bad) + "\nGive the module a public name for what it shares (rule: no module of "
                    "kernels/, export/, serving/ imports an underscore-prefixed name from another rotq module)",
                    pytrace=False)


# ----------------------------------------------------------------------------- what an import loads

_CHILD = r"""
import importlib, json, os, sys
modules, preload, calls = json.loads(sys.argv[1])
for name in preload:
    try:
        importlib.import_module(name)
    except BaseException:
        pass
rotq = lambda: sorted(m for m in sys.modules if m == "rotq" or m.startswith("rotq."))
early, results = rotq(), {}
for name in modules:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            module = importlib.import_module(name)
            if name in calls:
                getattr(module, calls[name])()
            out = {"loaded": rotq()}
        except ModuleNotFoundError as e:
            third_party = e.name and e.name.split(".")[0] != "rotq"
            out = {"missing": e.name} if third_party else {"error": f"ModuleNotFoundError: {e}"}
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        with os.fdopen(w, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    results[name] = json.loads(data) if data else {"error": "the import ended the process"}
print("LAYERING " + json.dumps({"early": early, "results": results}))
"""


@functools.cache
def loaded_by(layer_name: str) -> dict:
    """{module: {"loaded": [rotq modules]} | {"missing": third-party module} | {"error": ...}}: each
    module imported in a fork of one process that loaded the layer's third-party imports first."""
    layer = next(layer for layer in LAYERS if layer.name == layer_name)
    preload = ["torch"] + sorted({t for m in layer.modules for t in source(m).third_party})
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([list(layer.modules), preload, CALLS])],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LAYERING ")]
    assert proc.returncode == 0 and lines, f"the import check of {layer_name} failed:\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1][len("LAYERING "):])
    assert not report["early"], (f"importing the third-party libraries {preload} loaded rotq modules "
                                 f"{report['early']} (a vLLM plugin?); the check cannot run")
    return report["results"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per module")
@pytest.mark.parametrize("layer,module", [(layer, m) for layer in LAYERS for m in layer.modules],
                         ids=lambda v: v.name if isinstance(v, Layer) else v)
def test_importing_loads_only_the_layer_below(layer, module):
    result = loaded_by(layer.name)[module]
    if "missing" in result:
        pytest.skip(f"{module} needs {result['missing']}, which is not installed")
    if "error" in result:
        pytest.fail(f"importing {module} failed: {result['error']}", pytrace=False)
    bad = [m for m in result["loaded"] if not layer.allows(m)]
    how = f"importing {module}" + (f" and calling its {CALLS[module]}()" if module in CALLS else "")
    if bad:
        pytest.fail(f"{how} loads {bad}, against the rule: {layer.rule}\n" + "\n".join(
            f"  {m}, by: " + " -> ".join(import_chain(module, m)) for m in bad), pytrace=False)
