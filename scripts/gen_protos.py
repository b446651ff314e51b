"""Generate Python code from protos/ in place, or check the committed code is current."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# google/rpc/status.proto, imported by enrollment.proto; its Python module comes from
# googleapis-common-protos, so only its descriptor is read here.
THIRD_PARTY = ROOT / "third_party" / "googleapis"
BIN = Path(sys.executable).parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi", ".binpb")
# Descriptors with comments (source info) for server reflection, so that
# `grpcurl describe` shows the API reference; the _pb2 modules drop comments.
DESCRIPTOR_SET = Path("enrollment/v1/enrollment.binpb")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={THIRD_PARTY}",
        # The mypy plugins live beside this interpreter, which need not be on PATH.
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        "--include_source_info",
        "--include_imports",
        *files,
    ]
    (out_dir / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)


def generated_files(base: Path) -> set[Path]:
    return {
        p.relative_to(base)
        for p in base.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


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
    if stale:
        print("generated code is stale; run `make proto` and commit:", *stale, sep="\n  ")
        return 1
    print(f"generated code is current ({len(fresh)} files)")
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
            shutil.copyfile(Path(tmp) / path, PROTO_ROOT / path)
    print(f"generated {len(generated_files(PROTO_ROOT))} files under {PROTO_ROOT.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
