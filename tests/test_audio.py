"""umxtools.audio: soundfile reads (whole and frame ranges), ffmpeg path, mono/stereo, resampling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from umxtools import audio
from umxtools.errors import AudioError
from tests.conftest import SAMPLE, need_shared


def _write(path, data, rate=44100, subtype="FLOAT"):
    sf.write(path, np.asarray(data).T, rate, subtype=subtype)
    return path


@pytest.fixture
def stereo(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((2, 5000)) * 0.1).astype(np.float32)
    return _write(tmp_path / "s.wav", data), data


def test_read_whole_and_range(stereo):
    path, data = stereo
    got, rate = audio.read(path)
    assert rate == 44100 and got.dtype == np.float32 and got.shape == (2, 5000)
    np.testing.assert_array_equal(got, data)
    part, _ = audio.read(path, start=1234, frames=100)
    np.testing.assert_array_equal(part, data[:, 1234:1334])


def test_info(stereo):
    path, _ = stereo
    meta = audio.info(path)
    assert (meta.sample_rate, meta.frames, meta.channels) == (44100, 5000, 2)


def test_mono_is_duplicated(tmp_path):
    mono = np.linspace(-0.5, 0.5, 300, dtype=np.float32)[None]
    got, _ = audio.read(_write(tmp_path / "m.wav", mono))
    assert got.shape == (2, 300)
    np.testing.assert_array_equal(got[0], got[1])


def test_resampling_warns_and_keeps_a_sine(tmp_path):
    t = np.arange(22050) / 22050
    sine = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None].repeat(2, 0)
    path = _write(tmp_path / "lo.wav", sine, rate=22050)
    with pytest.warns(UserWarning, match="resampling from 22050 Hz to 44100 Hz"):
        got, rate = audio.read(path, sample_rate=44100)
    assert rate == 44100 and got.shape == (2, 44100)
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100)
    assert np.max(np.abs(got[0, 1000:-1000] - ref[1000:-1000])) < 1e-3


def test_write_is_atomic_and_roundtrips(tmp_path, stereo):
    _, data = stereo
    out = audio.write(tmp_path / "sub" / "o.wav", data, 44100)
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0].T, data)
    assert [p.name for p in out.parent.iterdir()] == ["o.wav"]


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("empty", "empty file"),
    ("text", "not a readable audio file"),
    ("nan", "contains NaN or infinite samples"),
    ("zero_frames", "no audio samples"),
    ("channels", "has 3 channels"),
])
def test_bad_audio(tmp_path, case, message):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is not audio\n" * 10)
    elif case == "nan":
        data = np.zeros((2, 100), np.float32)
        data[1, 50] = np.nan
        _write(path, data)
    elif case == "zero_frames":
        _write(path, np.zeros((2, 0), np.float32))
    elif case == "channels":
        _write(path, np.zeros((3, 100), np.float32))
    with pytest.raises(AudioError) as err:
        audio.read(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_stem_mp4_through_ffmpeg_matches_hq_wav():
    """The sample's README: musdb's .stem.mp4 and its HQ wavs hold the same samples."""
    stem = need_shared(SAMPLE / "stems" / "train" / "Music Delta - 80s Rock.stem.mp4")
    hq = SAMPLE / "hq" / "train" / "Music Delta - 80s Rock"
    stems, rate = audio.read_stems(stem)
    assert rate == 44100 and stems.shape[:2] == (5, 2)
    for i, name in enumerate(["mixture", "drums", "bass", "other", "vocals"]):
        wav, _ = audio.read(hq / f"{name}.wav")
        n = min(wav.shape[1], stems.shape[2])
        assert abs(wav.shape[1] - stems.shape[2]) < 2048
        np.testing.assert_array_equal(stems[i, :, :n], wav[:, :n])
    first, _ = audio.read(stem)
    np.testing.assert_allclose(first, stems[0], atol=1e-6)
