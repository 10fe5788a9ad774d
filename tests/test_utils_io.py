"""Atomic writes: the final file appears whole or not at all; what was written is read back
exactly, and nothing read runs code."""
import json
import logging
import os

import numpy as np
import pytest

from voxelsplat.utils.io import (
    append_json_lines, atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, folder_bytes,
    read_json, read_json_lines, remove_stale_temporaries,
)


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


def _age(path, seconds=3600.0):
    """Set ``path``'s modification time ``seconds`` into the past."""
    when = os.stat(path).st_mtime - seconds
    os.utime(path, (when, when))


def test_next_write_removes_only_stale_temporaries_of_its_own_target(tmp_path):
    target = tmp_path / "model_final.pth"
    stale = tmp_path / ".model_final.pth.tmp-k3x_9q2a.pth"  # left by a writer killed earlier
    live = tmp_path / ".model_final.pth.tmp-0b7ed4zz.pth"   # a writer still at work
    other = tmp_path / ".model_0000009.pth.tmp-aaaabbbb.pth"  # another target's
    lookalike = tmp_path / "model_final.pth.tmp-k3x_9q2a"    # not the library's naming
    for path in (stale, live, other, lookalike):
        path.write_bytes(b"")
    for path in (stale, other, lookalike):
        _age(path)
    with atomic_write(str(target), "wb", suffix=".pth") as f:
        f.write(b"weights")
    assert target.read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, live.name, other.name, lookalike.name])
    assert remove_stale_temporaries(str(tmp_path)) == [str(other)]
    assert remove_stale_temporaries(str(tmp_path / "absent")) == []


_KILLED_WRITER = """
import os, signal, sys
from voxelsplat.utils.io import atomic_write
with atomic_write(sys.argv[1], "wb", suffix=".pth") as f:
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporary_of_a_writer_killed_by_sigkill_is_removed_by_the_next_process(tmp_path):
    import signal
    import subprocess
    import sys

    target = tmp_path / "model_final.pth"
    target.write_bytes(b"previous")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p.name != target.name]
    assert len(left) == 1 and left[0].startswith(".model_final.pth.tmp-"), left
    assert target.read_bytes() == b"previous"  # the kill never touched the final name
    # the next process that writes the target cleans up
    write = "import sys; from voxelsplat.utils.io import atomic_write_bytes; atomic_write_bytes(sys.argv[1], b'new')"
    subprocess.run([sys.executable, "-c", write, str(target)], check=True)
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_bytes() == b"new"


def test_json_with_arrays_round_trips_exactly_and_never_unpickles(tmp_path):
    rng = np.random.default_rng(7)
    value = {
        "pose": rng.normal(size=(4, 4)),
        "ids": rng.integers(-2**40, 2**40, size=(5,)),
        "mask": rng.random((2, 3, 2)) > 0.5,
        "pixels": rng.integers(0, 255, size=(3, 2), dtype=np.uint8),
        "half": rng.normal(size=(3,)).astype(np.float16),
        "fortran": np.asfortranarray(rng.normal(size=(3, 5))),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar_array": np.array(2.5),
        "cameras": [{"name": "CAM_FRONT", "K": rng.normal(size=(3, 3)), "size": (1600, 900)}, None],
        "numpy_scalars": [np.float64(0.1), np.int64(-3), np.bool_(True)],
        "text": "ünïcode", "number": 1e-300, "flag": False,
    }
    path = str(tmp_path / "cache.json")
    atomic_write_json(path, value)
    back = read_json(path)
    for key in ("pose", "ids", "mask", "pixels", "half", "fortran", "empty", "scalar_array"):
        assert back[key].dtype == value[key].dtype and back[key].shape == value[key].shape, key
        np.testing.assert_array_equal(back[key], value[key])
        assert back[key].flags.writeable
    np.testing.assert_array_equal(back["cameras"][0]["K"], value["cameras"][0]["K"])
    assert back["cameras"][0]["size"] == [1600, 900] and back["cameras"][1] is None
    assert back["numpy_scalars"] == [0.1, -3, True] and type(back["numpy_scalars"][1]) is int
    assert (back["text"], back["number"], back["flag"]) == ("ünïcode", 1e-300, False)

    with pytest.raises(TypeError, match="object"):
        atomic_write_json(str(tmp_path / "objects.json"), {"a": np.array([object()])})
    assert not (tmp_path / "objects.json").exists()

    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    (tmp_path / "cache.json").write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(ValueError, match="cache.json"):
        read_json(path)
    assert not marker.exists()
    tampered = {"__ndarray__": "AAAA", "dtype": "|O", "shape": [1]}
    (tmp_path / "cache.json").write_text(json.dumps({"a": tampered}))
    with pytest.raises(ValueError, match="dtype"):
        read_json(path)


def test_json_lines_survive_a_record_cut_by_a_killed_writer(tmp_path, caplog):
    path = tmp_path / "metrics.json"
    append_json_lines(str(path), [])
    assert not path.exists()  # nothing to write: no empty file
    append_json_lines(str(path), [{"iteration": 0, "loss": 1.5}, {"iteration": 1, "loss": 1.25}])
    with open(path, "a") as f:
        f.write('{"iteration": 2, "lo')  # a process killed mid-record
    assert read_json_lines(str(path)) == [{"iteration": 0, "loss": 1.5}, {"iteration": 1, "loss": 1.25}]
    append_json_lines(str(path), [{"iteration": 3, "loss": 1.0}])  # the resumed run
    lines = path.read_text().splitlines()
    assert lines[-1] == '{"iteration": 3, "loss": 1.0}' and lines[-2] == '{"iteration": 2, "lo'
    with caplog.at_level(logging.WARNING, logger="voxelsplat.utils.io"):
        records = read_json_lines(str(path))
    assert [r["iteration"] for r in records] == [0, 1, 3]
    assert "metrics.json" in caplog.text and "line(s) [3]" in caplog.text
    # a record glued to a cut one (a writer that appends blindly) costs only that line
    with open(path, "a") as f:
        f.write('{"iteration": 4, "lo{"iteration": 5, "loss": 0.5}\n\n{"iteration": 6, "loss": 0.25}\n')
    assert [r["iteration"] for r in read_json_lines(str(path))] == [0, 1, 3, 6]
    (tmp_path / "empty.json").write_bytes(b"")
    assert read_json_lines(str(tmp_path / "empty.json")) == []


def test_written_file_gets_the_permissions_open_would_give_or_keeps_those_it_replaces(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "new.txt"), "a")
        assert os.stat(tmp_path / "new.txt").st_mode & 0o777 == 0o640  # 0o666 less the umask, not 0o600
        with open(tmp_path / "reference.txt", "w") as f:  # what a plain open gives
            f.write("a")
        assert os.stat(tmp_path / "reference.txt").st_mode & 0o777 == 0o640
        os.chmod(tmp_path / "new.txt", 0o604)
        atomic_write_text(str(tmp_path / "new.txt"), "b")
        assert os.stat(tmp_path / "new.txt").st_mode & 0o777 == 0o604
    finally:
        os.umask(previous)


def test_folder_bytes_sums_the_files_below_counting_links_as_themselves(tmp_path):
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 5000, size=6)
    for i, size in enumerate(sizes):
        folder = tmp_path / "a" / ("b" if i % 2 else "") / ("c" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}.bin").write_bytes(rng.bytes(int(size)))
    assert folder_bytes(str(tmp_path)) == int(sizes.sum())
    (tmp_path / "big.bin").write_bytes(b"x" * 100_000)
    (tmp_path / "a" / "link").symlink_to(tmp_path / "big.bin")
    assert folder_bytes(str(tmp_path / "a")) == int(sizes.sum()) + len(os.readlink(tmp_path / "a" / "link"))
    assert folder_bytes(str(tmp_path / "missing")) == 0
