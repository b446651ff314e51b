"""Imports go one way: the layer rules of the style guide, read from the source with ast.

startup > transport > domain > persistence; operations is used by transport and startup
and uses persistence; errors.py, callstate.py, addresses.py, periodic.py and outage.py are
the base every layer may use. The client library never imports the server; migrations
import nothing of the application.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The folders of the repo and the packages they install as.
PACKAGES = {
    "server": "enrollment.server",
    "client": "enrollment.client",
    "migrations": "enrollment.migrations",
}
# The base every layer may use; the server package itself (its __init__) counts as base.
BASE = (
    "enrollment.server.errors",
    "enrollment.server.callstate",
    "enrollment.server.addresses",
    "enrollment.server.periodic",
    "enrollment.server.outage",
)
ROOMS = ("transport", "domain", "persistence", "operations", "startup")

# The rooms each room may import from (its own always included).
MAY_USE = {
    "base": set(),
    "persistence": {"base", "migrations"},  # the migration runner finds the migration files
    "operations": {"base", "persistence"},
    "domain": {"base", "persistence"},
    "transport": {"base", "domain", "operations", "stubs"},
    "startup": {"base", "transport", "domain", "persistence", "operations", "stubs", "client"},
    "client": {"stubs"},
    "stubs": set(),
    "migrations": set(),
}
GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "google.rpc")
DATABASE = ("peewee", "playhouse", "peewee_migrate", "psycopg2", "pymysql")
# Third-party packages a room must not import, and why.
FORBIDDEN = {
    "base": (GRPC + DATABASE, "the base every layer uses knows neither gRPC nor the database"),
    "domain": (GRPC, "the domain never imports gRPC"),
    "persistence": (GRPC, "persistence never imports gRPC (the domain builds on it)"),
    "transport": (DATABASE, "the gRPC face never imports the database"),
    "client": (
        DATABASE + ("prometheus_client", "grpc_health", "grpc_reflection"),
        "the client distribution depends only on grpcio, grpcio-status and protobuf",
    ),
}


def room_of(name: str) -> str | None:
    """The room a module (or a name inside one) of this repo belongs to; None for the rest."""
    if _within(name, BASE) or name == "enrollment.server":
        return "base"
    if name == "enrollment.server.__main__":
        return "startup"
    parts = name.split(".")
    if parts[:2] == ["enrollment", "server"] and parts[2] in ROOMS:
        return parts[2]
    for package, room in (
        ("enrollment.client", "client"),
        ("enrollment.v1", "stubs"),
        ("enrollment.migrations", "migrations"),
    ):
        if _within(name, (package,)):
            return room
    return None


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # the importing module
    target: str  # what it imports, absolute


def module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    parts = list(relative.parts)
    package = PACKAGES[parts[0]]
    rest = [p for p in parts[1:] if p != "__init__"]
    return ".".join([package, *rest])


def imports_of(path: Path, root: Path) -> list[Import]:
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # Relative: resolved against the importing module's package.
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` may name a module: judge the fullest name.
            targets = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        found += [Import(path, node.lineno, module, t) for t in targets if t != "__future__"]
    return found


def _within(target: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        if target == name or target.startswith(name + "."):
            return name
    return None


def violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks a rule, as 'path:line: module imports target: rule'."""
    found = []
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            for imp in imports_of(path, root):
                rule = _broken_rule(imp)
                if rule:
                    where = f"{imp.path.relative_to(root)}:{imp.line}"
                    found.append(f"{where}: {imp.module} imports {imp.target}: {rule}")
    return found


def _broken_rule(imp: Import) -> str | None:
    room = room_of(imp.module)
    assert room is not None, imp.module
    banned, why = FORBIDDEN.get(room, ((), ""))
    hit = _within(imp.target, banned)
    if hit:
        return f"{why} ({room} must not import {hit})"
    target_room = room_of(imp.target)
    if target_room is None or target_room == room:
        return None
    if room == "client" and imp.target.startswith("enrollment.server"):
        return "the client library never imports the server (client/ stands alone)"
    if room == "migrations":
        return "migrations import nothing of the application (they freeze their own models)"
    if target_room not in MAY_USE[room]:
        allowed = ", ".join(sorted(MAY_USE[room] | {room}))
        return (
            f"{room} may not import {target_room}: imports go startup > transport > domain >"
            f" persistence, operations under transport/startup ({room} may use: {allowed})"
        )
    return None


def test_imports_follow_the_layers():
    broken = violations()
    if broken:
        pytest.fail("imports against the layer rules:\n" + "\n".join(broken), pytrace=False)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in PACKAGES:
        (tmp_path / folder).mkdir(exist_ok=True)
    return tmp_path


def test_each_rule_names_the_file_line_and_rule(tmp_path):
    root = _tree(
        tmp_path,
        {
            "server/domain/students.py": '"""x"""\n\nimport grpc\n',
            "server/transport/servicer.py": "from enrollment.server.persistence import models\n",
            "server/transport/convert.py": "import peewee as pw\n",
            "server/persistence/models.py": "from enrollment.server.domain import validation\n",
            "server/operations/health.py": "from ..transport import servicer\n",
            "server/errors.py": "from enrollment.server.startup import config\n",
            "client/api.py": "from enrollment.server import errors\n",
            "migrations/001_x.py": "from enrollment.server.persistence.models import Student\n",
            "server/domain/courses.py": "from enrollment.server.persistence import models\n",
            "server/startup/cli.py": "from enrollment.client.api import channel\nimport peewee\n",
        },
    )
    found = violations(root)
    assert len(found) == 8, "\n".join(found)
    expected = [
        ("client/api.py:1", "the client library never imports the server"),
        ("migrations/001_x.py:1", "migrations import nothing of the application"),
        ("server/domain/students.py:3", "the domain never imports gRPC"),
        ("server/errors.py:1", "base may not import startup"),
        ("server/operations/health.py:1", "operations may not import transport"),
        ("server/persistence/models.py:1", "persistence may not import domain"),
        ("server/transport/convert.py:1", "the gRPC face never imports the database"),
        ("server/transport/servicer.py:1", "transport may not import persistence"),
    ]
    for (where, rule), line in zip(expected, sorted(found), strict=True):
        assert line.startswith(where + ": ") and rule in line, line
