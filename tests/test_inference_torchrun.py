"""``torchrun -m cobot_med infer`` on CPUs with gloo (issue 17): the same segmentations and metrics as one
process, failures reported whichever process met them, and a killed process's work finished by a rerun."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toy import acting_adapter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # 16-19 s alone each


@pytest.fixture(scope="module")
def scans(phantom_factory, tmp_path_factory):
    """Five adome phantoms of different sizes and one corrupt file, with their labels."""
    root = tmp_path_factory.mktemp("scans")
    images, labels = root / "images", root / "labels"
    images.mkdir(), labels.mkdir()
    for n, shape in enumerate([(40, 36, 12), (48, 40, 16), (36, 36, 10), (44, 40, 14), (40, 40, 8)]):
        source = phantom_factory("adome", cases=1, seed=20 + n, shape=shape)
        shutil.copy(next((source / "Image").iterdir()), images / f"Case_{n:05d}_0000.nii.gz")
        shutil.copy(next((source / "Mask").iterdir()), labels / f"Case_{n:05d}.nii.gz")
    (images / "Case_00099_0000.nii.gz").write_bytes(b"\x1f\x8b truncated " * 10)
    shutil.copy(labels / "Case_00000.nii.gz", labels / "Case_00099.nii.gz")  # it fails reading, not listing
    adapter = acting_adapter(root / "adapter_best")
    return images, labels, adapter


def infer_command(scans, out, processes=1):
    images, labels, adapter = scans
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "cobot_med", "infer", "--config", "adome", "--input", str(images), "--output", str(out),
            "--adapter", str(adapter), "--labels", str(labels), "--device", "cpu", "--batch-size", "4"]


def run(command, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every process one thread, the single run too: same arithmetic
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def nifti_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())  # the NIfTI itself (the gzip header carries a time stamp)


def test_two_processes_give_what_one_gives(scans, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = run(infer_command(scans, one), tmp_path)
    double = run(infer_command(scans, two, processes=2), tmp_path)
    for result in (single, double):
        assert result.returncode != 0, result.stderr[-2000:]  # the corrupt case fails the job
        assert "Case_00099_0000" in result.stdout + result.stderr
    segs = sorted(p.name for p in one.glob("*_seg.nii.gz"))
    assert len(segs) == 5 and segs == sorted(p.name for p in two.glob("*_seg.nii.gz"))
    for name in segs:
        assert nifti_bytes(one / name) == nifti_bytes(two / name), name
    assert json.loads((one / "metrics.json").read_text())["mean"] == json.loads((two / "metrics.json").read_text())["mean"]
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (one, two)]
    assert [(c["case_id"], c["status"]) for c in summaries[0]["cases"]] == \
           [(c["case_id"], c["status"]) for c in summaries[1]["cases"]]
    assert summaries[1]["processes"] == 2 and summaries[0]["processes"] == 1
    failed = [c for c in summaries[1]["cases"] if c["status"] == "failed"]
    assert [c["case_id"] for c in failed] == ["Case_00099_0000"] and "unreadable" in failed[0]["reason"]


def process_with_rank(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` among ``parent``'s descendants."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if ppid == parent or _descends(ppid, parent):
                return int(entry.name)
    return None


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return False


def _segmentations(out):
    """The finished segmentations of an output folder: a killed writer's temporary file (``.tmp-*``, hidden,
    never renamed) is not one; pathlib's ``*`` matches hidden names too."""
    return [p for p in out.glob("*_seg.nii.gz") if not p.name.startswith(".")]


def test_a_killed_process_loses_only_its_case_in_flight(scans, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(infer_command(scans, out, processes=2), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    victim = None
    while time.time() < deadline and launcher.poll() is None:
        if len(_segmentations(out)) >= 1:
            victim = process_with_rank(launcher.pid, 1)
            if victim:
                break
        time.sleep(0.1)
    assert victim, "the job should have been running with a second process"
    os.kill(victim, signal.SIGKILL)
    launcher.wait(timeout=300)
    assert launcher.returncode != 0
    before = {p.name: p.stat().st_mtime_ns for p in _segmentations(out)}
    assert 1 <= len(before) < 5
    import nibabel as nib

    for name in before:  # a half-written file never has the final name: every segmentation there is whole
        assert nib.load(str(out / name)).get_fdata().shape == nib.load(str(out / name)).shape

    again = run(infer_command(scans, out), tmp_path)  # the same command, one process
    assert "Case_00099_0000" in again.stdout + again.stderr
    after = {p.name: p.stat().st_mtime_ns for p in _segmentations(out)}
    assert len(after) == 5
    assert all(after[name] == stamp for name, stamp in before.items())  # nothing done twice
    summary = json.loads((out / "summary.json").read_text())
    statuses = {c["case_id"]: c["status"] for c in summary["cases"]}
    assert sum(s == "skipped" for s in statuses.values()) == len(before)
    assert sum(s == "done" for s in statuses.values()) == 5 - len(before)
    assert len(json.loads((out / "metrics.json").read_text())["cases"]) == 5
    assert not list(out.glob(".tmp-*"))  # the killed writer's temporary file went with the rerun
