"""``umxtools cache module``: the example dataset classes, the stored STFT against torch.stft, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from tests.conftest import REPO, error_line
from umxtools.cache import open_cache
from umxtools.cli import cli
from umxtools.errors import StaleCacheError

EXAMPLE = REPO / "examples" / "template_dataset.py"
SINE = f"{EXAMPLE}:SineDataset"
SR = 44100
N_FFT, N_HOP = 4096, 1024
SOURCES = ("vocals", "drums", "bass", "other")
# the cache under test: 3 tracks of 2 s, so nb_frames = 1 + (88200 - 4096) // 1024 = 83
SINE_ARGS = {"tracks": 3, "seconds": 2.0, "seed": 5}
NB_SAMPLES = 88200
NB_FRAMES = 83

# test-only dataset classes, written to a file per test session
BAD_DATASETS = '''
import numpy as np


class ListDataset:
    """__getitem__ returns a list, not a mapping."""

    sample_rate = 44100

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return [np.zeros((2, 8192), np.float32)]


class NaNDataset:
    """Item 0 holds a NaN sample."""

    sample_rate = 44100
    sources = ["vocals"]

    def __len__(self):
        return 2

    def __getitem__(self, index):
        audio = np.zeros((2, 8192), np.float32)
        audio[1, 100] = np.nan
        return {"vocals": audio}
'''


def load_example():
    """The example module, imported independently of umxtools' own loader."""
    spec = importlib.util.spec_from_file_location("template_dataset_under_test", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invoke(*args: str) -> str:
    """Run ``umxtools ARGS`` through Click's runner; returns stdout, fails on a non-zero exit."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def arg_flags(args: dict) -> list[str]:
    return [x for key, value in args.items() for x in ("--arg", f"{key}={json.dumps(value)}")]


def reference_stft(wave: np.ndarray) -> torch.Tensor:
    """``(channels, samples)`` -> ``(channels, bins, frames)`` complex: open-unmix's training STFT."""
    return torch.stft(torch.from_numpy(wave), n_fft=N_FFT, hop_length=N_HOP, window=torch.hann_window(N_FFT),
                      center=False, return_complex=True)


def assert_stored_stft(stored: np.ndarray, wave: np.ndarray) -> None:
    """``stored`` ``(frames, channels, 2, bins)`` float16 is the STFT of ``wave`` up to float16 rounding."""
    ref = reference_stft(wave)  # (channels, bins, frames)
    expected = torch.stack([ref.real, ref.imag], dim=0).permute(3, 1, 0, 2).numpy()  # (frames, channels, 2, bins)
    assert stored.shape == expected.shape
    assert stored.dtype == np.float16
    # float16 keeps 11 significant bits (relative rounding error <= 2**-11); atol covers subnormals
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def sine_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("module") / "sines.h5"
    assert invoke("cache", "module", SINE, *arg_flags(SINE_ARGS), "-o", out, "-q").strip() == str(out)
    return out


@pytest.fixture(scope="module")
def sine_items() -> list[dict[str, np.ndarray]]:
    dataset = load_example().SineDataset(**SINE_ARGS)
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def bad_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "bad_datasets.py"
    path.write_text(BAD_DATASETS)
    return path


def test_sine_cache_tracks_and_sources(sine_cache: Path) -> None:
    meta = open_cache(sine_cache)
    assert [t.name for t in meta.tracks] == ["sine-5-000", "sine-5-001", "sine-5-002"]
    assert [t.key for t in meta.tracks] == ["00000", "00001", "00002"]
    assert meta.sources == SOURCES
    assert meta.nb_channels == 2
    for t in meta.tracks:
        # no "mixture" in the items: umxtools sums the sources and stores the sum first
        assert t.roles == ("mixture", *SOURCES)
        assert (t.nb_samples, t.nb_frames) == (NB_SAMPLES, NB_FRAMES)
    # --arg values arrive JSON-parsed: 3 and 5 as ints, 2.0 as a float
    dataset = json.loads(meta.attrs["dataset"])
    assert dataset == {"kind": "module", "spec": SINE, "args": SINE_ARGS, "additive": True}
    assert isinstance(dataset["args"]["seconds"], float)


def test_stored_stft_is_torch_stft_of_the_items(sine_cache: Path, sine_items) -> None:
    with h5py.File(sine_cache, "r") as f:
        for i, item in enumerate(sine_items):
            g = f[f"tracks/{i:05d}"]
            mixture = np.sum(list(item.values()), axis=0, dtype=np.float32)  # (channels, samples)
            for role, wave in {"mixture": mixture, **item}.items():
                assert_stored_stft(g[f"stft/{role}"][()], wave)
                np.testing.assert_array_equal(g[f"wave/{role}"][()], wave)


def test_statistics_match_the_items(sine_cache: Path, sine_items) -> None:
    """Whole-cache stats: per-bin mean and population std of the channel-mean magnitude."""
    for role in ("mixture", "vocals"):
        waves = [np.sum(list(it.values()), axis=0, dtype=np.float32) if role == "mixture" else it[role] for it in sine_items]
        mags = torch.cat([reference_stft(w).abs().mean(dim=0).T for w in waves]).double().numpy()  # (frames, bins)
        std = mags.std(axis=0)
        mean, stored_std = open_cache(sine_cache).statistics(role)
        np.testing.assert_allclose(mean, mags.mean(axis=0), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(stored_std, np.maximum(std, 1e-4 * std.max()), rtol=1e-5, atol=1e-9)
        with h5py.File(sine_cache, "r") as f:
            assert f[f"stats/{role}"].attrs["frames"] == 3 * NB_FRAMES


def test_mono_items_are_stored_stereo(tmp_path: Path) -> None:
    args = {"tracks": 1, "seconds": 1.0, "channels": 1, "sample_rate": 22050, "sources": ["vocals", "bass"]}
    out = tmp_path / "mono.h5"
    invoke("cache", "module", SINE, *arg_flags(args), "--sample-rate", 22050, "-o", out, "-q")
    item = load_example().SineDataset(**args)[0]
    meta = open_cache(out)
    assert meta.sources == ("vocals", "bass")
    assert meta.settings.sample_rate == 22050
    with h5py.File(out, "r") as f:
        for role in ("vocals", "bass"):
            assert item[role].shape == (1, 22050)
            stereo = np.repeat(item[role], 2, axis=0)  # (2, samples): mono duplicated
            np.testing.assert_array_equal(f[f"tracks/00000/wave/{role}"][()], stereo)
            assert_stored_stft(f[f"tracks/00000/stft/{role}"][()], stereo)


def test_stem_folder_dataset(tmp_path: Path) -> None:
    """Folder names become track names; a mixture file is stored as given, else the sum."""
    rng = np.random.default_rng(0)
    root = tmp_path / "stems"
    written = {}
    for name, with_mixture in (("song_a", True), ("song_b", False)):
        folder = root / name
        folder.mkdir(parents=True)
        vocals = (0.1 * rng.standard_normal((round(1.5 * SR), 2))).astype(np.float32)  # (samples, channels)
        bass = (0.1 * rng.standard_normal(round(1.5 * SR))).astype(np.float32)  # (samples,) mono
        sf.write(folder / "vocals.wav", vocals, SR, subtype="FLOAT")
        sf.write(folder / "bass.wav", bass, SR, subtype="FLOAT")
        files = {"vocals": vocals.T, "bass": np.stack([bass, bass])}  # (channels, samples)
        if with_mixture:
            mixture = 0.5 * (vocals + bass[:, None])  # deliberately not the sum
            sf.write(folder / "mixture.wav", mixture, SR, subtype="FLOAT")
            files["mixture"] = mixture.T
        written[name] = files
    (root / ".hidden").mkdir()
    out = tmp_path / "stems.h5"
    invoke("cache", "module", f"{EXAMPLE}:StemFolderDataset", "--arg", f"root={root}", "--arg", "sources=vocals,bass",
           "--arg", "max_seconds=1", "-o", out, "-q")
    meta = open_cache(out)
    assert [t.name for t in meta.tracks] == ["song_a", "song_b"]
    assert meta.sources == ("vocals", "bass")
    with h5py.File(out, "r") as f:
        for i, t in enumerate(meta.tracks):
            assert t.nb_samples == SR  # max_seconds=1 cut the 1.5 s files
            files = {role: wave[:, :SR] for role, wave in written[t.name].items()}
            if "mixture" not in files:
                files["mixture"] = files["vocals"] + files["bass"]
            for role, wave in files.items():
                np.testing.assert_allclose(f[f"tracks/{i:05d}/wave/{role}"][()], wave, rtol=0, atol=1e-7)
            assert_stored_stft(f[f"tracks/{i:05d}/stft/mixture"][()], files["mixture"])


def test_editing_the_module_marks_the_cache_stale(tmp_path: Path) -> None:
    """The module file is each track's recorded input (the class's own data files are not)."""
    module = tmp_path / "my_dataset.py"
    module.write_text(EXAMPLE.read_text())
    out = tmp_path / "copy.h5"
    invoke("cache", "module", f"{module}:SineDataset", "--arg", "tracks=1", "--arg", "seconds=0.5", "-o", out, "-q")
    assert json.loads(h5py.File(out, "r")["tracks/00000"].attrs["inputs"])[0]["path"] == str(module.resolve())
    open_cache(out)
    module.write_text(module.read_text() + "\n# edited\n")
    with pytest.raises(StaleCacheError):
        open_cache(out)


@pytest.mark.parametrize(
    "spec, args, expected",
    [
        ("{tmp}/missing.py:Foo", [], "{tmp}/missing.py: no such file"),
        ("{example}:NoSuchClass", [], "{example}: has no class 'NoSuchClass'"),
        ("{bad}:ListDataset", [], "{bad}:ListDataset[0]: __getitem__ must return a mapping of source name to audio, got list"),
        ("{bad}:NaNDataset", ["-q"], "{bad}:NaNDataset[0]: vocals: contains NaN or infinite samples"),
        ("{example}:SineDataset", ["--arg", "tracks=0"], "tracks=0: need at least one track"),
        ("{example}:SineDataset", ["--arg", "seconds=0.5", "--arg", "sample_rate=22050", "-q"],
         "{example}:SineDataset[0]: sample rate 22050 Hz, expected 44100 Hz (pass --resample to convert)"),
        ("{example}:StemFolderDataset", ["--arg", "root={tmp}/nowhere"], "{tmp}/nowhere: no such dataset folder"),
    ],
    ids=["missing-file", "missing-class", "not-a-mapping", "nan", "bad-value", "sample-rate", "missing-root"],
)
def test_errors_are_one_line(run_cli, tmp_path: Path, bad_module: Path, spec: str, args: list[str], expected: str) -> None:
    # errors raised inside the build pass -q: without it the progress bar leaves its own stderr line
    names = {"tmp": tmp_path, "example": EXAMPLE, "bad": bad_module}
    out = tmp_path / "out.h5"
    result = run_cli("cache", "module", spec.format(**names), *(a.format(**names) for a in args), "-o", out)
    assert result.code == 1
    assert error_line(result) == "umxtools: error: " + expected.format(**names)
    assert not out.exists()


def test_unknown_constructor_argument(run_cli, tmp_path: Path) -> None:
    result = run_cli("cache", "module", SINE, "--arg", "colour=1", "-o", tmp_path / "out.h5")
    assert result.code == 1
    assert error_line(result).startswith(f"umxtools: error: {SINE}: cannot construct with {{'colour': 1}} (")


def test_arg_without_equals_is_a_usage_error(run_cli, tmp_path: Path) -> None:
    result = run_cli("cache", "module", SINE, "--arg", "tracks", "-o", tmp_path / "out.h5")
    assert result.code == 2
    # one line, as every error, not Click's usage block
    assert result.err.strip().splitlines() == [
        "umxtools: error: Invalid value for --arg: 'tracks' is not KEY=VALUE (see 'umxtools cache module --help')"]


def test_python_dash_m_reports_one_line(tmp_path: Path, bad_module: Path) -> None:
    """The real entry point: exit status 1 and exactly one stderr line, no traceback."""
    out = tmp_path / "out.h5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "umxtools", "cache", "module", f"{bad_module}:NaNDataset", "-o", str(out), "-q"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"umxtools: error: {bad_module}:NaNDataset[0]: vocals: contains NaN or infinite samples"]


def test_failures_inside_user_code_are_one_line(run_cli, tmp_path: Path) -> None:
    """Whatever the user's module raises is reported with the spec, never as a traceback."""
    broken = tmp_path / "musdb.py"  # named like a real package: must not shadow it
    broken.write_text("def oops(:\n")
    r = run_cli("cache", "module", f"{broken}:X", "-o", tmp_path / "a.h5")
    assert error_line(r).startswith(f"umxtools: error: {broken}: cannot import (SyntaxError: ")
    import musdb

    assert hasattr(musdb, "DB")
    raising = tmp_path / "raising.py"
    raising.write_text(
        "class Ctor:\n    sample_rate = 44100\n    def __init__(self):\n        open('/nonexistent/file')\n"
        "class Item:\n    sample_rate = 44100\n    def __len__(self):\n        return 1\n"
        "    def __getitem__(self, i):\n        raise KeyError('boom')\n"
    )
    r = run_cli("cache", "module", f"{raising}:Ctor", "-o", tmp_path / "b.h5")
    assert error_line(r).startswith(f"umxtools: error: {raising}:Ctor: constructor failed: FileNotFoundError: ")
    r = run_cli("cache", "module", f"{raising}:Item", "-o", tmp_path / "c.h5")
    assert error_line(r) == f"umxtools: error: {raising}:Item[0]: __getitem__ failed: KeyError: 'boom'"
    assert not any(tmp_path.glob("*.h5"))
