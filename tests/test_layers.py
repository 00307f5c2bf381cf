"""The folder tree is the architecture: imports go one way, down these layers (an upper
layer may import any lower one).  No package imports one above it, and there is no import
cycle among the project's modules.  docs/ARCHITECTURE.md draws the same picture."""
import ast
from pathlib import Path

from kvmrr_log.paths import REPO

# top first; packages on one line share a layer and may not import each other
LAYERS = [
    ("bench",),        # benchmarks and the sweep: beside the runtime, on top of everything
    ("kvmrr",),        # the application: CLI, gateway, demo
    ("harness",),      # the FT harness behind the demo, the tests and the benchmarks
    ("replayer",),     # the backups (a takeover builds a primary from recorder/)
    ("recorder",),     # the primary
    ("kvmrr_log",),    # foundations: log URLs, Kafka plumbing, the topic reader, images
    ("schemas", "libkvmrr"),
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _modules():
    for pkg in RANK:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield ".".join(parts), path


def _imports(module: str, path: Path) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against the importing package
                base = module.split(".")[:len(module.split(".")) - node.level +
                                         (1 if path.name == "__init__.py" else 0)]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module]
            # `from pkg import mod` imports pkg.mod when that is a module
            names += [f"{names[0]}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in RANK)
    return out


def _graph():
    modules = dict(_modules())
    graph = {}
    for mod, path in modules.items():
        graph[mod] = {m for m in _imports(mod, path) if m in modules and m != mod}
    return graph


def test_every_package_is_in_a_layer():
    tops = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert tops <= set(RANK), f"packages outside the layer table: {sorted(tops - set(RANK))}"


def test_no_package_imports_one_above_or_beside_it():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = mod.split(".")[0], dep.split(".")[0]
            if a != b and RANK[b] <= RANK[a]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    state, cycles = {}, []

    def visit(mod, stack):
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself can fail: an upward import in a scratch module is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from kvmrr.cli import main\nimport recorder.session\n")
    assert _imports("kvmrr_log.probe", probe) == {"kvmrr.cli", "kvmrr.cli.main",
                                                  "recorder.session"}
