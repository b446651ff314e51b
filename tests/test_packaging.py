"""Both distributions as a backend developer gets them.

The wheels are built from a copy of the checkout (as pip builds `pip install ./client`,
the README's command); the client wheel is installed alone into a fresh virtual
environment with its requirements from the package index, then moved to the lowest
version each requirement allows, and calls a live server through enrollment.client.api
from that environment's python.

The index (or pip's cache) must answer: when it cannot be reached the tests that need it
are skipped with pip's reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from enrollment.v1 import enrollment_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# What the client distribution may depend on, and what only the server needs.
CLIENT_REQUIRES = {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}
SERVER_ONLY = {
    "enrollment-server",
    "peewee",
    "peewee-migrate",
    "psycopg2-binary",
    "psycopg2",
    "pymysql",
    "prometheus-client",
    "grpcio-health-checking",
    "grpcio-reflection",
}
# Top-level names the old layout installed, which clash with a caller's own modules.
GENERIC_NAMES = ("server", "client", "migrations", "protos")
# pip's words for "the index did not answer" (as opposed to "it answered no").
UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
    r"resolution|Name or service not known|Network is unreachable|ConnectTimeoutError|"
    r"ReadTimeoutError|Could not fetch URL|ProxyError|Connection refused"
)
PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input", "--retries", "2")


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )


def pip(python: Path | str, *args: object, env: dict[str, str] | None = None) -> str:
    """Run pip; skip (fail under CI=true) when it failed because the index is unreachable."""
    done = run([python, *PIP, *args], env=env)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        said = [line.strip() for line in output.splitlines() if UNREACHABLE.search(line)]
        if said:
            reason = f"the package index cannot be reached: {said[0]}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{reason} (CI=true requires it)")
            pytest.skip(reason)
        pytest.fail(f"pip {' '.join(map(str, args))} failed:\n{output}")
    return done.stdout


def readme_install_path() -> str:
    """The path in the README's one documented `pip install` of the client."""
    text = README.read_text()
    section = text.split("## Installing the client\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.startswith("pip ")]
    assert len(commands) == 1, f"one documented pip command, not {commands}"
    words = commands[0].split()
    assert words[:2] == ["pip", "install"] and len(words) == 3, commands[0]
    return words[2]


def checkout_copy(into: Path) -> Path:
    """The files a clone has, without build leftovers: an in-tree build/ directory
    would otherwise put modules deleted since into the wheel."""
    skip = shutil.ignore_patterns(
        ".*", "build", "dist", "*.egg-info", "__pycache__", "*.db", "*.db-*", "results"
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, into / name)
    for name in ("client", "protos", "server", "migrations"):
        shutil.copytree(ROOT / name, into / name, ignore=skip)
    return into


@dataclass
class Wheel:
    path: Path

    def names(self) -> list[str]:
        with zipfile.ZipFile(self.path) as archive:
            return archive.namelist()

    def read(self, name: str) -> str:
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(name).decode()

    def metadata(self):
        (name,) = [n for n in self.names() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(self.read(name))

    def requirements(self) -> dict[str, Requirement]:
        found = [Requirement(r) for r in self.metadata().get_all("Requires-Dist") or []]
        return {canonicalize_name(r.name): r for r in found if r.marker is None}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Wheel]:
    source = checkout_copy(tmp_path_factory.mktemp("checkout"))
    out = tmp_path_factory.mktemp("wheels")
    client = source / readme_install_path()
    pip(sys.executable, "wheel", "--no-deps", "--wheel-dir", out, client, source)
    built = {canonicalize_name(w.name.split("-")[0]): Wheel(w) for w in out.glob("*.whl")}
    assert set(built) == {"enrollment-client", "enrollment-server"}, built
    return built


def floor(requirement: Requirement) -> str:
    (lowest,) = [s.version for s in requirement.specifier if s.operator == ">="]
    return lowest


@dataclass
class Venv:
    home: Path

    @property
    def python(self) -> Path:
        return self.home / "bin" / "python"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
            and not k.startswith("ENROLLMENT_")
        }
        env["PATH"] = f"{self.home / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONNOUSERSITE"] = "1"
        return env

    def pip(self, *args: object) -> str:
        return pip(self.python, *args, env=self.env())

    def run(self, *argv: object) -> subprocess.CompletedProcess[str]:
        # cwd is the environment itself, so nothing of the checkout is importable.
        return run(list(argv), env=self.env(), cwd=self.home)

    def python_json(self, code: str, *args: str, warnings_are_errors: bool = False):
        flags = ["-W", "error"] if warnings_are_errors else []
        done = self.run(self.python, *flags, "-c", code, *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def installed(self) -> set[str]:
        names = self.python_json(
            "import importlib.metadata as m, json;"
            "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
        )
        return {canonicalize_name(n) for n in names}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory, wheels) -> Venv:
    """A fresh environment with the client wheel alone and what the index resolves for it."""
    env = Venv(tmp_path_factory.mktemp("client-venv"))
    venv.create(env.home, with_pip=True, symlinks=os.name != "nt")
    env.pip("install", wheels["enrollment-client"].path)
    return env


@pytest.fixture(scope="module")
def lowest_venv(client_venv, wheels) -> Venv:
    """client_venv moved to the lowest version every client requirement allows."""
    requirements = wheels["enrollment-client"].requirements().values()
    client_venv.pip("install", *(f"{r.name}=={floor(r)}" for r in requirements))
    return client_venv


def test_wheels_install_under_the_enrollment_namespace_only(wheels):
    for wheel in wheels.values():
        files = [n for n in wheel.names() if ".dist-info/" not in n]
        assert {n.split("/")[0] for n in files} == {"enrollment"}, wheel.path.name
        # A namespace shared by two distributions: neither may own enrollment/__init__.py.
        assert "enrollment/__init__.py" not in files


def shipped(wheel: Wheel, package: str, source: Path, patterns: tuple[str, ...]) -> None:
    names = set(wheel.names())
    for pattern in patterns:
        for path in source.rglob(pattern):
            if "__pycache__" in path.parts or any(p.endswith(".egg-info") for p in path.parts):
                continue
            if "build" in path.relative_to(source).parts:
                continue
            inside = f"{package}/{path.relative_to(source).as_posix()}"
            assert inside in names, f"{wheel.path.name} lacks {inside}"


def test_wheels_ship_every_module_with_their_stubs_and_py_typed(wheels):
    client, server = wheels["enrollment-client"], wheels["enrollment-server"]
    shipped(client, "enrollment/v1", ROOT / "protos/enrollment/v1", ("*.py", "*.pyi", "*.proto"))
    shipped(client, "enrollment/client", ROOT / "client", ("*.py",))
    shipped(server, "enrollment/server", ROOT / "server", ("*.py",))
    shipped(server, "enrollment/migrations", ROOT / "migrations", ("*.py",))
    names = set(client.names())
    for stub in ("enrollment_pb2.pyi", "enrollment_pb2_grpc.pyi", "py.typed", "enrollment.binpb"):
        assert f"enrollment/v1/{stub}" in names
    assert "enrollment/client/py.typed" in names
    assert "enrollment/server/py.typed" in server.names()


def test_client_requirements_match_the_generated_code(wheels):
    client, server = wheels["enrollment-client"], wheels["enrollment-server"]
    needs = client.requirements()
    assert set(needs) == CLIENT_REQUIRES
    gencode = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
        r"(\d+),\s*(\d+),\s*(\d+),",
        client.read("enrollment/v1/enrollment_pb2.py"),
    )
    assert floor(needs["protobuf"]) == ".".join(gencode.groups())
    generated = re.search(
        r"^GRPC_GENERATED_VERSION = '([^']+)'$",
        client.read("enrollment/v1/enrollment_pb2_grpc.py"),
        re.M,
    )
    assert floor(needs["grpcio"]) == generated.group(1)
    assert floor(needs["grpcio-status"]) == floor(needs["grpcio"])
    # Each major version must be one the generated code runs on: grpcio 2 or protobuf 8
    # would need code generated anew.
    for name, upper in (("grpcio", "2"), ("protobuf", "8")):
        assert f"<{upper}" in str(needs[name].specifier), needs[name]

    serves = server.requirements()
    version = client.metadata()["Version"]
    assert str(serves["enrollment-client"].specifier) == f"=={version}"
    # The grpcio family is released together: one range for all four.
    family = {str(serves[n].specifier) for n in ("grpcio", "grpcio-status")}
    family |= {str(serves[n].specifier) for n in ("grpcio-health-checking", "grpcio-reflection")}
    assert len(family) == 1, family
    # The server may narrow the client's ranges, never open them below its floors.
    for name in ("grpcio", "protobuf", "googleapis-common-protos"):
        assert serves[name].specifier.contains(floor(serves[name]))
        assert needs[name].specifier.contains(floor(serves[name])), (name, serves[name])


def test_client_installs_alone(client_venv):
    installed = client_venv.installed()
    assert "enrollment-client" in installed
    assert installed >= CLIENT_REQUIRES
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY
    found = client_venv.python_json(
        "import importlib.util, json, sys;"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in sys.argv[1:]}))",
        "peewee",
        "peewee_migrate",
        "psycopg2",
        "pymysql",
        "prometheus_client",
        *GENERIC_NAMES,
    )
    assert not any(found.values()), found
    check = client_venv.run(client_venv.python, *PIP, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    usage = client_venv.run(client_venv.home / "bin" / "enrollment-client", "--help")
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: enrollment-client")


CALLER = """
from enrollment.client.api import EnrollmentClient
from enrollment.v1 import enrollment_pb2


def email_of(api: EnrollmentClient, student_id: int) -> str:
    return api.get_student(student_id).email


wrong_field: int = enrollment_pb2.Student().email
wrong_argument = EnrollmentClient("127.0.0.1:1").get_student("1")
"""


def test_mypy_in_a_calling_project_reads_the_client_types(client_venv, tmp_path):
    caller = tmp_path / "caller.py"
    caller.write_text(CALLER)
    mypy = Path(sys.executable).parent / "mypy"
    done = run(
        [
            mypy,
            "--python-executable",
            client_venv.python,
            "--no-incremental",
            "--cache-dir",
            tmp_path / "cache",
            "--no-error-summary",
            "--hide-error-context",
            "--show-error-codes",
            caller.name,
        ],
        cwd=tmp_path,
    )
    # Without py.typed mypy skips the modules ("import-untyped") and both lines pass.
    lines = done.stdout.splitlines()
    errors = sorted(line.split(": error: ", 1)[1] for line in lines if ": error: " in line)
    assert errors == [
        'Argument 1 to "get_student" of "EnrollmentClient" has incompatible type "str"; '
        'expected "int"  [arg-type]',
        'Incompatible types in assignment (expression has type "str", variable has type '
        '"int")  [assignment]',
    ], done.stdout + done.stderr


IMPORT_STUBS = """
import json
import google.protobuf, grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
import enrollment.client.api, enrollment.client.cli
print(json.dumps({
    "protobuf": google.protobuf.__version__,
    "grpcio": grpc.__version__,
    "stubs": enrollment_pb2.__file__,
    "client": enrollment.client.api.__file__,
    "service": enrollment_pb2.DESCRIPTOR.services_by_name["EnrollmentService"].full_name,
}))
"""

CALL_SERVER = """
import json, sys
from enrollment.client.api import ClientError, EnrollmentClient

with EnrollmentClient(sys.argv[1], timeout=10) as api:
    ada = api.create_student("Ada Lovelace", "ada@example.com")
    course = api.create_course("CS-101", "Introduction to Computing", capacity=2)
    enrolled = api.enroll(ada.id, course.id)
    roster = [s.email for s in api.iter_students(course.id, page_size=1)]
    try:
        api.get_student(ada.id + 1000)
        missing = None
    except ClientError as error:
        missing = [error.code, error.reason]
print(json.dumps({
    "student": ada.id,
    "course": course.id,
    "enrolled": [enrolled.student_id, enrolled.course_id],
    "roster": roster,
    "missing": missing,
}))
"""


@pytest.mark.databases("sqlite")
def test_client_at_its_lowest_requirements_calls_a_live_server(lowest_venv, wheels, live):
    needs = wheels["enrollment-client"].requirements()
    check = lowest_venv.run(lowest_venv.python, *PIP, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    versions = lowest_venv.python_json(
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))",
        *needs,
    )
    assert versions == {name: floor(r) for name, r in needs.items()}

    # Warnings are errors: a gencode/runtime mismatch that only warns fails here too.
    imported = lowest_venv.python_json(IMPORT_STUBS, warnings_are_errors=True)
    assert imported["protobuf"] == floor(needs["protobuf"])
    assert imported["grpcio"] == floor(needs["grpcio"])
    for module in ("stubs", "client"):
        assert Path(imported[module]).is_relative_to(lowest_venv.home), imported[module]
    assert imported["service"] == "enrollment.v1.EnrollmentService"

    called = lowest_venv.python_json(CALL_SERVER, live.address)
    assert called["enrolled"] == [called["student"], called["course"]]
    assert called["roster"] == ["ada@example.com"]
    assert called["missing"] == ["NOT_FOUND", "STUDENT_NOT_FOUND"]
    # The server holds what the other environment's client wrote.
    stored = live.stub.GetCourse(pb.GetCourseRequest(course_id=called["course"]), timeout=10)
    assert stored.course.code == "CS-101" and stored.course.enrolled_count == 1
