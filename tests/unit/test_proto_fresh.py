"""The generated gRPC code in attestd/v1/ is what proto/generate.py makes now.

Editing a .proto without running `make proto` (or hand-editing generated
code) fails here, not in production.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "attestd" / "v1"


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("proto-out")
    proc = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    files = _files(out / "attestd" / "v1")
    assert files, "proto/generate.py generated nothing"
    return files


def test_every_generated_file_is_committed_unchanged(generated: dict[str, bytes]) -> None:
    committed = _files(COMMITTED)
    stale = sorted(name for name, data in generated.items() if committed.get(name) != data)
    assert not stale, f"stale or missing generated code in attestd/v1 (run `make proto`): {stale}"


def test_no_committed_file_is_left_over(generated: dict[str, bytes]) -> None:
    leftover = sorted(set(_files(COMMITTED)) - set(generated))
    assert not leftover, f"attestd/v1 holds files proto/generate.py no longer makes: {leftover}"


def test_every_proto_has_its_modules(generated: dict[str, bytes]) -> None:
    for proto in sorted((REPO / "proto" / "attestd" / "v1").glob("*.proto")):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert proto.stem + suffix in generated
