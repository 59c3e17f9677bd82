"""The command line: entry points, one-line errors, --debug, toy data, cache info."""

from __future__ import annotations

import subprocess
import sys

import soundfile as sf

from tests.conftest import error_line


def test_module_and_console_entry_points():
    for cmd in ([sys.executable, "-m", "umxtools", "--version"], ["umxtools", "--version"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("umxtools, version "), r


def test_error_is_one_line_and_debug_shows_traceback(tmp_path):
    cmd = [sys.executable, "-m", "umxtools", "cache", "info", str(tmp_path / "missing.h5")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"umxtools: error: {tmp_path / 'missing.h5'}: no such cache file (made by: umxtools cache musdb|folder|module SOURCE -o PATH)\n"
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "CacheError" in r.stderr


def test_wrong_flag_is_a_usage_error(run_cli, tmp_path):
    r = run_cli("cache", "musdb", tmp_path, "--no-such-flag", "-o", tmp_path / "x.h5")
    assert r.code == 2 and "No such option '--no-such-flag'" in r.err
    r = run_cli("cache", "musdb", tmp_path, "--dtype", "int8", "-o", tmp_path / "x.h5")
    assert r.code == 2 and "'int8' is not one of 'float16', 'float32'" in r.err


def test_toy_command_writes_the_layout(run_cli, tmp_path):
    r = run_cli("toy", tmp_path / "t", "--tracks", "2", "--test-tracks", "1", "--seconds", "1.5", "--seed", "3")
    assert r.code == 0 and r.out.strip() == str(tmp_path / "t")
    names = sorted(p.relative_to(tmp_path / "t").as_posix() for p in (tmp_path / "t").glob("*/*"))
    assert names == ["test/toy_002", "train/toy_000", "train/toy_001"]
    assert sf.info(tmp_path / "t" / "train" / "toy_000" / "mixture.wav").frames == 66150


def test_cache_info_table(run_cli, toy_cache):
    r = run_cli("cache", "info", toy_cache)
    assert r.code == 0
    for text in ("tracks", "vocals, drums, bass, other", "n_fft 4096, hop 1024, center False", "GB per hour of audio"):
        assert text in r.out


def test_missing_dataset_root(run_cli, tmp_path):
    r = run_cli("cache", "folder", tmp_path / "none", "--layout", "trackfolder", "-o", tmp_path / "x.h5")
    assert error_line(r) == f"umxtools: error: {tmp_path / 'none'}: no such dataset folder"
