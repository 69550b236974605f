"""The house's layers (docs/architecture.md), read from the source with `ast`: every import of a
latentforge module (at the top or inside a function) goes down or sideways, never up, and no
modules import each other in a circle."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "latentforge"

# lowest first: a module may import its own layer and the ones before it
LAYERS = [
    ("errors",),
    ("schedules", "sampling", "analytic", "models", "prompt_syntax", "preprocess"),
    ("denoisers", "guidance"),
    ("io",),
    ("data",),
    ("pipelines",),
    ("training", "metrics"),
    ("shapes", "photos"),  # dataset wings: above the generic layers, below the commands
    ("api", "server", "benchmarks", "commands"),
    ("cli", "__init__"),
    ("__main__",),  # `python -m latentforge`: the CLI
]
GENERIC = (
    "schedules",
    "denoisers",
    "sampling",
    "guidance",
    "models",
    "io",
    "pipelines",
    "preprocess",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The latentforge modules an import statement loads (a `from X import Y` of a module Y
    loads X.Y)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "latentforge"]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "latentforge":
        return []
    out = []
    for alias in node.names:
        if alias.name == "__version__":  # a constant of the package face, not its imports
            continue
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.ImportFrom) and _under_type_checking(tree, node):
                    continue
                targets.update(_resolve(name, node, path.name == "__init__.py"))
        edges[name] = {t for t in targets if t in MODULES and t != name}
    return edges


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for block in ast.walk(tree):
        if (
            isinstance(block, ast.If)
            and "TYPE_CHECKING" in ast.unparse(block.test)
            and any(n is node for child in block.body for n in ast.walk(child))
        ):
            return True
    return False


def _area(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _rank(module: str) -> int:
    area = _area(module)
    for i, names in enumerate(LAYERS):
        if area in names:
            return i
    raise AssertionError(f"{module}: area {area!r} is in no layer; add it to LAYERS")


EDGES = _edges()


def test_every_module_has_a_layer():
    assert len(MODULES) > 50
    for module in MODULES:
        _rank(module)


def test_imports_never_run_up_a_layer():
    up = [
        f"{a} -> {b}"
        for a, targets in EDGES.items()
        for b in targets
        if _rank(b) > _rank(a) and _area(a) != "__init__"
    ]
    assert up == []


@pytest.mark.parametrize("generic", GENERIC)
def test_generic_layers_import_no_dataset_training_or_server(generic):
    banned = ("shapes", "training", "server", "commands", "cli", "metrics", "benchmarks", "api")
    bad = [
        f"{a} -> {b}"
        for a, targets in EDGES.items()
        if _area(a) == generic
        for b in targets
        if _area(b) in banned
    ]
    assert bad == []


def test_no_import_circles():
    """Tarjan's strongly connected components over module imports: every one a single module.
    The package face (`latentforge/__init__.py`, which wires the shapes wing in) is left out:
    `from .. import sampling` names the sampling module, not the face."""
    edges = {a: {b for b in t if _area(b) != "__init__"} for a, t in EDGES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_shapes_wing_is_reached_only_from_above():
    users = sorted(
        a for a, targets in EDGES.items() for b in targets
        if _area(b) == "shapes" and _area(a) != "shapes"
    )  # fmt: skip
    assert all(_rank(u) > _rank("latentforge.shapes") for u in users), users
