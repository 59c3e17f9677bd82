"""The synthetic toy dataset: MUSDB18-HQ layout, exact mixtures, determinism, distinct stems."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import error_line
from umxtools import toy
from umxtools.errors import UsageError
from umxtools.toy import STEMS, make_toy_dataset, synthesize_track

SR = 44100
SECONDS = 2.5
NB_SAMPLES = round(SECONDS * SR)
FILES = {f"{name}.wav" for name in (*STEMS, "mixture")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("toy")
    return root, make_toy_dataset(root, tracks=3, seconds=SECONDS, seed=0)


def read(path: Path) -> np.ndarray:
    """(nb_channels, nb_samples) float32."""
    audio, sample_rate = sf.read(path, dtype="float32", always_2d=True)
    assert sample_rate == SR
    return audio.T


def read_track(folder: Path) -> dict[str, np.ndarray]:
    return {name: read(folder / f"{name}.wav") for name in (*STEMS, "mixture")}


def spectral_centroid(audio: np.ndarray) -> float:
    """Power-weighted mean frequency in Hz of the channel average."""
    power = np.abs(np.fft.rfft(audio.mean(axis=0).astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(audio.shape[1], 1 / SR)
    return float((power * freqs).sum() / power.sum())


def crest_factor(audio: np.ndarray) -> float:
    return float(np.max(np.abs(audio)) / np.sqrt(np.mean(audio.astype(np.float64) ** 2)))


def test_layout(dataset: tuple[Path, list[Path]]) -> None:
    root, folders = dataset
    # tracks=3 gives the default max(2, 3 // 4) = 2 test tracks, numbered on from the train ones
    expected = [root / "train" / f"toy_00{i}" for i in range(3)] + [root / "test" / f"toy_00{i}" for i in (3, 4)]
    assert folders == expected
    # the two splits, and the marker that lets toy (and only toy) write here again
    assert sorted(p.name for p in root.iterdir()) == [".umxtools.json", "test", "train"]
    marker = json.loads((root / ".umxtools.json").read_text())
    assert marker["command"] == "toy" and marker["arguments"] == {"tracks": 3, "test_tracks": 2, "seconds": SECONDS, "seed": 0,
                                                                   "sample_rate": SR}
    assert sorted(p.name for p in (root / "train").iterdir()) == ["toy_000", "toy_001", "toy_002"]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["toy_003", "toy_004"]
    for folder in folders:
        # exactly the five WAVs: no temporary files left behind
        assert {p.name for p in folder.iterdir()} == FILES
        for name in FILES:
            info = sf.info(folder / name)
            assert (info.samplerate, info.channels, info.frames) == (SR, 2, NB_SAMPLES)
            assert (info.format, info.subtype) == ("WAV", "FLOAT")


def test_default_test_tracks_and_numbering(tmp_path: Path) -> None:
    folders = make_toy_dataset(tmp_path, tracks=8, seconds=0.05)
    assert [f.name for f in folders] == [f"toy_{i:03d}" for i in range(10)]
    assert [f.parent.name for f in folders] == ["train"] * 8 + ["test"] * 2
    folders = make_toy_dataset(tmp_path / "b", tracks=1, seconds=0.05, test_tracks=3)
    assert [(f.parent.name, f.name) for f in folders] == [("train", "toy_000")] + [("test", f"toy_00{i}") for i in (1, 2, 3)]


def test_mixture_is_sum_of_stems(dataset: tuple[Path, list[Path]]) -> None:
    for folder in dataset[1]:
        track = read_track(folder)
        total = track["vocals"] + track["drums"] + track["bass"] + track["other"]
        np.testing.assert_allclose(track["mixture"], total, rtol=0, atol=1e-6)


def test_levels(dataset: tuple[Path, list[Path]]) -> None:
    for folder in dataset[1]:
        for name, audio in read_track(folder).items():
            assert audio.shape == (2, NB_SAMPLES)
            assert np.all(np.isfinite(audio)), (folder, name)
            rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
            assert rms > 0.01, f"{folder.name}/{name} is (nearly) silent: rms {rms}"
            assert np.max(np.abs(audio)) < 0.9, (folder, name)


def test_stems_are_distinct(dataset: tuple[Path, list[Path]]) -> None:
    for folder in dataset[1]:
        track = read_track(folder)
        centroids = {name: spectral_centroid(track[name]) for name in STEMS}
        crests = {name: crest_factor(track[name]) for name in STEMS}
        assert centroids["bass"] < 150 < centroids["vocals"], (folder.name, centroids)
        # drums are the most transient: short hits between near-silence
        assert crests["drums"] > 1.5 * max(crests[n] for n in STEMS if n != "drums"), (folder.name, crests)
        # the bass stays in the bass: almost all its energy below 500 Hz (4th harmonic of 117 Hz)
        bass = track["bass"].mean(axis=0).astype(np.float64)
        power = np.abs(np.fft.rfft(bass)) ** 2
        freqs = np.fft.rfftfreq(len(bass), 1 / SR)
        assert power[freqs < 500].sum() > 0.99 * power.sum()


def test_channels_differ(dataset: tuple[Path, list[Path]]) -> None:
    # the training pipeline swaps channels as augmentation, which needs a stereo image
    for folder in dataset[1]:
        track = read_track(folder)
        assert any(not np.array_equal(track[name][0], track[name][1]) for name in STEMS), folder
        assert not np.array_equal(track["mixture"][0], track["mixture"][1]), folder


def test_tracks_differ(dataset: tuple[Path, list[Path]]) -> None:
    mixtures = [read(folder / "mixture.wav") for folder in dataset[1]]
    for i in range(len(mixtures)):
        for j in range(i + 1, len(mixtures)):
            a, b = mixtures[i].astype(np.float64), mixtures[j].astype(np.float64)
            correlation = float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))
            assert abs(correlation) < 0.5, (i, j, correlation)


def strongest_pitch(audio: np.ndarray, hop: int = 441) -> tuple[np.ndarray, np.ndarray]:
    """Log frequency of the strongest partial in 100-4000 Hz and RMS, per 2048-sample frame.

    audio: (nb_samples,). Returns two (nb_frames,) arrays. Zero padding and parabolic
    interpolation of the log magnitude resolve a fraction of a Hz.
    """
    frame, padded = 2048, 32768
    window = np.hanning(frame)
    freqs = np.fft.rfftfreq(padded, 1 / SR)
    outside = (freqs < 100) | (freqs > 4000)
    log_freq, rms = [], []
    for start in range(0, len(audio) - frame, hop):
        segment = audio[start : start + frame] * window
        magnitude = np.abs(np.fft.rfft(segment, padded))
        magnitude[outside] = 0
        i = max(1, int(np.argmax(magnitude)))
        a, b, c = np.log(magnitude[i - 1 : i + 2] + 1e-30)
        offset = 0.5 * (a - c) / (a - 2 * b + c - 1e-30)
        log_freq.append(math.log((i + offset) * SR / padded))
        rms.append(math.sqrt(float(np.mean(segment**2))))
    return np.array(log_freq), np.array(rms)


def vibrato(audio: np.ndarray) -> tuple[float, float]:
    """(median |change of log frequency| per 10 ms, direction changes per second) while voiced."""
    log_freq, rms = strongest_pitch(audio)
    step = np.diff(log_freq)
    voiced = rms > 0.3 * rms.max()
    # within a note: note changes are at least a semitone, a 6 % step
    within = voiced[1:] & voiced[:-1] & (np.abs(step) < 0.02)
    both = within[1:] & within[:-1]
    turns = np.sum((np.sign(step[1:]) != np.sign(step[:-1])) & both)
    return float(np.median(np.abs(step[within]))), float(turns / (both.sum() * 0.01))


def test_vocals_have_breaths_and_vibrato() -> None:
    vocals = synthesize_track(seed=0, index=0, nb_samples=6 * SR, sample_rate=SR)["vocals"]
    assert vocals.shape == (2, 6 * SR) and vocals.dtype == np.float32
    left = vocals[0].astype(np.float64)

    frame = SR // 50  # 20 ms
    energy = np.sqrt((left[: len(left) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1))
    voiced = np.flatnonzero(energy > 1e-4)
    # silent gaps between phrases, not only before the first or after the last
    assert np.sum(energy[voiced[0] : voiced[-1] + 1] <= 1e-4) >= 10

    # The estimator on a steady harmonic tone: the pitch does not move.
    time = np.arange(2 * SR) / SR
    steady = sum(np.sin(2 * np.pi * 220 * k * time) / k for k in range(1, 10))
    assert vibrato(steady)[0] < 1e-4
    # The voice's pitch moves by a few % at 5-6 Hz, so it turns 10-12 times a second.
    slope, turns_per_second = vibrato(left)
    assert slope > 1e-3
    assert 8 < turns_per_second < 14


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_toy_dataset(tmp_path / "a", tracks=1, seconds=1.0, seed=3, test_tracks=1)
    b = make_toy_dataset(tmp_path / "b", tracks=1, seconds=1.0, seed=3, test_tracks=1)
    for folder_a, folder_b in zip(a, b):
        for name in FILES:
            assert (folder_a / name).read_bytes() == (folder_b / name).read_bytes(), name
    # rewriting an existing dataset in place gives the same bytes again
    before = {(f, n): (f / n).read_bytes() for f in a for n in FILES}
    make_toy_dataset(tmp_path / "a", tracks=1, seconds=1.0, seed=3, test_tracks=1)
    assert before == {(f, n): (f / n).read_bytes() for f in a for n in FILES}
    assert {p.name for p in a[0].iterdir()} == FILES
    # libsndfile stamps the write time into the PEAK chunk of float WAVs; two runs within the same
    # second would hide it above, so check the stamp is cleared
    header = (a[0] / "mixture.wav").read_bytes()[:200]
    peak = header.find(b"PEAK")
    assert peak < 0 or header[peak + 12 : peak + 16] == bytes(4)


def test_interrupted_write_leaves_no_wav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = sf.write

    def write_then_fail(file, data, *args, **kwargs) -> None:
        real_write(file, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(toy.sf, "write", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_toy_dataset(tmp_path, tracks=1, seconds=0.1)
    assert list((tmp_path / "train" / "toy_000").iterdir()) == []


def test_different_seed_different_audio(tmp_path: Path) -> None:
    a = make_toy_dataset(tmp_path / "a", tracks=1, seconds=1.0, seed=3, test_tracks=1)
    b = make_toy_dataset(tmp_path / "b", tracks=1, seconds=1.0, seed=4, test_tracks=1)
    for folder_a, folder_b in zip(a, b):
        for name in (*STEMS, "mixture"):
            assert not np.array_equal(read(folder_a / f"{name}.wav"), read(folder_b / f"{name}.wav")), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tracks": 0}, "tracks must be at least 1"),
        ({"tracks": -2}, "tracks must be at least 1"),
        ({"seconds": 0}, "seconds must be a positive number"),
        ({"seconds": -1.0}, "seconds must be a positive number"),
        ({"seconds": float("nan")}, "seconds must be a positive number"),
        ({"seconds": 1e-9}, "shorter than one sample"),
        ({"test_tracks": -1}, "test_tracks must be 0 or more"),
        ({"seed": -1}, "seed must be 0 or more"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make_toy_dataset(tmp_path / "toy", **kwargs)
    assert not (tmp_path / "toy").exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_toy_never_writes_into_a_real_dataset(run_cli, tmp_path: Path) -> None:
    """The accident: `umxtools toy ~/data/musdb18hq` put toy tracks beside the real ones (train/test leakage)."""
    real = tmp_path / "musdb18hq"
    for split, track in (("train", "A Classic Education - NightOwl"), ("test", "Al James - Schoolboy Facination")):
        (real / split / track).mkdir(parents=True)
        for stem in (*STEMS, "mixture"):
            sf.write(real / split / track / f"{stem}.wav", np.zeros((10, 2), np.float32), SR)
    before = _tree(real)
    r = run_cli("toy", real, "--tracks", "1", "--seconds", "0.1")
    assert error_line(r) == (f"umxtools: error: {real}: holds files that 'umxtools toy' did not make (test, ...); "
                             "choose an empty or new folder (-o)")
    assert _tree(real) == before and not (real / ".umxtools.json").exists()


def test_toy_reruns_only_with_the_same_arguments(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "toy"
    assert run_cli("toy", out, "--tracks", "2", "--seconds", "0.1").code == 0
    before = _tree(out)
    r = run_cli("toy", out, "--tracks", "2", "--seconds", "0.1")  # a repeated (or interrupted) run
    assert (r.code, r.out) == (0, f"{out}\n") and _tree(out) == before
    # 8 train tracks over 2: the old test/toy_002 would now also be train/toy_002, the same audio
    r = run_cli("toy", out, "--tracks", "8", "--seconds", "0.1")
    assert error_line(r) == (f"umxtools: error: {out}: holds a toy dataset made with tracks=2, test_tracks=2, seconds=0.1, seed=0, "
                             "sample_rate=44100; choose another folder (its tracks would mix with these)")
    assert _tree(out) == before


@pytest.mark.parametrize("seconds,message", [
    ("0.00001", "seconds=1e-05 is shorter than one sample at 44100 Hz"),
    ("1e9", "seconds must be a positive number of at most 600, got 1000000000.0"),
    ("nan", "seconds must be a positive number of at most 600, got nan"),
])
def test_out_of_range_seconds_are_one_line(run_cli, tmp_path: Path, seconds: str, message: str) -> None:
    r = run_cli("toy", tmp_path / "toy", "--seconds", seconds)
    assert error_line(r) == f"umxtools: error: {message}"
    assert not (tmp_path / "toy").exists()
