"""CSV import and export of enrollments: batches that a re-run after a crash never applies twice.

An import file has a header and either the columns student_id,course_id or
email,course_code (other columns are ignored). Rows go to the server in batches of up
to 500, in file order, each with a request_id derived (uuid5) from the file's content
hash, the batch's position, its (student_id, course_id) pairs and --waitlist: a re-run
of the same file with the same options sends the same batches with the same ids, so the
batches that committed before a crash are answered from the server's records and only
the rest run; a batch that differs (names that resolve now and did not before) is a new
request.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from enrollment.client.api import MAX_BATCH, ClientError, EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb

BATCH = 500
# uuid5 namespace of import batches (a fixed random UUID: ids never meet other uuid5s).
NAMESPACE = uuid.UUID("6f1e8f1c-3a52-4a5e-9f43-0b7a2f6d8c11")
ID_COLUMNS = ("student_id", "course_id")
NAME_COLUMNS = ("email", "course_code")
REJECT_COLUMNS = ("line", "code", "reason", "message")


class ImportFileError(ValueError):
    """The file cannot be imported at all (no header, unknown columns)."""


@dataclass
class Row:
    line: int  # 1 = the header
    values: dict[str, str]
    pair: tuple[int, int] | None = None


@dataclass
class Reject:
    row: Row
    code: str
    reason: str
    message: str


@dataclass
class Summary:
    rows: int = 0
    enrolled: int = 0
    waitlisted: int = 0
    rejects: list[Reject] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    dry_run: bool = False

    def text(self, reject_path: str | None) -> str:
        done = "would be sent" if self.dry_run else "enrolled"
        ok = self.rows - len(self.rejects)
        parts = [f"{self.rows} rows: {ok} {done}"]
        if self.waitlisted:
            parts.append(f"{self.waitlisted} of them waitlisted")
        parts.append(f"{len(self.rejects)} rejected")
        line = ", ".join(parts)
        if self.rejects and reject_path:
            line += f" (see {reject_path})"
        return line

    def as_json(self, reject_path: str | None) -> dict[str, Any]:
        """The summary for --json, lowerCamelCase as the rest: accepted rows were sent
        (with dry_run: would be), each now enrolled or waitlisted; rejectsFile is null
        when no row failed or the file could not be written."""
        return {
            "rows": self.rows,
            "accepted": self.rows - len(self.rejects),
            "enrolled": 0 if self.dry_run else self.enrolled - self.waitlisted,
            "waitlisted": self.waitlisted,
            "rejected": len(self.rejects),
            "rejectsFile": reject_path if self.rejects else None,
            "dryRun": self.dry_run,
        }


def batch_request_id(
    file_hash: str, index: int, pairs: list[tuple[int, int]], waitlist_if_full: bool
) -> str:
    """The batch's id: the same for the same file, position, (student_id, course_id)
    pairs and options, another for any other batch. The pairs are what the rows resolved
    to: a file of emails and course codes run again after a missing student was created
    sends another batch, under another id (with an id from the file alone it was
    refused whole as REQUEST_ID_REUSED); with the options left out, the file again with
    --waitlist would be the same id on another request."""
    digest = hashlib.sha256(
        ";".join(f"{student},{course}" for student, course in pairs).encode()
    ).hexdigest()
    options = ":waitlist" if waitlist_if_full else ""
    return str(uuid.uuid5(NAMESPACE, f"{file_hash}:{index}:{digest}{options}"))


def read_rows(data: bytes) -> tuple[list[str], list[Row]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImportFileError("the file is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not columns:
            raise ImportFileError("the file is empty: a header line is required")
        twice = sorted({c for c in columns if c and columns.count(c) > 1})
        if twice:
            raise ImportFileError(f"the header names the column {twice[0]!r} twice")
        reader.fieldnames = columns
        if not (set(ID_COLUMNS) <= set(columns) or set(NAME_COLUMNS) <= set(columns)):
            raise ImportFileError(
                "the header must name the columns student_id,course_id or email,course_code; "
                f"it has {','.join(columns)}"
            )
        rows = []
        for record in reader:
            values = {k: (v or "").strip() for k, v in record.items() if k is not None}
            rows.append(Row(reader.line_num, values))
    except csv.Error as exc:
        # A field longer than csv's limit (131072 characters): no row of such a file is
        # sent, as for a bad header.
        raise ImportFileError(f"line {reader.reader.line_num}: {_csv_problem(exc)}") from None
    return columns, rows


def _csv_problem(exc: csv.Error) -> str:
    text = str(exc)
    if "field larger than field limit" in text:
        return f"a field is longer than {csv.field_size_limit()} characters"
    return text


def _ids(row: Row) -> tuple[int, int] | str:
    out = []
    for column in ID_COLUMNS:
        text = row.values.get(column, "")
        # ASCII digits only: str.isdigit takes "²" (which int() refuses) and "１２".
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 2**63 - 1:
            return f"{column} must be a whole number from 1 to {2**63 - 1}, not {text!r}"
        out.append(int(text))
    return out[0], out[1]


def _directory(client: EnrollmentClient) -> tuple[dict[str, int], dict[str, int]]:
    """Every student's email and course's code (lower case) to its id."""
    students = {s.email.lower(): s.id for s in client.iter_students(page_size=1000)}
    courses = {c.code.lower(): c.id for c in client.iter_courses(page_size=1000)}
    return students, courses


def resolve(
    client: EnrollmentClient, columns: list[str], rows: list[Row], summary: Summary
) -> None:
    """Each row's (student_id, course_id), or a reject for a malformed or unknown one."""
    by_id = set(ID_COLUMNS) <= set(columns)
    known = None if by_id else _directory(client)
    for row in rows:
        if by_id:
            found = _ids(row)
            if isinstance(found, str):
                summary.rejects.append(Reject(row, "INVALID_ARGUMENT", "INVALID_FIELD", found))
                continue
            row.pair = found
            continue
        email, code = row.values.get("email", ""), row.values.get("course_code", "")
        assert known is not None
        students, courses = known
        if email.lower() not in students:
            summary.rejects.append(
                Reject(row, "NOT_FOUND", "STUDENT_NOT_FOUND", f"no student has email {email!r}")
            )
        elif code.lower() not in courses:
            summary.rejects.append(
                Reject(row, "NOT_FOUND", "COURSE_NOT_FOUND", f"no course has code {code!r}")
            )
        else:
            row.pair = (students[email.lower()], courses[code.lower()])


def chunks(rows: list[Row], size: int) -> Iterator[list[Row]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def import_file(
    client: EnrollmentClient,
    data: bytes,
    *,
    batch_size: int = BATCH,
    dry_run: bool = False,
    waitlist_if_full: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> Summary:
    """Import the CSV file's bytes. progress: called with the row count, returns an
    object with update(n) (a tqdm bar) or None."""
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch size must be 1 to {MAX_BATCH}")
    columns, rows = read_rows(data)
    summary = Summary(rows=len(rows), columns=columns, dry_run=dry_run)
    bar = progress(len(rows)) if progress is not None else None
    try:
        _import_rows(client, data, rows, summary, batch_size, dry_run, waitlist_if_full, bar)
    finally:
        if bar is not None:
            bar.close()
    summary.rejects.sort(key=lambda r: r.row.line)
    return summary


def _import_rows(
    client: EnrollmentClient,
    data: bytes,
    rows: list[Row],
    summary: Summary,
    batch_size: int,
    dry_run: bool,
    waitlist_if_full: bool,
    progress: Any,
) -> None:
    columns = summary.columns
    resolve(client, columns, rows, summary)
    valid = [row for row in rows if row.pair is not None]
    if progress is not None:
        progress.update(len(rows) - len(valid))
    if dry_run:
        _check_existence(client, valid, summary)
        if progress is not None:
            progress.update(len(valid))
        return
    file_hash = hashlib.sha256(data).hexdigest()
    for index, batch in enumerate(chunks(valid, batch_size)):
        pairs = [row.pair for row in batch if row.pair is not None]
        results = client.batch_enroll(
            pairs,
            allow_partial_success=True,
            waitlist_if_full=waitlist_if_full,
            request_id=batch_request_id(file_hash, index, pairs, waitlist_if_full),
        )
        for row, result in zip(batch, results, strict=True):
            if result.error is not None:
                error = result.error
                summary.rejects.append(Reject(row, error.code, error.reason, error.message))
            elif (
                result.enrollment is not None
                and result.enrollment.state == pb.ENROLLMENT_STATE_WAITLISTED
            ):
                summary.waitlisted += 1
        if progress is not None:
            progress.update(len(batch))
    summary.enrolled = summary.rows - len(summary.rejects)


def _check_existence(client: EnrollmentClient, rows: list[Row], summary: Summary) -> None:
    """Dry run: the students and courses named by id exist (seats are not checked)."""
    students = {s.id for s in client.iter_students(page_size=1000)}
    courses = {c.id for c in client.iter_courses(page_size=1000)}
    for row in rows:
        assert row.pair is not None
        student_id, course_id = row.pair
        if course_id not in courses:
            summary.rejects.append(
                Reject(
                    row,
                    "INVALID_ARGUMENT",
                    "COURSE_NOT_FOUND",
                    f"course {course_id} does not exist",
                )
            )
        elif student_id not in students:
            summary.rejects.append(
                Reject(
                    row, "NOT_FOUND", "STUDENT_NOT_FOUND", f"student {student_id} does not exist"
                )
            )


def write_rejects(out: IO[str], summary: Summary) -> None:
    """The failing rows, with their original columns, line, code, reason and message."""
    columns = [*summary.columns, *REJECT_COLUMNS]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for reject in summary.rejects:
        values = [reject.row.values.get(c, "") for c in summary.columns]
        writer.writerow([*values, reject.row.line, reject.code, reject.reason, reject.message])


def remove_old_rejects(path: str) -> None:
    """For a run without rejects: removes an earlier run's rejects file at path, so what
    lies there never reads as this run's failures. A file whose header does not end in
    REJECT_COLUMNS is someone else's and stays, as does one that cannot be read."""
    with contextlib.suppress(OSError, UnicodeDecodeError, csv.Error):
        with open(path, encoding="utf-8", newline="") as file:
            header = next(csv.reader([file.readline()]), [])
        if tuple(header[-len(REJECT_COLUMNS) :]) == REJECT_COLUMNS:
            os.remove(path)


EXPORT_COLUMNS = ("student_id", "course_id", "state", "waitlist_position", "create_time",
                  "enroll_time")  # fmt: skip


def export(client: EnrollmentClient, out: IO[str], course_id: int = 0) -> int:
    """Every enrollment (of one course, or all) as CSV that `import` reads back; rows.

    The seats come first, then each course's waitlist in line order: imported with
    --waitlist into the same courses, empty, the same students get the seats and wait
    in the same order. (In ListEnrollments' order, by student id, a waiting student
    with a lower id took a seat before one who had it.)"""
    enrolled = client.iter_enrollments(
        course_id=course_id, state=pb.ENROLLMENT_STATE_ENROLLED, page_size=1000
    )
    # The first page is asked for before the header is written: a failing first call
    # leaves the output empty, not a header that reads as an export of nothing.
    first = next(enrolled, None)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    count = 0
    for entry in enrolled if first is None else itertools.chain([first], enrolled):
        writer.writerow(_export_row(entry))
        count += 1
    # Waitlists are short (each at most its course's waitlist capacity): sorted here.
    waiting = client.iter_enrollments(
        course_id=course_id, state=pb.ENROLLMENT_STATE_WAITLISTED, page_size=1000
    )
    for entry in sorted(waiting, key=lambda e: (e.course_id, e.waitlist_position)):
        writer.writerow(_export_row(entry))
        count += 1
    return count


def _export_row(entry: pb.Enrollment) -> Iterable[object]:
    state = pb.EnrollmentState.Name(entry.state).removeprefix("ENROLLMENT_STATE_")
    enroll_time = entry.enroll_time.ToJsonString() if entry.HasField("enroll_time") else ""
    return (entry.student_id, entry.course_id, state, entry.waitlist_position,
            entry.create_time.ToJsonString(), enroll_time)  # fmt: skip


def progress_bar(total: int, stream: IO[str] = sys.stderr) -> Any:
    """A tqdm bar with rate and ETA on a terminal; None when not a TTY or without tqdm."""
    if not stream.isatty():
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:  # the optional "progress" extra is not installed
        return None
    return tqdm(total=total, unit="row", file=stream, dynamic_ncols=True)


__all__ = ["ClientError", "ImportFileError", "Summary", "export", "import_file"]
