"""The client library's request ids and batches, and `enrollment-client import/export`:
a 20,000-row file with bad rows, and an import killed at a random moment then run again."""

from __future__ import annotations

import csv
import io
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from enrollment.client.api import ClientError, EnrollmentClient
from tests import databases, servers
from tests.conftest import migrated

CLIENT = str(Path(sys.executable).parent / "enrollment-client")
STUDENTS, COURSES = 1990, 10
SMALL_CAPACITY = 1500  # course C-9 is full after 1500 of its 1990 rows


def test_client_mutations_carry_request_ids_and_batches(live):
    with EnrollmentClient(live.address) as client:
        key = str(uuid.uuid4())
        first = client.create_student("A", "a@example.com", request_id=key)
        assert client.create_student("A", "a@example.com", request_id=key) == first
        # Without one, each call gets a fresh id: the repeat runs and is refused.
        with pytest.raises(ClientError) as taken:
            client.create_student("A", "a@example.com")
        assert taken.value.reason == "EMAIL_TAKEN"
        other = client.create_student("B", "b@example.com")
        course = client.create_course("K-1", "K", capacity=1)
        results = client.batch_enroll(
            [(first.id, course.id), (other.id, course.id)], allow_partial_success=True
        )
        assert results[0].ok and results[0].enrollment.student_id == first.id
        assert (results[1].error.code, results[1].error.reason) == (
            "FAILED_PRECONDITION",
            "COURSE_FULL",
        )
        with pytest.raises(ClientError) as failed:
            client.batch_enroll([(other.id, course.id)])
        assert (failed.value.reason, failed.value.metadata["index"]) == ("COURSE_FULL", "0")
        dropped = client.batch_drop([(first.id, course.id)])
        assert dropped[0].ok and dropped[0].enrollment is None


def _world(address: str) -> None:
    """STUDENTS students s<i>@example.com and COURSES courses C-0..C-9 (C-9 small)."""
    with EnrollmentClient(address, timeout=30) as client:
        for c in range(COURSES):
            client.create_course(f"C-{c}", "T", capacity=SMALL_CAPACITY if c == 9 else 0)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: client.create_student("S", f"s{i}@example.com"),
                          range(STUDENTS)))  # fmt: skip


def _file(path: Path) -> dict[int, str]:
    """Writes the 20,000-row file; returns the reason expected for each bad row's line."""
    rows = [(f"s{i}@example.com", f"C-{c}") for c in range(COURSES) for i in range(STUDENTS)]
    random.Random(7).shuffle(rows)
    bad = [("", "C-1"), ("nobody@example.com", "C-1"), ("s1@example.com", "NO-SUCH")] * 25
    bad += [(f"s{i}@example.com", "C-0") for i in range(25)]  # repeats: ALREADY_ENROLLED
    spots = sorted(random.Random(8).sample(range(1, len(rows)), len(bad)))
    for spot, row in zip(reversed(spots), reversed(bad), strict=True):
        rows.insert(spot, row)
    assert len(rows) == 20_000
    expected: dict[int, str] = {}
    seen: set[tuple[str, str]] = set()
    small = 0
    for line, (email, code) in enumerate(rows, start=2):
        if not email or email.startswith("nobody"):
            expected[line] = "STUDENT_NOT_FOUND"
        elif code == "NO-SUCH":
            expected[line] = "COURSE_NOT_FOUND"
        elif (email, code) in seen:
            expected[line] = "ALREADY_ENROLLED"
        else:
            seen.add((email, code))
            if code == "C-9":
                small += 1
                if small > SMALL_CAPACITY:
                    expected[line] = "COURSE_FULL"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["email", "course_code"])
        writer.writerows(rows)
    return expected


def _import(address: str, path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [CLIENT, "--address", address, "--timeout", "60", "import", str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _state(url: str) -> list[tuple]:
    """Every enrollment by email and code, with its state; every course's counts."""
    rows = databases.query(
        url,
        "SELECT s.email, c.code, sc.state FROM student_courses sc "
        "JOIN students s ON s.id = sc.student_id JOIN courses c ON c.id = sc.course_id "
        "ORDER BY s.email, c.code",
    )
    counts = databases.query(
        url, "SELECT code, enrolled_count, waitlisted_count FROM courses ORDER BY code"
    )
    return [tuple(r) for r in rows] + [tuple(c) for c in counts]


def _rejects(path: Path) -> list[tuple]:
    with path.open() as rejects:
        return [(r["line"], r["email"], r["course_code"], r["code"], r["reason"])
                for r in csv.DictReader(rejects)]  # fmt: skip


def test_a_20000_row_import_rejects_the_bad_rows_and_a_killed_one_reruns_exactly(
    db_url, new_database, tmp_path
):
    path = tmp_path / "enrollments.csv"
    expected = _file(path)
    clean_url = migrated(new_database())
    clean = servers.start(tmp_path / "clean.log", "--database-url", clean_url)
    killed = servers.start(tmp_path / "killed.log", "--database-url", db_url)
    clean_address, address = clean.address, killed.address
    try:
        _world(clean_address)
        _world(address)
        # One clean run.
        started = time.monotonic()
        run = _import(clean_address, path, "--rejects", str(tmp_path / "clean.csv"))
        out, err = run.communicate(timeout=600)
        took = time.monotonic() - started
        assert run.returncode == 1, err  # some rows were rejected
        assert f"20000 rows: {20000 - len(expected)} enrolled" in out, out
        with (tmp_path / "clean.csv").open() as rejects:
            got = {int(r["line"]): r["reason"] for r in csv.DictReader(rejects)}
        assert got == expected
        # Killed at a random moment, then run to the end.
        run = _import(address, path, "--rejects", str(tmp_path / "again.csv"))
        time.sleep(random.uniform(0.1, max(0.2, took * 0.9)))
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        run = _import(address, path, "--rejects", str(tmp_path / "again.csv"))
        out, err = run.communicate(timeout=600)
        assert run.returncode == 1, err
        assert _state(db_url) == _state(clean_url)
        # The same rejects (messages name ids, which differ between the two databases).
        assert _rejects(tmp_path / "again.csv") == _rejects(tmp_path / "clean.csv")
        # And a third run changes nothing.
        run = _import(address, path, "--rejects", str(tmp_path / "third.csv"))
        run.communicate(timeout=600)
        assert _state(db_url) == _state(clean_url)
    finally:
        for server in (clean, killed):
            server.stop()


def test_dry_run_checks_without_applying_and_export_round_trips(live, tmp_path):
    with EnrollmentClient(live.address) as client:
        a, b = client.create_student("A", "a@example.com"), client.create_student("B", "b@x.io")
        course = client.create_course("E-1", "E")
    path = tmp_path / "ids.csv"
    path.write_text(
        f"student_id,course_id\n{a.id},{course.id}\n{b.id},{course.id}\nx,{course.id}\n{a.id},999\n"
    )
    run = _import(live.address, path, "--dry-run")
    out, err = run.communicate(timeout=60)
    assert run.returncode == 1 and "4 rows: 2 would be sent, 2 rejected" in out, (out, err)
    assert databases.query(live.database_url, "SELECT COUNT(*) FROM student_courses") == [(0,)]
    rejects = list(csv.DictReader((tmp_path / "ids.csv.rejects.csv").open()))
    assert [(r["line"], r["reason"]) for r in rejects] == [
        ("4", "INVALID_FIELD"),
        ("5", "COURSE_NOT_FOUND"),
    ]
    path.write_text(f"student_id,course_id\n{a.id},{course.id}\n{b.id},{course.id}\n")
    run = _import(live.address, path)
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 0 and "2 rows: 2 enrolled, 0 rejected" in out, out
    exported = subprocess.run(
        [CLIENT, "--address", live.address, "export", "--course", str(course.id)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(int(r["student_id"]), r["state"]) for r in rows] == [
        (a.id, "ENROLLED"),
        (b.id, "ENROLLED"),
    ]
    # The export is an import file: importing it again is refused row by row.
    (tmp_path / "roster.csv").write_text(exported.stdout)
    run = _import(live.address, tmp_path / "roster.csv")
    out, _ = run.communicate(timeout=60)
    assert "2 rows: 0 enrolled, 2 rejected" in out, out


def test_the_same_file_again_with_waitlist_runs_its_batches_anew(live, tmp_path):
    # A batch's request_id names its options too: the file again with --waitlist is
    # another request, not a replay of the first run's batches (it was refused whole as
    # REQUEST_ID_REUSED, with no row's result), while the same run again is a replay.
    with EnrollmentClient(live.address) as client:
        a, b = client.create_student("A", "a@example.com"), client.create_student("B", "b@x.io")
        course = client.create_course("W-1", "W", capacity=1, waitlist_capacity=5)
    path = tmp_path / "wl.csv"
    path.write_text(f"student_id,course_id\n{a.id},{course.id}\n{b.id},{course.id}\n")
    out, err = _import(live.address, path).communicate(timeout=60)
    assert "2 rows: 1 enrolled, 1 rejected" in out, (out, err)
    run = _import(live.address, path, "--waitlist")
    out, err = run.communicate(timeout=60)
    assert "1 of them waitlisted" in out and "REQUEST_ID_REUSED" not in err, (out, err)
    assert databases.query(
        live.database_url, "SELECT enrolled_count, waitlisted_count FROM courses"
    ) == [(1, 1)]
    # The first run's options again: its batch answered from its record, nothing new.
    out, err = _import(live.address, path).communicate(timeout=60)
    assert "2 rows: 1 enrolled, 1 rejected" in out, (out, err)
    assert databases.query(
        live.database_url, "SELECT enrolled_count, waitlisted_count FROM courses"
    ) == [(1, 1)]


def test_the_same_names_file_after_adding_a_missing_student_runs(live, tmp_path):
    # A batch's request_id came from the file, but its pairs from the names as they
    # resolved then: the file run again after creating the missing student resolved to
    # another batch under the same id, refused whole as REQUEST_ID_REUSED.
    with EnrollmentClient(live.address) as client:
        client.create_student("A", "a@example.com")
        course = client.create_course("N-1", "N")
    path = tmp_path / "names.csv"
    path.write_text("email,course_code\na@example.com,N-1\nb@example.com,N-1\n")
    out, err = _import(live.address, path).communicate(timeout=60)
    assert "2 rows: 1 enrolled, 1 rejected" in out, (out, err)
    with EnrollmentClient(live.address) as client:
        client.create_student("B", "b@example.com")
    run = _import(live.address, path)
    out, err = run.communicate(timeout=60)
    assert "REQUEST_ID_REUSED" not in out + err, (out, err)
    # A's row went out again (the batch is another now): already enrolled, B enrolled.
    assert "2 rows: 1 enrolled, 1 rejected" in out, (out, err)
    rejects = (tmp_path / "names.csv.rejects.csv").read_text()
    assert "a@example.com" in rejects and "ALREADY_ENROLLED" in rejects, rejects
    assert databases.query(
        live.database_url, "SELECT enrolled_count FROM courses WHERE id = ?", (course.id,)
    ) == [(2,)]
    # The same again: its batch is now the one just sent, answered from its record.
    out, err = _import(live.address, path).communicate(timeout=60)
    assert "2 rows: 1 enrolled, 1 rejected" in out, (out, err)


def test_rejects_to_a_missing_folder_is_refused_before_anything_is_sent(live, tmp_path):
    # It was a traceback after the batches had committed.
    with EnrollmentClient(live.address) as client:
        a = client.create_student("A", "a@example.com")
        course = client.create_course("R-1", "R")
    path = tmp_path / "ok.csv"
    path.write_text(f"student_id,course_id\n{a.id},{course.id}\n")
    run = _import(live.address, path, "--rejects", str(tmp_path / "missing" / "r.csv"))
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2, (out, err)
    assert err.startswith("enrollment-client: cannot write the rejects to "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    assert databases.query(live.database_url, "SELECT COUNT(*) FROM student_courses") == [(0,)]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("folder", "is a folder"),  # an existing folder: it was the rows, then "Is a directory"
        ("folder/", "is a folder"),
        ("new/", "is a folder"),  # a trailing "/" names a folder, which open() refuses
        ("file.txt/r.csv", "its folder is missing or not writable"),  # the parent is a file
    ],
)
def test_rejects_that_cannot_be_written_are_refused_before_anything_is_sent(
    live, tmp_path, target, expected
):
    # An existing folder at --rejects passed the check of its parent: the batches
    # committed, then the rejects could not be written and their reasons were lost.
    with EnrollmentClient(live.address) as client:
        a = client.create_student("A", "a@example.com")
        course = client.create_course("R-1", "R")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("not a folder\n")
    path = tmp_path / "ok.csv"
    path.write_text(f"student_id,course_id\n{a.id},{course.id}\nx,1\n")
    rejects = str(tmp_path) + "/" + target
    run = _import(live.address, path, "--rejects", rejects)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2, (out, err)
    said = f"enrollment-client: cannot write the rejects to {rejects}: {expected} (--rejects PATH)"
    assert err == said + "\n", err
    assert out == ""
    assert databases.query(live.database_url, "SELECT COUNT(*) FROM student_courses") == [(0,)]


def test_import_with_json_prints_its_summary_as_json(live, tmp_path):
    # --json was ignored: the readable summary line, which a script cannot parse.
    with EnrollmentClient(live.address) as client:
        a, b = client.create_student("A", "a@example.com"), client.create_student("B", "b@x.io")
        course = client.create_course("J-1", "J", capacity=1, waitlist_capacity=1)
    path = tmp_path / "j.csv"
    path.write_text(f"student_id,course_id\n{a.id},{course.id}\n{b.id},{course.id}\nx,1\n")
    run = _import(live.address, path, "--waitlist", "--json")
    out, err = run.communicate(timeout=60)
    assert run.returncode == 1, (out, err)
    assert json.loads(out) == {
        "rows": 3,
        "accepted": 2,
        "enrolled": 1,
        "waitlisted": 1,
        "rejected": 1,
        "rejectsFile": str(tmp_path / "j.csv.rejects.csv"),
        "dryRun": False,
    }, out
    # A local failure is the JSON error object on stdout, as a usage error is.
    run = _import(live.address, tmp_path / "missing.csv", "--json")
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2, (out, err)
    body = json.loads(out)["error"]
    assert body["code"] == "USAGE" and "cannot read" in body["message"], out


def test_export_with_the_server_down_writes_no_header(tmp_path):
    # It wrote the CSV header, then the error: a half-made file that looks like an
    # export of nothing.
    done = subprocess.run(
        [CLIENT, "--address", f"127.0.0.1:{servers.free_port()}", "--timeout", "2", "export"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert done.stdout == "", done.stdout
    assert "UNAVAILABLE" in done.stderr, done.stderr


def test_a_run_without_rejects_removes_an_earlier_runs_rejects_file(live, tmp_path):
    # The earlier run's rejects stayed beside a file that now imports cleanly, read as
    # this run's failures.
    with EnrollmentClient(live.address) as client:
        a, b = client.create_student("A", "a@example.com"), client.create_student("B", "b@x.io")
        course = client.create_course("C-1", "C")
    path = tmp_path / "c.csv"
    rejects = tmp_path / "c.csv.rejects.csv"
    path.write_text(f"student_id,course_id\n{a.id},{course.id}\nx,1\n")
    out, err = _import(live.address, path).communicate(timeout=60)
    assert "1 rejected" in out and rejects.exists(), (out, err)
    path.write_text(f"student_id,course_id\n{b.id},{course.id}\n")
    run = _import(live.address, path)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0 and "0 rejected" in out, (out, err)
    assert not rejects.exists()
    # A file at --rejects that is not a rejects file is left alone.
    other = tmp_path / "notes.csv"
    other.write_text("my,own\nnotes,here\n")
    run = _import(live.address, path, "--rejects", str(other))  # the same run: a replay
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, (out, err)
    assert other.read_text() == "my,own\nnotes,here\n"


def test_ids_that_are_not_ascii_digits_are_rejected_row_by_row(live, tmp_path):
    # "²" passed str.isdigit and failed int(): the whole file stopped at that row; "１２"
    # (fullwidth) was read as 12 and imported.
    with EnrollmentClient(live.address) as client:
        a = client.create_student("A", "a@example.com")
        course = client.create_course("D-1", "D")
    path = tmp_path / "digits.csv"
    path.write_text(
        f"student_id,course_id\n{a.id},{course.id}\n²,{course.id}\n"
        f"{''.join(chr(0xFF10 + int(d)) for d in str(a.id))},{course.id}\n"
        f"{2**63},{course.id}\n"
    )
    run = _import(live.address, path)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 1 and "4 rows: 1 enrolled, 3 rejected" in out, (out, err)
    rejects = list(csv.DictReader((tmp_path / "digits.csv.rejects.csv").open()))
    assert [(r["line"], r["reason"]) for r in rejects] == [
        ("3", "INVALID_FIELD"),
        ("4", "INVALID_FIELD"),
        ("5", "INVALID_FIELD"),
    ]
    # An id past int64 was told "must be a whole number of 1 or more".
    assert rejects[2]["message"] == (
        f"student_id must be a whole number from 1 to {2**63 - 1}, not '{2**63}'"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("student_id,course_id\n1," + "9" * 200_000 + "\n", "line 2: a field is longer"),
        ("student_id,course_id,student_id\n1,2,3\n", "names the column 'student_id' twice"),
    ],
)
def test_a_file_the_import_cannot_read_is_one_line_before_anything_is_sent(
    live, tmp_path, content, expected
):
    # A field over csv's limit was a traceback; a column named twice was
    # read from its last copy without a word.
    path = tmp_path / "bad.csv"
    path.write_text(content)
    run = _import(live.address, path)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2, (out, err)
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert databases.query(live.database_url, "SELECT COUNT(*) FROM student_courses") == [(0,)]


def test_an_export_imported_with_waitlist_gives_the_same_seats_and_line(live, tmp_path):
    # The export was in (course_id, student_id) order: imported again, a waiting
    # student with a lower id than a seated one took the seat.
    with EnrollmentClient(live.address) as client:
        first, second, third, fourth = (
            client.create_student(name, f"{name}@example.com") for name in "abcd"
        )
        course = client.create_course("L-1", "L", capacity=1, waitlist_capacity=3)
        for student in (fourth, second, first, third):  # d seated; b, a, c wait in that order
            client.enroll(student.id, course.id, waitlist_if_full=True)
        before = [
            (e.student_id, e.state, e.waitlist_position)
            for e in client.iter_enrollments(course_id=course.id)
        ]
    exported = subprocess.run(
        [CLIENT, "--address", live.address, "export"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    path = tmp_path / "export.csv"
    path.write_text(exported.stdout)
    with EnrollmentClient(live.address) as client:
        for student in (first, second, third, fourth):
            client.drop(student.id, course.id)
    out, err = _import(live.address, path, "--waitlist").communicate(timeout=60)
    assert "4 rows: 4 enrolled, 3 of them waitlisted, 0 rejected" in out, (out, err)
    with EnrollmentClient(live.address) as client:
        after = [
            (e.student_id, e.state, e.waitlist_position)
            for e in client.iter_enrollments(course_id=course.id)
        ]
    assert after == before
