"""The README's production setup as written: its SQL makes a role and a database on
PostgreSQL and MariaDB that the server can migrate and serve with, and the database
password never appears on a command line (which `ps` shows to every user)."""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import yaml

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases
from tests.rpc import TIMEOUT, new_student
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
# A URL with a password in it: scheme://user:password@host
URL_WITH_PASSWORD = re.compile(r"[a-z]+://[^/@\s:]+:[^@\s]+@")


def production_section() -> str:
    return README.read_text().split("## Running in production\n", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", production_section(), re.S)


def setup_sql(title: str) -> list[str]:
    """The statements of the README's SQL block whose first line is `-- <title>`."""
    for block in blocks("sql"):
        if block.startswith(f"-- {title}\n"):
            text = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
            return [statement.strip() for statement in text.split(";") if statement.strip()]
    raise AssertionError(f"the README's production section has no SQL block for {title}")


def test_no_command_carries_the_database_password():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    commands = [" ".join(service.get("command", [])) for service in compose["services"].values()]
    commands += blocks("sh")
    assert commands
    for command in commands:
        assert "--database-url" not in command, command
        assert not URL_WITH_PASSWORD.search(command), command
    # The compose file hands the URL over in the environment instead.
    for name in ("migrate", "server"):
        assert "ENROLLMENT_DATABASE_URL" in compose["services"][name]["environment"]


def run_admin(kind: str, statements: list[str]) -> None:
    db = databases.Server(kind, databases.admin_url(kind)).admin()
    db.connect()
    try:
        if kind == "postgresql":
            db.connection().autocommit = True  # CREATE DATABASE refuses a transaction
        with db.connection().cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)  # as written: no parameters (MariaDB's '%' stays)
    finally:
        db.close()


@pytest.mark.databases("postgresql", "mysql")
def test_the_readme_setup_sql_makes_a_role_that_migrates_and_serves(
    backend, tmp_path, server_process
):
    title = {"postgresql": "PostgreSQL", "mysql": "MariaDB"}[backend]
    name = f"enrollment_setup_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    statements = [
        re.sub(r"\benrollment\b", name, s).replace("change-me", password) for s in setup_sql(title)
    ]
    admin = urlsplit(databases.admin_url(backend))
    url = f"{admin.scheme}://{name}:{password}@{admin.hostname}:{admin.port}/{name}"
    drop = (
        [f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"DROP ROLE IF EXISTS {name}"]
        if backend == "postgresql"
        else [f"DROP DATABASE IF EXISTS {name}", f"DROP USER IF EXISTS '{name}'@'%'"]
    )
    (url_file := tmp_path / "database-url").write_text(url + "\n")
    port = free_port()
    (script,) = [block for block in blocks("sh") if "enrollment-server serve" in block]
    script = script.replace("/etc/enrollment/database-url", str(url_file))
    script = script.replace("0.0.0.0:50051", f"127.0.0.1:{port}")
    *before, serve = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert serve.startswith("enrollment-server serve "), serve
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "ENROLLMENT_DATABASE_URL": ""}
    try:
        run_admin(backend, statements)
        server = server_process(
            argv=["bash", "-c", "\n".join([*before, "exec " + serve])],
            port=port,
            cwd=tmp_path,
            env=env,
        )
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            made = new_student(stub)
            found = stub.GetStudent(pb.GetStudentRequest(student_id=made.id), timeout=TIMEOUT)
            assert found.student.email == made.email
        # What `ps` shows of the server (its workers are forks with the same arguments).
        shown = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"enrollment-server" in shown and password.encode() not in shown
        assert server.stop() == 0, server.log
        assert databases.query(url, "SELECT COUNT(*) FROM students") == [(1,)]
    finally:
        run_admin(backend, drop)
