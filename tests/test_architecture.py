"""The layering of docs/design.md, checked on the code itself (imports inside functions too).

- the import graph of testbed/ and tui/ has no circle;
- `emulation/` and `relay/` import neither each other nor `composition/`;
- no module reads another object's private names (`obj._x`, `getattr(obj, "_x")` where
  obj is not `self` or `cls`), a library's included;
- one module writes a broker configuration, one function builds an agent's AgentConfig;
- code and docs cite no file outside the repository;
- methods are closed plug-ins: outside the registry (testbed/methods/__init__.py) and the
  methods' own folders nothing compares a method's name or lists the methods;
- the run owner stays in small parts: no module of testbed/composition over 350 lines, no
  class there with more than 15 instance attributes.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("testbed", "tui")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                targets = [arg.value]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _is_package_face(module: str, target: str) -> bool:
    """A package's __init__ re-exporting its own modules is not a layer edge."""
    return target.startswith(module + ".")


def test_the_import_graph_has_no_circle() -> None:
    graph = {m: {t for t in ts if not _is_package_face(m, t) and not _is_package_face(t, m)}
             for m, ts in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert circles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_emulation_and_relay_do_not_import_each_other_or_the_composition_layer() -> None:
    bad = []
    for m, targets in _graph().items():
        for layer, forbidden in (("testbed.emulation", ("testbed.relay", "testbed.methods", "testbed.composition")),
                                 ("testbed.relay", ("testbed.emulation", "testbed.methods", "testbed.composition")),
                                 ("testbed.methods", ("testbed.emulation", "testbed.composition"))):
            if m == layer or m.startswith(layer + "."):
                bad += [f"{m} -> {t}" for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert bad == []


def test_the_lower_layers_do_not_import_the_upper_ones() -> None:
    order = ["testbed.errors", "testbed.model", "testbed.selection", "testbed.diffusion", "testbed.relay",
             "testbed.methods", "testbed.emulation", "testbed.composition", "testbed.experiments",
             ("testbed.cli", "tui")]

    def layer(m: str) -> int | None:
        for i, ps in enumerate(order):
            if any(m == p or m.startswith(p + ".") for p in (ps if isinstance(ps, tuple) else (ps,))):
                return i
        return None

    bad = []
    for m, targets in _graph().items():
        lm = layer(m)
        for t in targets:
            lt = layer(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{m} -> {t}")
    assert bad == [], "a lower layer imports an upper one:\n" + "\n".join(bad)


def _private_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or (base.id, node.attr) == ("os", "_exit")):
                continue  # os._exit is the public way for a forked child to end
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr",
              "hasattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and node.args[1].value.startswith("_")
              and not node.args[1].value.startswith("__")):
            if isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"):
                continue
            name = node.args[1].value
        if name is not None:
            out.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)[:80]}")
    return out


def test_no_module_reads_another_objects_private_names() -> None:
    found = [hit for p in _modules().values() for hit in _private_reads(p)]
    # a module's own private module-level names (`module._x` of an imported module) count too
    assert found == [], "private names read across objects:\n" + "\n".join(found)


def _calls(name: str) -> list[str]:
    hits = []
    for p in _modules().values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and (getattr(node.func, "id", None) == name
                                               or getattr(node.func, "attr", None) == name):
                hits.append(str(p.relative_to(REPO)))
    return sorted(set(hits))


def test_one_function_builds_agent_configs_and_one_module_writes_broker_configs() -> None:
    assert _calls("AgentConfig") == ["testbed/composition/agents.py"]
    writers = [str(p.relative_to(REPO)) for p in _modules().values()
               if "message_size_limit" in p.read_text() or "listener {" in p.read_text()]
    assert writers == ["testbed/emulation/broker.py"]


def test_nothing_cites_files_outside_the_repository() -> None:
    # the team's sketches beside the repository; bracketed so that this line names none of them
    pattern = r"\.\.[/]shared|STYL[E]\.md|MACHIN[E]-NOTES|DESIG[N]\.md"
    r = subprocess.run(["git", "-C", str(REPO), "grep", "-nE", pattern,
                        "--", "*.py", "*.md", "*.toml", "*.yaml", "Makefile", ".ci"],
                       capture_output=True, text=True)
    assert r.stdout.splitlines() == [], r.stdout


def _method_names() -> set[str]:
    from testbed.methods import METHODS

    return set(METHODS)


def _outside_the_methods(path: Path) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return not rel.startswith("testbed/methods/")


def test_nothing_outside_the_methods_branches_on_a_methods_name() -> None:
    """`== "split"`, `!= "multistage"`, `in ("split", "patch")`: the registry answers instead."""
    names, hits = _method_names(), []
    for p in filter(_outside_the_methods, _modules().values()):
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            consts = [n for n in [node.left, *node.comparators] for n in ([n] if not isinstance(n, (ast.Tuple, ast.List,
                      ast.Set)) else n.elts) if isinstance(n, ast.Constant) and n.value in names]
            if consts:
                hits.append(f"{p.relative_to(REPO)}:{node.lineno} {ast.unparse(node)[:80]}")
    assert hits == [], "branches on a method's name outside testbed/methods:\n" + "\n".join(hits)


def test_the_methods_are_listed_once() -> None:
    """No tuple, list, set or dict outside testbed/methods names two or more methods."""
    names, hits = _method_names(), []
    for p in filter(_outside_the_methods, _modules().values()):
        for node in ast.walk(ast.parse(p.read_text())):
            elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else (
                node.keys if isinstance(node, ast.Dict) else [])
            named = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
            if len(named) >= 2:
                hits.append(f"{p.relative_to(REPO)}:{node.lineno} {ast.unparse(node)[:80]}")
    assert hits == [], "the methods written out again:\n" + "\n".join(hits)


def test_the_run_owner_is_in_small_parts() -> None:
    big, crowded = [], []
    for p in sorted((REPO / "testbed" / "composition").rglob("*.py")):
        text = p.read_text()
        if len(text.splitlines()) > 350:
            big.append(f"{p.relative_to(REPO)}: {len(text.splitlines())} lines")
        for cls in (n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ClassDef)):
            attrs = {t.attr for n in ast.walk(cls) for t in (n.targets if isinstance(n, ast.Assign) else
                     [n.target] if isinstance(n, (ast.AnnAssign, ast.AugAssign)) else [])
                     for t in ([t] if not isinstance(t, ast.Tuple) else t.elts)
                     if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
            if len(attrs) > 15:
                crowded.append(f"{p.relative_to(REPO)}: {cls.name} has {len(attrs)} instance attributes")
    assert big == [] and crowded == [], "\n".join(big + crowded)
