"""The package's architecture, checked from its source: imports flow one way, with no cycle, no
function-local import of another deepseek_rs module (except the CLI's lazy subcommands), and no
private name taken from another subpackage."""

import ast
import subprocess
import sys
from pathlib import Path

import deepseek_rs

ROOT = Path(deepseek_rs.__file__).parent
# The CLI imports each subcommand's module when it runs, so `deepseek-rs --help` stays fast.
LAZY_OK = {"deepseek_rs.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(target module, imported name or None, is function-local) for each deepseek_rs import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deepseek_rs"):
                    yield alias.name, None, id(node) in local
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            if not target.startswith("deepseek_rs"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_local = id(node) in local
                yield (sub, None, is_local) if sub in MODULES else (target, alias.name, is_local)


def _edges(module: str):
    """Every module that importing `target` runs, its packages' __init__ included, except the
    packages that hold `module` (they are imported before it)."""
    parts = module.split(".")
    holders = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    for target, _, _ in _imports(module):
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in MODULES and name not in holders:
                yield name


def _subpackage(module: str) -> str:
    """The subpackage a module belongs to ("" for the top-level modules)."""
    parts = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and is_package) else ""


def test_no_import_cycle():
    graph = {m: sorted(set(_edges(m))) for m in MODULES if m != "deepseek_rs"}
    state: dict = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_function_local_import_of_the_package():
    found = [
        f"{m} imports {t}{'.' + n if n else ''}"
        for m in MODULES
        if m not in LAZY_OK
        for t, n, is_local in _imports(m)
        if is_local
    ]
    assert not found, found


def _private_attribute_uses(module: str):
    """`alias._name` where `alias` is bound by an import to a deepseek_rs module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, MODULES[module].name == "__init__.py")
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield bound[node.value.id], node.attr


def test_no_private_name_from_another_subpackage():
    found = []
    for m in MODULES:
        for target, name, _ in _imports(m):
            if name == "_core":  # the Rust engines: every layer may call them
                continue
            private = (name or "").startswith("_") or any(
                p.startswith("_") and p != "_core" for p in target.split(".")[1:]
            )
            target_module = target if target in MODULES else target.rsplit(".", 1)[0]
            if private and target_module in MODULES and _subpackage(target_module) != _subpackage(m):
                found.append(f"{m} imports {target}{'.' + name if name else ''}")
        for target, attr in _private_attribute_uses(m):
            if _subpackage(target) != _subpackage(m):
                found.append(f"{m} uses {target}.{attr}")
    assert not found, found


def test_help_is_fast_and_does_not_import_torch():
    # The bar: under a second, measured from the import of the CLI to the help printed
    # (the interpreter's own start-up, which no package controls, is left out).
    code = (
        "import sys, time; t = time.perf_counter(); from deepseek_rs.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', time.perf_counter() - t, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: deepseek-rs" in out.stdout
    verdict, seconds = out.stderr.split()[-2:]
    assert verdict == "NO-TORCH", out.stderr
    assert float(seconds) < 1.0, f"deepseek-rs --help took {float(seconds):.2f} s"


def test_version_flag():
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_rs", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"deepseek-rs {deepseek_rs.__version__}"


def test_import_is_lazy_and_the_moe_subpackage_registers_the_ops():
    code = (
        "import sys, deepseek_rs\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "assert not hasattr(torch.ops.deepseek_rs, 'route')\n"
        "deepseek_rs.PEAMoE  # any MoE name imports deepseek_rs.moe\n"
        "print(torch.ops.deepseek_rs.route.default, torch.ops.deepseek_rs.expert_ffn.default)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "deepseek_rs.route.default" in out.stdout


def test_every_lazy_name_is_public_and_resolves():
    # __all__ is a literal list (type checkers read it); the lazy table must agree with it.
    assert set(deepseek_rs._EXPORTS) <= set(deepseek_rs.__all__)
    assert all(getattr(deepseek_rs, name) is not None for name in deepseek_rs.__all__)
