"""Shared fixtures: a small seeded toy dataset and its cache, the shared real sample, a CLI runner."""

from __future__ import annotations

import os
import shutil
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on the two cores: one thread each, for torch here and for
    # the commands the tests start (OpenMP threads spin-wait on a core the other worker holds, which
    # slows both several-fold). Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
from dataclasses import dataclass
from pathlib import Path

import pytest

from umxtools import cli
from umxtools.cache import CacheOptions, build_cache
from umxtools.datasets import MUSDB_SOURCES, musdb_tracks
from umxtools.toy import make_toy_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "musdb-sample"
COMPAT = SHARED / "fixtures" / "openunmix-compat"
SUPPORT = Path(__file__).resolve().parent / "support"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared material {path} is absent (it lives in ../shared beside the repository)")
    return path


@pytest.fixture
def openunmix(monkeypatch):
    """The reference package, importable through the torchaudio stand-in in tests/support.

    Skips where openunmix is not installed. The stand-in and openunmix's modules are removed from
    sys.modules afterwards so that no other test sees a fake torchaudio.
    """
    monkeypatch.syspath_prepend(str(SUPPORT))
    before = set(sys.modules)
    sys.modules.pop("torchaudio", None)
    try:
        # imported to check that they load; the fixture hands them out through sys.modules
        import openunmix
        import openunmix.transforms
        import openunmix.utils  # noqa: F401  (see above: the import is the check)
    except ImportError as exc:
        pytest.skip(f"the reference openunmix package is not importable ({exc})")
    yield sys.modules["openunmix"]
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("openunmix", "torchaudio"):
            del sys.modules[name]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """4 train + 2 test tracks of 8 s (toy_000..toy_005), seed 0."""
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, tracks=4, seconds=8.0, seed=0, test_tracks=2)
    return root


@pytest.fixture(scope="session")
def toy_cache(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "toy-train.h5"
    refs = musdb_tracks(toy_root, is_wav=True, subsets="train", split=None)
    return build_cache(refs, out, list(MUSDB_SOURCES), CacheOptions(), meta={"kind": "musdb", "additive": True})


@pytest.fixture
def toy_copy(toy_root, tmp_path) -> Path:
    """A private copy of the toy dataset that a test may damage."""
    dst = tmp_path / "toy"
    shutil.copytree(toy_root, dst)
    return dst


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``umxtools ARGS`` in-process through ``cli.main`` (error formatting included)."""

    def run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["umxtools", *map(str, args)])
        cli._State.debug = False
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def error_line(result: Result) -> str:
    """The single stderr line of a failed command (asserts it is a single umxtools error line)."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code != 0, result
    assert len(lines) == 1, result.err
    assert lines[0].startswith("umxtools: error: "), lines[0]
    assert "Traceback" not in result.err
    return lines[0]


def run_with_umask(umask: int, *args) -> Result:
    """``python -m umxtools ARGS`` in a subprocess started with ``umask``, importing this checkout.

    A subprocess because umxtools reads the umask once, at import (fileio's file mode).
    """
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "umxtools", *map(str, args)], capture_output=True, text=True, env=env,
                       preexec_fn=lambda: os.umask(umask), timeout=300, check=False)
    return Result(r.returncode, r.stdout, r.stderr)


def modes(folder: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of every file under ``folder``."""
    import stat

    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models and open-unmix's EM (a Python loop of small
    tensor operations) on a shared 2-core machine, where a second thread spin-waiting for a busy
    core made an LSTM step 10-100x slower and the EM cases 41 s instead of 1.5 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the longest files first: pytest-xdist hands test files to the workers in collection order, so
# these start at once instead of running alone at the end of `make test`
SLOW_FIRST = ("test_family_toy.py", "test_make_musdb.py", "test_slurm.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order
