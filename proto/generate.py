"""Compile proto/attestd/v1/*.proto into attestd/v1/ (messages, gRPC stubs, .pyi).

Usage: python proto/generate.py [OUT_DIR]   (default: the repository root)
The test suite runs it into a temporary directory and compares, so stale
generated code fails the build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    sources = sorted((PROTO_DIR / "attestd" / "v1").glob("*.proto"))
    (out / "attestd" / "v1").mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(s.relative_to(PROTO_DIR)) for s in sources),
    ]
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out / "attestd" / "v1" / "__init__.py"
    init.write_text('"""Generated from proto/attestd/v1 by proto/generate.py; do not edit."""\n')
    (out / "attestd" / "v1" / "py.typed").write_text("")
    return sorted((out / "attestd" / "v1").iterdir())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
