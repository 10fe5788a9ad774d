"""The synthetic generator under interruption: its workers end with it, however it ends, and
its output folder is always the previous complete dataset or the new one, with no folder of
anyone else touched."""
import glob
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from voxelsplat.synthetic import generate_synthetic_dataset, staging
from voxelsplat.synthetic.workers import ordered_map

from test_synthetic_dataset import _digest  # the dataset tree's content hash, one definition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_synthetic_dataset.py")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")

# enough frames that the run cannot end before it is killed (about 1 s a frame and worker)
LONG_RUN = ["--scenes", "1", "--samples-per-scene", "40", "--image-size", "64", "32", "--workers", "2"]
TINY = dict(scenes=1, samples_per_scene=1, image_size=(48, 24))


def _running(pid):
    """Alive and not a zombie (a killed worker adopted by an init that does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid):
    children = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.split("/")[2]))
    return sorted(children)


def _wait_until(condition, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def _start_generator(output, log):
    """The tool in a process of its own, once both workers have written a frame: (process, workers)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, TOOL, "--output", str(output), *LONG_RUN], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    started = _wait_until(lambda: proc.poll() is not None or (
        len(_children(proc.pid)) == 2 and glob.glob(f"{output}.partial-{proc.pid}-*/samples/LIDAR_TOP/*")), 60)
    assert started and proc.poll() is None, f"the generator did not get to render frames (exit {proc.returncode})"
    return proc, _children(proc.pid)


def _end(proc, workers):
    """Leave nothing running if an assertion failed."""
    for pid in [proc.pid, *workers]:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


def test_killed_generator_takes_its_workers_along_and_the_next_run_names_its_staging(tmp_path, caplog):
    output = tmp_path / "data"
    with open(tmp_path / "log", "w") as log:
        proc, workers = _start_generator(output, log)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _wait_until(lambda: not any(_running(pid) for pid in workers), 5), \
            f"workers {workers} outlived their killed parent"
    finally:
        _end(proc, workers)
    stage, = glob.glob(f"{output}.partial-{proc.pid}-*")
    assert not output.exists()
    # the next run reports the folder the killed one left, and leaves it alone
    with caplog.at_level(logging.WARNING, logger=staging.__name__):
        generate_synthetic_dataset(str(output), workers=1, **TINY)
    assert stage in caplog.text and f"rm -rf '{stage}'" in caplog.text
    assert os.path.isdir(stage) and (output / "v1.0-mini" / "sample.json").is_file()


def test_terminated_generator_ends_its_workers_and_leaves_nothing(tmp_path):
    output = tmp_path / "data"
    with open(tmp_path / "log", "w") as log:
        proc, workers = _start_generator(output, log)
    try:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
        assert not any(_running(pid) for pid in workers)
    finally:
        _end(proc, workers)
    assert sorted(os.listdir(tmp_path)) == ["log"]
    assert "left as it was" in (tmp_path / "log").read_text()


def _pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def test_worker_ends_on_sigterm_even_if_its_parent_ignores_it():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        def end_first_worker(pid):
            os.kill(pid, signal.SIGTERM)

        start = time.monotonic()
        with pytest.raises(RuntimeError, match="worker process ended"):
            ordered_map(_pid_after, [0.0] + [0.5] * 40, workers=2, on_result=end_first_worker)
        assert time.monotonic() - start < 10
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_marker(path):
    time.sleep(0.2)
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return os.getpid()


def test_interrupted_map_ends_the_running_workers_before_raising(tmp_path):
    markers = [str(tmp_path / f"{i}.txt") for i in range(30)]
    seen = []

    def interrupt(pid):
        seen.append(pid)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ordered_map(_write_marker, markers, workers=2, on_result=interrupt)
    written = sorted(os.listdir(tmp_path))
    assert seen and not _running(seen[0])
    time.sleep(0.5)  # a worker still alive would write more frames meanwhile
    assert sorted(os.listdir(tmp_path)) == written and len(written) < len(markers)


def test_overwrite_keeps_folders_of_others_and_reports_stale_staging(tmp_path, caplog):
    spec = importlib.util.spec_from_file_location("make_synthetic_dataset", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    output = tmp_path / "data"
    generate_synthetic_dataset(str(output), seed=1, workers=1, **TINY)
    previous = _digest(output)
    dead = subprocess.Popen(["true"])
    dead.wait()
    others = {"data.old": "a user's backup", "data.partial": "left by an older generator",
              f"data.partial-{dead.pid}-0badc0de": "left by a killed run",
              f"data.partial-{os.getppid()}-0123abcd": "of a run still going"}
    for name, text in others.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "note.txt").write_text(text)

    with caplog.at_level(logging.WARNING):
        assert tool.main(["--output", str(output), "--scenes", "1", "--samples-per-scene", "1", "--image-size",
                          "48", "24", "--seed", "2", "--workers", "2", "--overwrite"]) == 0
    for name in ("data.partial", f"data.partial-{dead.pid}-0badc0de"):
        assert f"rm -rf '{tmp_path / name}'" in caplog.text
    assert "data.old" not in caplog.text and "0123abcd" not in caplog.text
    assert sorted(os.listdir(tmp_path)) == sorted(["data", *others])
    assert all((tmp_path / name / "note.txt").read_text() == text for name, text in others.items())
    reference = generate_synthetic_dataset(str(tmp_path / "reference"), seed=2, workers=1, **TINY)
    assert _digest(output) == _digest(reference["root"]) != previous


def _write_tree(root, version):
    os.makedirs(os.path.join(root, "sub"))
    for name in ("a.txt", os.path.join("sub", "b.txt")):
        with open(os.path.join(root, name), "w") as f:
            f.write(f"{version} {name}")


class _Interrupted(BaseException):
    pass


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_swap_interrupted_at_any_step_leaves_previous_or_new_folder(tmp_path, monkeypatch, exchange):
    """Every file system step of the swap, interrupted just before or just after it."""
    if not exchange:
        monkeypatch.setattr(staging, "_renameat2", lambda source, target, flags: False)
    steps = {"_renameat2": staging, "_remove": staging, "rename": os}
    originals = {name: getattr(module, name) for name, module in steps.items()}
    reference = {}
    for version in ("old", "new"):
        _write_tree(str(tmp_path / "reference" / version), version)
        reference[version] = _digest(tmp_path / "reference" / version)
    outcomes = set()
    for fail_at in range(40):
        for after in (False, True):
            run = tmp_path / f"run-{fail_at}-{after}"
            output = run / "data"
            _write_tree(str(output), "old")
            count = [0]

            def counted(name):
                def step(*args, **kwargs):
                    count[0] += 1
                    if count[0] == fail_at and not after:
                        raise _Interrupted
                    result = originals[name](*args, **kwargs)
                    if count[0] == fail_at and after:
                        raise _Interrupted
                    return result
                return step

            try:
                with staging.staged_folder(str(output), overwrite=True) as stage:
                    _write_tree(stage, "new")
                    count[0] = 0
                    for name, module in steps.items():
                        monkeypatch.setattr(module, name, counted(name))
                outcomes.add("done")
            except _Interrupted:
                outcomes.add("interrupted")
            finally:
                for name, module in steps.items():
                    monkeypatch.setattr(module, name, originals[name])
            assert os.listdir(run) == ["data"], (fail_at, after)
            assert _digest(output) in reference.values(), (fail_at, after)
        if count[0] < fail_at:
            break  # every step has been interrupted
    assert outcomes == {"done", "interrupted"}
