"""The tree is the import graph (ARCHITECTURE.md, "Layout"): built here with ``ast`` from the
source, counting imports inside functions, it has no cycle; a function-level import only defers
a heavy or optional dependency and says so in a comment; no stage imports a stage above it."""
import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"maskdsl": "maskdsl", "codegen": "maskdsl.codegen", "kernels": "maskdsl.kernels"}
# optional or heavy third-party modules a function may import on first use
DEFERRABLE = ("triton", "matplotlib", "natten", "resource")
# the stages, bottom to top: a module may import its own stage and those below it
STAGES = [
    ("foundation", ("maskdsl._errors", "maskdsl._caching", "maskdsl._memory", "maskdsl._version")),
    ("dsl", ("maskdsl.dsl",)),
    ("reference", ("maskdsl.reference",)),
    ("compiler", ("maskdsl.codegen",)),
    ("backends", ("maskdsl.kernels",)),
    ("runtime", ("maskdsl.runtime",)),
    ("parallel", ("maskdsl.parallel",)),
    ("drop-ins", ("maskdsl.nn", "maskdsl.natten")),
    ("cli", ("maskdsl.cli",)),
    ("package", ("maskdsl", "maskdsl.__main__")),
]


def _modules() -> dict:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _targets(module: str, path: pathlib.Path, node) -> list:
    """The maskdsl modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    if len(found) < len(node.names) and source in MODULES:
        found.append(source)
    return found


def _imports():
    """(module, target, line, at top level, the source lines around it) for every import."""
    for module, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        # inside a function (module-level if/try blocks are top level: they run at import)
        inner = {id(n) for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                around = "\n".join(lines[max(0, node.lineno - 4):node.end_lineno])
                external = (node.names[0].name if isinstance(node, ast.Import)
                            else ("" if node.level else node.module or ""))
                yield (module, _targets(module, path, node), external, node.lineno,
                       id(node) not in inner, around)


def _stage(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def test_every_module_belongs_to_a_stage():
    assert {m for m in MODULES if _stage(m) is None} == set()


def test_the_import_graph_has_no_cycle():
    edges = {m: set() for m in MODULES}
    for module, targets, *_ in _imports():
        edges[module].update(t for t in targets if t != module)
    # iterative depth-first search; a back edge is a cycle, reported as its modules
    state, stack_of = {}, []

    def visit(start):
        work = [(start, iter(sorted(edges[start])))]
        state[start] = "open"
        stack_of.append(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = "done"
                stack_of.pop()
                work.pop()
            elif state.get(nxt) == "open":
                cycle = stack_of[stack_of.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                state[nxt] = "open"
                stack_of.append(nxt)
                work.append((nxt, iter(sorted(edges[nxt]))))

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_no_stage_imports_a_stage_above_it():
    up = [f"{m}:{line} imports {t} ({STAGES[_stage(t)][0]} above {STAGES[_stage(m)][0]})"
          for m, targets, _, line, _, _ in _imports() for t in targets
          if _stage(t) > _stage(m)]
    assert up == []


def test_function_level_imports_only_defer_heavy_or_optional_modules_and_say_so():
    bad = []
    for module, targets, external, line, top, around in _imports():
        if top:
            continue
        optional = external.split(".")[0] in DEFERRABLE and not targets
        if not optional and "deferred" not in around:
            bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}")
    assert bad == [], ("function-level imports without a 'deferred: why' comment "
                       "(move them to the top of the module): " + ", ".join(bad))


def test_importing_maskdsl_loads_no_optional_backend():
    """``import maskdsl`` stays light: Triton's kernels, torch._dynamo (torch.compile's op) and
    matplotlib load only when used."""
    import subprocess

    code = ("import sys, maskdsl, maskdsl.nn, maskdsl.natten; "
            "print(sorted(m for m in ('maskdsl.kernels.triton_attn', 'torch._dynamo', "
            "'matplotlib', 'maskdsl.runtime.ops') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
