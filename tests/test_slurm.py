"""The bin/ scripts on a real local Slurm (bin/slurm-local): arrays, dependencies, merges.

Skipped, with the reason, only where Slurm is not installed and cannot be started here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest

from tests.conftest import REPO

BIN = REPO / "bin"


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (make slurm installs it through apt: slurm-wlm, munge)")
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        started = subprocess.run([str(BIN / "slurm-local"), "start"], capture_output=True, text=True)
        if started.returncode != 0:
            pytest.skip(f"the local Slurm cluster did not start: {started.stderr.strip()[-300:]}")
    return True


def _env(tmp_path: Path) -> dict:
    # jobs run the same umxtools as the tests, from this checkout
    return {**os.environ, "UMX_BIN": str(BIN), "PYTHONPATH": str(REPO)}


def _sbatch(args: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _datasets(path: Path) -> dict[str, bytes]:
    out = {}
    with h5py.File(path, "r") as f:
        f["tracks"].visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes()) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_cache_array_and_merge_equal_the_single_build(slurm, toy_root, toy_cache, tmp_path):
    env = _env(tmp_path)
    (tmp_path / "logs").mkdir()
    out = tmp_path / "train.h5"
    array = _sbatch(["--array=0-2", str(BIN / "cache.sbatch"), str(out), "musdb", str(toy_root), "--is-wav", "--split", "all"],
                    tmp_path, env)
    _sbatch(["--wait", f"--dependency=afterok:{array}", str(BIN / "merge.sbatch"), str(out), "3"], tmp_path, env)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert out.exists(), logs
    assert not list(tmp_path.glob("train.shard-*")), "the merge removes its shards"
    single, merged = _datasets(toy_cache), _datasets(out)
    assert single.keys() == merged.keys() and all(single[k] == merged[k] for k in single)


def test_shard_scripts_outside_slurm(toy_root, tmp_path):
    env = {**_env(tmp_path), "SHARD": "3/2"}
    r = subprocess.run([str(BIN / "cache"), str(tmp_path / "x.h5"), "musdb", str(toy_root), "--is-wav", "--split", "all"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["umxtools: error: shard '3/2': need 0 <= K < N"]
    r = subprocess.run([str(BIN / "merge-cache"), str(tmp_path / "x.h5"), "2"], capture_output=True, text=True, env=env)
    shard0 = tmp_path / "x.shard-0-of-2.h5"
    assert r.returncode == 1 and r.stderr.startswith(f"umxtools: error: {shard0}: missing shard 0/2")
