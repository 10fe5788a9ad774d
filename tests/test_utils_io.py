"""Atomic writes: the final file appears whole or not at all."""
import os

import pytest

from voxelsplat.utils.io import atomic_write, atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "nested" / "file.bin"
    atomic_write_bytes(str(path), b"first")
    assert path.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(str(path), "wb") as f:
            f.write(b"half of the second")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"first"  # the old content survives a failed write
    assert os.listdir(path.parent) == ["file.bin"]  # and no temporary is left behind
    atomic_write_text(str(path), "second")
    assert path.read_text() == "second" and os.listdir(path.parent) == ["file.bin"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(str(path), "a"):
            pass
