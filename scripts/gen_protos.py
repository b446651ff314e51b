"""Generate the Python code, descriptor set and docs/api.md from protos/, or check them."""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.rpc import status_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
API_DOCS = ROOT / "docs" / "api.md"
BIN = Path(sys.executable).parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi", ".binpb")
# Descriptors with comments (source info) for server reflection, so that
# `grpcurl describe` shows the API reference; the _pb2 modules drop comments. It
# includes every file it imports and the googleapis files below, so a client in any
# language can be generated, or decode error details, from this one file.
DESCRIPTOR_SET = Path("enrollment/v1/enrollment.binpb")
# googleapis' protos that every failed call's details use (google.rpc.Status in
# grpc-status-details-bin, holding ErrorInfo and BadRequest) and the codes they
# name. Copied from the googleapis-common-protos package installed here, so other
# languages find them beside our own proto: `-I protos` is the whole include path.
GOOGLEAPIS_DIR = Path(status_pb2.__file__).parent
GOOGLEAPIS = tuple(
    Path("google/rpc") / name for name in ("status.proto", "error_details.proto", "code.proto")
)


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "enrollment").rglob("*.proto"))


def generate(out_dir: Path) -> None:
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    for path in GOOGLEAPIS:
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GOOGLEAPIS_DIR / path.name, out_dir / path)
    protoc = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        # out_dir first: the googleapis files just copied, not older copies in protos/.
        f"--proto_path={out_dir}",
        f"--proto_path={PROTO_ROOT}",
    ]
    subprocess.run(
        [
            *protoc,
            # The mypy plugins live beside this interpreter, which need not be on PATH.
            f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *files,
        ],
        check=True,
        cwd=PROTO_ROOT,
    )
    subprocess.run(
        [
            *protoc,
            f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
            "--include_source_info",
            "--include_imports",
            *files,
            *(str(p) for p in GOOGLEAPIS),
        ],
        check=True,
        cwd=PROTO_ROOT,
    )
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(
        (out_dir / DESCRIPTOR_SET).read_bytes()
    )
    (out_dir / "api.md").write_text(render_api_docs(descriptors, files))


# docs/api.md: the reference a reader without grpcurl or the .proto wants, from the
# same descriptor set (so from the same comments) as reflection serves.

# FileDescriptorProto, DescriptorProto, EnumDescriptorProto and ServiceDescriptorProto
# field numbers, as used in SourceCodeInfo location paths.
_SYNTAX, _MESSAGE, _ENUM, _SERVICE = 12, 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM = 2, 3, 4
_VALUE = _METHOD = 2
_SCALARS = {
    number: name.removeprefix("TYPE_").lower()
    for name, number in descriptor_pb2.FieldDescriptorProto.Type.items()
}
# google.rpc messages a caller unpacks from a failed call's details.
_ERROR_DETAILS = ("google.rpc.Status", "google.rpc.ErrorInfo", "google.rpc.BadRequest")


class _Comments:
    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {
            tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location
        }

    def __call__(self, *path: int) -> str:
        text = self._by_path.get(path, "")
        lines = [line.removeprefix(" ") for line in text.splitlines()]
        return "\n".join(lines).strip()


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", name.lower())


class _Types:
    """Link a type name to its section when the reference has one."""

    def __init__(self, documented: set[str]) -> None:
        self.documented = documented

    def link(self, full_name: str) -> str:
        name = full_name.lstrip(".")
        short = name.rsplit(".", 1)[-1]
        if name in self.documented:
            return f"[{short}](#{_anchor(short)})"
        return f"`{name}`"

    def field(self, field, nested: dict[str, descriptor_pb2.DescriptorProto]) -> str:
        if field.type_name:
            entry = nested.get(field.type_name.lstrip("."))
            if entry is not None and entry.options.map_entry:
                key, value = entry.field
                return f"map<{self.field(key, nested)}, {self.field(value, nested)}>"
            kind = self.link(field.type_name)
        else:
            kind = _SCALARS[field.type]
        if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            return f"repeated {kind}"
        return kind


def _message_section(
    out: list[str], message, package: str, comments: _Comments, path: tuple, types: _Types
) -> None:
    name = f"{package}.{message.name}"
    nested = {f"{name}.{n.name}": n for n in message.nested_type}
    out += [f"### {message.name}", "", f"`{name}`", ""]
    text = comments(*path)
    if text:
        out += [text, ""]
    if message.field:
        out += ["| field | number | type | description |", "|---|---|---|---|"]
        for index, field in enumerate(message.field):
            about = _cell(comments(*path, _FIELD, index))
            kind = types.field(field, nested)
            out.append(f"| `{field.name}` | {field.number} | {kind} | {about} |")
    else:
        out.append("No fields.")
    out.append("")
    for index, inner in enumerate(message.nested_type):
        if not inner.options.map_entry:
            _message_section(out, inner, name, comments, (*path, _NESTED, index), types)
    for index, enum in enumerate(message.enum_type):
        _enum_section(out, enum, name, comments, (*path, _NESTED_ENUM, index))


def _enum_section(out: list[str], enum, package: str, comments: _Comments, path: tuple) -> None:
    out += [f"### {enum.name}", "", f"`{package}.{enum.name}`", ""]
    text = comments(*path)
    if text:
        out += [text, ""]
    out += ["| value | number | description |", "|---|---|---|"]
    for index, value in enumerate(enum.value):
        out.append(f"| `{value.name}` | {value.number} | {_cell(comments(*path, _VALUE, index))} |")
    out.append("")


def _method_section(out: list[str], method, comments: _Comments, path: tuple, types) -> str:
    """The method's section; returns its role. Each method comment must say its
    errors ("Errors: ...") and the least role that may call it ("Role: ...")."""
    text = comments(*path)
    fields: dict[str, str] = {}
    about = []
    for paragraph in _paragraphs(text):
        label, _, rest = paragraph.partition(": ")
        if label in ("Errors", "Role") and rest:
            fields[label] = rest.rstrip(".") if label == "Role" else rest
        else:
            about.append(paragraph)
    missing = sorted({"Errors", "Role"} - fields.keys())
    if missing:
        raise SystemExit(f"the comment of rpc {method.name} has no {' or '.join(missing)} line")
    streams = (
        "stream " if method.client_streaming else "",
        "stream " if method.server_streaming else "",
    )
    request, response = method.input_type.rsplit(".", 1)[-1], method.output_type.rsplit(".", 1)[-1]
    out += [
        f"### {method.name}",
        "",
        f"`rpc {method.name}({streams[0]}{request}) returns ({streams[1]}{response})`",
        "",
        *(line for p in about for line in (p, "")),
        f"- Request: {types.link(method.input_type)}",
        f"- Response: {types.link(method.output_type)}",
        f"- Role: {fields['Role']}",
        f"- Errors: {fields['Errors']}",
        "",
    ]
    return fields["Role"]


def _type_names(scope: str, container) -> Iterator[str]:
    """Full names of the messages and enums declared in a file or message, nested ones too."""
    if isinstance(container, descriptor_pb2.FileDescriptorProto):
        messages = container.message_type
    else:
        messages = container.nested_type
    for enum in container.enum_type:
        yield f"{scope}.{enum.name}"
    for message in messages:
        yield f"{scope}.{message.name}"
        yield from _type_names(f"{scope}.{message.name}", message)


def render_api_docs(descriptors: descriptor_pb2.FileDescriptorSet, sources: list[str]) -> str:
    """Markdown for every service, method, message and enum of the files named in sources,
    plus the google.rpc messages of the error details, from their comments."""
    files = {f.name: f for f in descriptors.file}
    ours = [files[name] for name in sources]
    documented = {name for f in ours for name in _type_names(f.package, f)}
    documented |= {*_ERROR_DETAILS, "google.rpc.BadRequest.FieldViolation"}
    types = _Types(documented)
    out = [
        "# API reference",
        "",
        "<!-- Generated by `make proto` (scripts/gen_protos.py) from the comments in",
        f"     {', '.join(sources)}; `make lint` fails when it is stale. Do not edit. -->",
        "",
    ]
    for file in ours:
        comments = _Comments(file)
        out += [f"Package `{file.package}`, file `{file.name}`.", ""]
        header = comments(_SYNTAX)
        if header:
            out += ["## Overview", "", "```text", header, "```", ""]
        for s_index, service in enumerate(file.service):
            out += [f"## Service {service.name}", "", f"`{file.package}.{service.name}`", ""]
            text = comments(_SERVICE, s_index)
            if text:
                out += [text, ""]
            sections: list[str] = []
            rows = []
            for m_index, method in enumerate(service.method):
                role = _method_section(
                    sections, method, comments, (_SERVICE, s_index, _METHOD, m_index), types
                )
                rows.append(
                    f"| [{method.name}](#{_anchor(method.name)}) | "
                    f"{types.link(method.input_type)} | {types.link(method.output_type)} | "
                    f"{role} |"
                )
            out += ["| method | request | response | role |", "|---|---|---|---|", *rows, ""]
            out += sections
        if file.message_type:
            out += ["## Messages", ""]
            for index, message in enumerate(file.message_type):
                _message_section(out, message, file.package, comments, (_MESSAGE, index), types)
        if file.enum_type:
            out += ["## Enums", ""]
            for index, enum in enumerate(file.enum_type):
                _enum_section(out, enum, file.package, comments, (_ENUM, index))
    out += [
        "## Error details",
        "",
        "Every failed call carries a `google.rpc.Status` in the `grpc-status-details-bin`",
        "trailer; its `details` hold an `ErrorInfo`, and a `BadRequest` for",
        "INVALID_ARGUMENT. These come from googleapis (`protos/google/rpc/`).",
        "",
    ]
    for file in descriptors.file:
        comments = _Comments(file)
        for index, message in enumerate(file.message_type):
            if f"{file.package}.{message.name}" in _ERROR_DETAILS:
                _message_section(out, message, file.package, comments, (_MESSAGE, index), types)
    return "\n".join(out).rstrip() + "\n"


def generated_files(base: Path) -> set[Path]:
    found = {
        p.relative_to(base)
        for p in base.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }
    return found | {p for p in GOOGLEAPIS if (base / p).is_file()}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir)
        fresh = generated_files(fresh_dir)
        committed = generated_files(PROTO_ROOT)
        stale = sorted(str(p) for p in fresh ^ committed)
        stale += sorted(
            str(p)
            for p in fresh & committed
            if not filecmp.cmp(fresh_dir / p, PROTO_ROOT / p, shallow=False)
        )
        if not API_DOCS.is_file() or not filecmp.cmp(fresh_dir / "api.md", API_DOCS, shallow=False):
            stale.append(str(API_DOCS.relative_to(ROOT)))
    if stale:
        print("generated code is stale; run `make proto` and commit:", *stale, sep="\n  ")
        return 1
    print(f"generated code is current ({len(fresh) + 1} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for path in generated_files(PROTO_ROOT):
            (PROTO_ROOT / path).unlink()
        for path in generated_files(Path(tmp)):
            (PROTO_ROOT / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / path, PROTO_ROOT / path)
        API_DOCS.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "api.md", API_DOCS)
    count = len(generated_files(PROTO_ROOT)) + 1
    print(f"generated {count} files under {PROTO_ROOT.name}/ and {API_DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
