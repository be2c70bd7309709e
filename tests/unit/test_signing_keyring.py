"""The signing key ring shared by the worker processes of one data directory."""

from __future__ import annotations

import json
from pathlib import Path

from attestd.service.keys import SigningKeyring


def test_rotations_by_two_processes_keep_every_key(tmp_path: Path) -> None:
    # Two workers read the ring at start, then each rotates: neither key may be lost
    # (a credential signed by a lost key could never be verified again).
    a = SigningKeyring(tmp_path, 3600, 1_000)
    b = SigningKeyring(tmp_path, 3600, 1_000)
    first = a.current.kid
    new_a = a.rotate(2_000)
    new_b = b.rotate(3_000)
    index = json.loads((tmp_path / "keys" / "keys.json").read_text())
    kids = [entry["kid"] for entry in index]
    assert kids == [new_b.kid, new_a.kid, first]
    assert [entry["retired_at_ms"] for entry in index] == [0, 3_000, 2_000]
    # A third process reading now sees the same ring.
    c = SigningKeyring(tmp_path, 3600, 4_000)
    assert [k.kid for k in c.keys] == kids
