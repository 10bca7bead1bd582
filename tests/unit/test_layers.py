"""The package's layering (docs/layout.md): every import between lfdist's packages points down,
so there are no back-arrows and no circles; the benchmarks behind `lfdist bench` are imported
by the CLI alone."""

import ast
import os

import lfdist

ROOT = os.path.dirname(lfdist.__file__)

# Bottom to top; a module may import its own layer's other packages only where listed below.
LAYERS = [
    {"errors", "lazy"},
    {"constants", "precision", "plan", "lisa_draw", "activations"},
    {"config", "job"},
    {"model", "data", "cost", "plan_cost", "summary"},
    {"engines"},
    {"train"},
    {"probe"},  # pilots run the training step
    {"select", "report"},  # strategies read probe results
    {"launch"},
    {"orchestrate"},
    {"pipeline"},
    {"bench"},
    {"cli", "cli_flags"},
]
SAME_LAYER = {("job", "config"), ("data", "model"), ("plan_cost", "cost"), ("plan_cost", "model")}
SAME_LAYER |= {("cost", "activations"), ("report", "select"), ("cli", "cli_flags")}


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lfdist" or len(parts) == 1:
        return None
    return parts[1]


def _imports() -> set[tuple[str, str, str]]:
    """(importing package, imported package, file) for every import between two packages."""
    edges = set()
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            src = _package(rel.removesuffix(".__init__"))
            if src is None:
                continue
            for node in ast.walk(ast.parse(open(path).read())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for n in names:
                    dst = _package(n)
                    if dst is not None and dst != src:
                        edges.add((src, dst, os.path.relpath(path, ROOT)))
    return edges


def _layer(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def test_every_package_has_a_layer():
    packages = {
        n.removesuffix(".py")
        for n in os.listdir(ROOT)
        if (n.endswith(".py") and n != "__init__.py")
        or os.path.isfile(os.path.join(ROOT, n, "__init__.py"))
    }
    assert packages == set().union(*LAYERS)


def test_imports_point_down_and_bench_is_the_cli_s_alone():
    wrong = []
    for src, dst, path in sorted(_imports()):
        a, b = _layer(src), _layer(dst)
        if a < b or (a == b and (src, dst) not in SAME_LAYER):
            wrong.append(f"{path}: {src} imports {dst}")
        if dst == "bench" and src != "cli":
            wrong.append(f"{path}: the library imports bench")
    assert wrong == []


def test_the_recipe_and_the_engines_are_read_in_small_functions():
    # issue 16: the training recipe reads top to bottom, setup -> train -> finish
    long = []
    for package in ("train", "engines"):
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                path = os.path.join(ROOT, package, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                long += [
                    f"{package}/{name}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
                    for n in ast.walk(tree)
                    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                    and n.end_lineno - n.lineno + 1 >= 60
                ]
    assert long == []
