"""Shared fixtures: the embedded sample data, and helpers to run train_gpt.py as a user would.

The suite runs on pytest-xdist workers (tests/pytest.ini: -n auto); each worker computes with one thread, and the
expensive end-to-end runs are made once per session, whichever worker asks first (`once`)."""
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: two multi-threaded torch processes on a small
    import torch  # machine slow each other down many times over
    torch.set_num_threads(1)


@contextlib.contextmanager
def once(tmp_path_factory, name: str):
    """A folder shared by all workers of this session and a flag: True for the one caller that must fill it (it
    holds the lock meanwhile, so the others wait and then find it filled). Mark it filled by returning normally."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        folder.mkdir(exist_ok=True)
        yield folder, not done.exists()
        done.touch()


@pytest.fixture(scope="session")
def sample_data():
    from data.build_sample import ensure_sample
    return ensure_sample(ROOT)


def run_script(env: dict, tmp: Path, nproc: int = 0, script: str = "train_gpt.py", timeout: int = 600):
    """Run the script (under torchrun when nproc) with SMOKE defaults plus `env`; returns (rc, stdout, stderr, log)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # one thread per process: on a small shared machine oversubscribed threads slow torch down many times over
    full.update({"SMOKE": "1", "LOG_DIR": str(tmp), "RUN_ID": "run", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    full.update({k: str(v) for k, v in env.items()})
    if nproc:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        cmd = [sys.executable, script]
    p = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)
    log_path = Path(full["LOG_DIR"]) / f"{full['RUN_ID']}.txt"
    log = log_path.read_text(encoding="utf-8") if log_path.exists() else ""
    return p.returncode, p.stdout, p.stderr, log


def metric(log: str, line: str, key: str = "val_bpb") -> float:
    m = re.search(rf"^{line} .*\b{key}:([-\d.eE+]+)", log, re.M)
    assert m, f"no '{line} ... {key}:' line in the log"
    return float(m.group(1))


@pytest.fixture(scope="session")
def smoke(sample_data, tmp_path_factory):
    """One real SMOKE run (single process), shared by the tests that read its log and artifact."""
    with once(tmp_path_factory, "smoke") as (tmp, first):
        if first:
            rc, out, err, _ = run_script({}, tmp)
            assert rc == 0, err[-3000:]
            (tmp / "stdout.txt").write_text(out)
    return dict(dir=tmp, log=(tmp / "run.txt").read_text(encoding="utf-8"), stdout=(tmp / "stdout.txt").read_text(),
                artifact=tmp / "run.ptz")


SHORT = {"ITERATIONS": 6, "VAL_MAX_TOKENS": 4096}  # SMOKE, 6 steps, scored on 4,096 tokens


@pytest.fixture(scope="session")
def short_run(sample_data, tmp_path_factory):
    """One real 6-step SMOKE run (SHORT), for the tests that need a whole run's log and artifact, not a trained model."""
    with once(tmp_path_factory, "short") as (tmp, first):
        if first:
            rc, _, err, _ = run_script(SHORT, tmp)
            assert rc == 0, err[-3000:]
    return dict(dir=tmp, log=(tmp / "run.txt").read_text(encoding="utf-8"), artifact=tmp / "run.ptz")
