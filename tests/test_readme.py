"""The README's grpcurl walkthrough works as written, against a live server."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.servers import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent


def walkthrough_commands() -> list[str]:
    text = README.read_text()
    section = text.split("## Try it with grpcurl", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("grpcurl ")]


@pytest.mark.own_database  # the walkthrough's ids start at 1
def test_readme_walkthrough_runs_as_written(live, tmp_path):
    commands = walkthrough_commands()
    assert len(commands) == 9
    outputs = []
    for line in commands:
        argv = shlex.split(line.replace("127.0.0.1:50051", live.address))
        argv[0] = str(BIN / "grpcurl")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        outputs.append(result)
        expect_failure = '"course_id": 99' in line
        assert (result.returncode != 0) == expect_failure, (line, result.stderr)
    missing = outputs[6].stderr
    readme = README.read_text()
    assert "Code: InvalidArgument" in missing and "COURSE_NOT_FOUND" in missing
    for detail in missing.splitlines()[-2:]:
        assert detail in readme, "the README shows the error as grpcurl prints it"
    assert '"enrolledCount": 1' in outputs[5].stdout
    assert '"status": "SERVING"' in outputs[8].stdout


def waitlist_commands() -> list[str]:
    text = README.read_text()
    section = text.split("### A waitlist", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("grpcurl ")]


@pytest.mark.own_database  # the walkthrough's ids start at 1
def test_readme_waitlist_story_runs_as_written(live, tmp_path):
    outputs = []
    for line in walkthrough_commands() + waitlist_commands():
        argv = shlex.split(line.replace("127.0.0.1:50051", live.address))
        argv[0] = str(BIN / "grpcurl")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert (result.returncode != 0) == ('"course_id": 99' in line), (line, result.stderr)
        outputs.append(result.stdout)
    story = outputs[len(walkthrough_commands()) :]
    assert len(story) == 11
    assert '"state": "ENROLLMENT_STATE_WAITLISTED"' in story[5]
    assert '"waitlistPosition": 2' in story[5]
    line = json.loads(story[6])["enrollments"]
    assert [(e["studentId"], e["waitlistPosition"]) for e in line] == [("2", 1), ("3", 2)]
    promoted = json.loads(story[7])["promoted"]
    assert (promoted["studentId"], promoted["state"]) == ("2", "ENROLLMENT_STATE_ENROLLED")
    assert json.loads(story[8])["enrollment"]["waitlistPosition"] == 1
    course = json.loads(story[9])["course"]
    assert (course["capacity"], course["enrolledCount"]) == (2, 2)
    assert "waitlistedCount" not in course  # 0: grpcurl leaves zero values out
    renamed = json.loads(story[10])["course"]
    assert (renamed["title"], renamed["capacity"]) == ("Compilers", 2)  # the mask's only


def section(title: str) -> str:
    return README.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def sh_blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [
        [line for line in block.splitlines() if line and not line.startswith("#")]
        for block in blocks
    ]


def client_credentials(calls: list[str], folder: Path) -> grpc.ChannelCredentials:
    """The CA and client certificate the walkthrough's enrollment-client line uses."""
    line = next(c for c in calls if "enrollment-client" in c)
    words = shlex.split(line)
    files = [(folder / words[words.index(flag) + 1]).read_bytes()
             for flag in ("--tls-ca", "--tls-key", "--tls-cert")]  # fmt: skip
    return grpc.ssl_channel_credentials(*files)


def test_readme_security_walkthrough_runs_as_written(tmp_path, server_process):
    setup, calls = sh_blocks(section("Security"))[:2]
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        # `python -m tests.certs` as from the repository root; the rest runs in tmp_path.
        "PYTHONPATH": str(README.parent),
        # enrollment-client's default address, standing in for 127.0.0.1:50051
        "ENROLLMENT_ADDRESS": address,
    }
    env.pop("ENROLLMENT_TOKEN", None)

    def bash(line: str) -> subprocess.CompletedProcess:
        line = line.replace("127.0.0.1:50051", address)
        return subprocess.run(
            ["bash", "-c", line], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
        )

    *prepare, serve = setup
    assert serve.startswith("enrollment-server serve ")
    for line in prepare:
        result = bash(line)
        assert result.returncode == 0, (line, result.stderr)
    server = server_process(
        argv=["bash", "-c", "exec " + serve.replace("127.0.0.1:50051", address)],
        port=port,
        cwd=tmp_path,
        env=env,
        credentials=client_credentials(calls, tmp_path),
    )
    try:
        results = [bash(line) for line in calls if not line.startswith("export ")]
    finally:
        server.stop(timeout=30)
    log = server.log
    created, listed, denied, health, client = results
    assert created.returncode == 0 and '"code": "SEC-101"' in created.stdout, created.stderr
    assert listed.returncode == 0 and '"SEC-101"' in listed.stdout, listed.stderr
    assert denied.returncode != 0
    assert "PermissionDenied" in denied.stderr and "ROLE_TOO_LOW" in denied.stderr
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    assert client.returncode == 0 and "SEC-101" in client.stdout, client.stderr
    assert "token=ops" in log and "token=dashboard" in log
    for token in (".secrets/ops.token", ".secrets/dashboard.token"):
        assert (tmp_path / token).read_text().strip() not in log


def test_the_security_walkthrough_writes_only_files_git_ignores(tmp_path):
    """Its keys, tokens and database stay out of version control: run from a checkout
    (here a new repository with the project's .gitignore), git sees nothing new."""
    setup, _ = sh_blocks(section("Security"))[:2]
    *prepare, _serve = setup
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text((README.parent / ".gitignore").read_text())
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(README.parent)}
    for line in prepare:
        result = subprocess.run(
            ["bash", "-c", line], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
        )
        assert result.returncode == 0, (line, result.stderr)
    written = sorted(
        str(path.relative_to(tmp_path))
        for path in tmp_path.rglob("*")
        if path.is_file() and ".git" not in path.relative_to(tmp_path).parts
    )
    assert any(name.endswith(".key") for name in written), written
    assert any(name.endswith(".token") for name in written), written
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.split("\n")  # fmt: skip
    assert [line for line in status if line] == ["?? .gitignore"], written


def test_tests_certs_names_every_file_it_writes(tmp_path):
    folder = tmp_path / "certs"
    result = subprocess.run(
        [sys.executable, "-m", "tests.certs", str(folder)],
        capture_output=True, text=True, timeout=60, cwd=README.parent, check=True,
    )  # fmt: skip
    written = sorted(path.name for path in folder.iterdir())
    assert "ca.key" in written
    for name in written:
        assert name in result.stdout, (name, result.stdout)


def test_readme_flags_exist():
    from enrollment.server.startup.cli import build_parser

    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for title in ("Security", "Operations"):
        for flag in set(re.findall(r"`(--[a-z-]+)", section(title))):
            if flag.startswith("--tls-ca") or flag in ("--token", "--timeout"):
                continue  # the client's flags, and flags of the Configuration table
            assert flag in serve_help, flag


def test_readme_tables_give_every_setting_its_variable_and_default():
    from enrollment.server.startup.cli import _default_text
    from enrollment.server.startup.config import SETTINGS

    rows = [
        [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in README.read_text().splitlines()
        if line.startswith("| `--")
    ]
    for setting in SETTINGS:
        [row] = [r for r in rows if re.search(rf"(^|, )`{setting.flag}[ `]", r[0])]
        assert f"`{setting.env}`" in row[1], (setting.flag, row)
        default, expected = row[2].strip("`"), _default_text(setting)
        # a default given in words (pool-size's) may be its last word in the table
        assert default == expected or expected.endswith(" " + default), (setting.flag, row)


@pytest.mark.own_database
def test_readme_feed_consumer_mirrors_rosters_across_its_restarts(live, tmp_path):
    import sqlite3

    from enrollment.v1 import enrollment_pb2 as pb
    from tests.rpc import TIMEOUT, new_course, new_student

    script = tmp_path / "consumer.py"
    block = section("The change feed").split("```python\n", 1)[1].split("```", 1)[0]
    script.write_text(block)
    mirror = tmp_path / "mirror.db"

    def consume() -> None:
        done = subprocess.run(
            [sys.executable, str(script), live.address, str(mirror)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    def call(method, **fields):
        request = getattr(pb, f"{method}Request")(**fields)
        return getattr(live.stub, method)(request, timeout=TIMEOUT)

    def expected() -> set[tuple[int, int]]:
        pairs = set()
        for course in call("ListCourses", page_size=1000).courses:
            for student in call("ListStudents", course_id=course.id, page_size=1000).students:
                pairs.add((course.id, student.id))
        return pairs

    def mirrored() -> set[tuple[int, int]]:
        with sqlite3.connect(mirror) as db:
            return set(db.execute("SELECT course_id, student_id FROM roster"))

    people = [new_student(live.stub) for _ in range(4)]
    small = call(
        "CreateCourse", code="SMALL", title="Small", capacity=1, waitlist_capacity=3
    ).course
    big = new_course(live.stub)
    for p in people:
        call("EnrollStudent", student_id=p.id, course_id=small.id, waitlist_if_full=True)
        call("EnrollStudent", student_id=p.id, course_id=big.id)
    consume()
    assert mirrored() == expected() and len(mirrored()) == 5
    # The consumer is stopped; a drop promotes, a forced delete drops and promotes.
    call("DropCourse", student_id=people[0].id, course_id=small.id)
    call("DeleteStudent", student_id=people[1].id, force=True)
    call("DropCourse", student_id=people[3].id, course_id=big.id)
    consume()
    assert mirrored() == expected() == {(small.id, people[2].id), (big.id, people[0].id),
                                        (big.id, people[2].id)}  # fmt: skip
    consume()  # nothing new: nothing repeated
    assert mirrored() == expected()


@pytest.mark.own_database  # the example's ids start at 1
def test_readme_bulk_load_example_runs_as_written(live, tmp_path):
    """Each command of "Retries and bulk loads" runs against a live server on a new
    database; the `# →` lines after one are its output."""
    (block,) = re.findall(r"```sh\n(.*?)```", section("Retries and bulk loads"), re.S)
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("# → "):
            steps[-1][1].append(line.removeprefix("# → "))
        elif line and not line.startswith("#"):
            steps.append((line, []))
    assert len(steps) == 9
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ENROLLMENT_ADDRESS": live.address}
    for command, expected in steps:
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env=env,
        )  # fmt: skip
        # import exits 1 when a row was rejected, as the example's files are.
        assert result.returncode in ((0, 1) if " import " in command else (0,)), (
            command, result.stderr,
        )  # fmt: skip
        if expected:
            assert result.stdout.splitlines() == expected, command
