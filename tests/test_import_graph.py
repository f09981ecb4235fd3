"""The import graph of the installed packages (`services`, `shared`) follows the layout (docs/design.md section 1):

* a service (`services/rollout`, `services/reward`, `services/trainer`) imports, of the project, only `shared` and
  its own package: what two services exchange is a contract in `shared/contracts/`;
* `shared` imports no module of `services`;
* no installed module imports the tests' oracles (`tests/`, on the path as `oracles`): they are not shipped;
* no circle among the project's modules.

Only the composition layer, the `gtpo` command and what it starts (`services/cli.py`, `services/__main__.py`,
`services/stack.py`, `services/status_view.py`) and the packages that run services in one process for a purpose
(`services/eval/`, `services/demo/`), may import the services. Every import counts, at module level or inside a
function, under `TYPE_CHECKING` too: a late import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "shared")
SERVICES = ("services.rollout", "services.reward", "services.trainer")
TEST_ONLY = ("oracles", "tests")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module an ImportFrom names, with relative imports resolved against `importer`."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """Project modules `path` (module `name`) imports: `from pkg import mod` counts as `pkg.mod` when that is a
    module, else as `pkg`."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(node, name, path.name == "__init__.py")
            subs = {f"{mod}.{a.name}" for a in node.names} & modules
            out |= subs or {mod}
    return {m for m in out if m.split(".")[0] in PACKAGES + TEST_ONLY}


def service_of(module: str) -> str | None:
    return next((s for s in SERVICES if module == s or module.startswith(s + ".")), None)


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layout rules, as "importer -> imported"."""
    out = []
    for src, deps in sorted(edges.items()):
        for dst in sorted(deps):
            own = service_of(src)
            if dst.split(".")[0] in TEST_ONLY:
                out.append(f"{src} -> {dst} (an installed module imports the tests)")
            elif src.startswith("shared") and dst.startswith("services"):
                out.append(f"{src} -> {dst} (shared imports a service)")
            elif own is not None and dst.startswith("services") and service_of(dst) != own:
                out.append(f"{src} -> {dst} (a service imports outside its own package)")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_services_import_only_shared_and_themselves_and_shared_imports_no_service():
    assert violations(graph()) == []


def test_the_project_has_no_import_cycle():
    assert cycles(graph()) == []


def top_level_names(path: Path) -> set[str]:
    """Names a module binds outside its functions and classes (definitions, assignments, imports)."""
    names: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.If | ast.Try):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
    return names


def importable() -> dict[str, Path]:
    """The project's modules, and the test oracles as the tests and benches import them (`oracles.*`)."""
    oracles = {module_name(p).removeprefix("tests."): p for p in sorted((REPO / "tests" / "oracles").rglob("*.py"))}
    return {**project_modules(), **oracles}


def importers() -> dict[str, Path]:
    """Every Python file that imports the project: its modules, and the tests, benches and scripts."""
    others = {
        str(p.relative_to(REPO)): p for d in ("tests", "bench", "scripts") for p in sorted((REPO / d).rglob("*.py"))
    }
    return {**project_modules(), **others}


def missing_imports() -> list[str]:
    """`from M import N` of the project where M is no module, or N is neither a submodule of M nor bound in M."""
    mods, tops = importable(), PACKAGES + ("oracles",)
    out = []
    for name, path in importers().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [f"{name}: import {a.name}" for a in node.names
                        if a.name.split(".")[0] in tops and a.name not in mods]  # fmt: skip
            elif isinstance(node, ast.ImportFrom):
                mod = _absolute(node, name, path.name == "__init__.py")
                if mod.split(".")[0] not in tops:
                    continue
                if mod not in mods:
                    out.append(f"{name}: from {mod} (no such module)")
                    continue
                bound = top_level_names(mods[mod])
                out += [f"{name}: from {mod} import {a.name}" for a in node.names
                        if a.name != "*" and f"{mod}.{a.name}" not in mods and a.name not in bound]  # fmt: skip
    return out


def test_every_import_names_a_module_and_a_name_that_exist():
    """A stale path after a move (a name imported from a module that became a package, such as the old contracts
    module) fails here, not at run time in a late import; in the tests, benches and scripts too."""
    assert missing_imports() == []


@pytest.mark.parametrize(
    ("edges", "want"),
    [
        ({"services.rollout.a": {"services.trainer.b"}}, ["services.rollout.a -> services.trainer.b"]),
        ({"services.reward.a": {"services.cli"}}, ["services.reward.a -> services.cli"]),
        ({"shared.a": {"services.eval.b"}}, ["shared.a -> services.eval.b"]),
        ({"services.eval.a": {"oracles.naive"}}, ["services.eval.a -> oracles.naive"]),
        ({"services.cli": {"services.trainer.b"}, "services.eval.x": {"services.rollout.y"}}, []),
        ({"services.trainer.learner.a": {"services.trainer.config", "shared.b"}}, []),
    ],
)
def test_the_rules_catch_what_they_state(edges, want):
    assert [v.split(" (")[0] for v in violations(edges)] == want


def test_a_cycle_is_found_and_a_chain_is_not():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"a"}}) == [["a"]]
