"""The layout rules of docs/architecture.md, checked on the source: no import circle, no
import upward between the layers, adapters and the service wings apart, small modules."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import cargohold

ROOT = Path(cargohold.__file__).parent
#: Higher layers may import lower ones and their own; never the other way.
LEVELS = {
    "cli": 5, "daemons": 5,
    "adapters": 4,
    "services": 3,
    "stores": 2, "clients": 2,
    "core": 1,
    "errors": 0, "config": 0, "": 0,  # "": the package itself (its version)
}
#: Within services, the wings that must not import each other (the node-side services are
#: the modules directly in services/; the shared copy tools, services/copies.py, are free).
NODE_SIDE = {"services.agent", "services.volumes", "services.nodes", "services.events",
             "services.snapshots", "services.clones", "services.backups", "services.restores",
             "services.schedules", "services.remotes", "services.replication",
             "services.standbys", "services.migrations"}
MAX_LINES = 820  # "about 800": the engine's ReplicaSet is the largest


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        if "_pb2" in path.name:  # generated from csi.proto
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The cargohold modules ``name`` imports, at any depth of its code (also those under
    TYPE_CHECKING or inside functions), without the ``cargohold.`` prefix."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                module = "cargohold." + module if module else "cargohold"
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" for a in node.names] + [module]
        for target in targets:
            if target != "cargohold" and not target.startswith("cargohold."):
                continue
            short = target.removeprefix("cargohold").removeprefix(".")
            if short in known:
                yield short
                break  # ``from x import y``: y itself when it is a module, else x


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: set(imports(name, path, set(found))) - {name}
            for name, path in found.items()}


def layer(module: str) -> str:
    return module.split(".")[0] if module else ""


def test_the_walker_sees_real_imports() -> None:
    edges = graph()
    assert "services.engine.replicaset" in edges["services.engine.engine"]
    assert "stores.diskstore" in edges["daemons.dataserver"]
    assert "core.wire" in edges["clients.sharedmemory"]
    assert set(LEVELS) >= {layer(m) for m in edges}


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_layers_import_downward_only() -> None:
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if LEVELS[layer(a)] < LEVELS[layer(b)]]
    assert upward == []


def test_core_does_no_io_and_knows_only_the_errors() -> None:
    for module, targets in graph().items():
        if layer(module) == "core":
            assert {layer(t) for t in targets} <= {"core", "errors"}, (module, targets)


def test_adapters_do_not_import_each_other() -> None:
    def adapter(module: str) -> str:
        return ".".join(module.split(".")[:2])

    crossing = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
                if layer(a) == layer(b) == "adapters" and adapter(a) != adapter(b)]
    assert crossing == []


def test_the_service_wings_stay_apart() -> None:
    def wing(module: str) -> str:
        if module.startswith(("services.engine", "services.controller")):
            return ".".join(module.split(".")[:2])
        return "node" if module in NODE_SIDE else "shared"

    forbidden = {("services.engine", "services.controller"), ("services.engine", "node"),
                 ("services.controller", "services.engine"), ("node", "services.engine")}
    crossing = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
                if layer(a) == layer(b) == "services" and (wing(a), wing(b)) in forbidden]
    assert crossing == []


def test_modules_stay_small() -> None:
    large = {name: n for name, path in modules().items()
             if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert large == {}


def test_no_grab_bag_modules() -> None:
    assert not {n for n in modules() if n.rpartition(".")[2] in ("utils", "helpers", "misc")}
