"""A synthetic MUSDB18-HQ-style dataset: the embedded default dataset of umxtools.

Every pipeline stage can run, and every test can exercise real separation, without downloading
MUSDB18: :func:`make_toy_dataset` writes ``root/train/<track>/`` and ``root/test/<track>/``
folders in the MUSDB18-HQ layout, each with ``vocals.wav``, ``drums.wav``, ``bass.wav``,
``other.wav`` and ``mixture.wav`` (stereo, 32-bit float WAV). The mixture is the float32 sum of
the four stems, so reading the stems back and adding them reproduces it.

Each track is a short song with its own tempo (90-140 BPM), key (major or minor) and chord
progression, and the four stems are synthesised to be distinct in the ways a separation model
learns from (pitch range, spectral envelope, time structure, stereo image):

- vocals: a voice-like harmonic tone (fundamentals 165-494 Hz, 16 harmonics shaped by vowel
  formants) with 5-6 Hz vibrato, sung in phrases of notes separated by silent breaths, with
  smooth attacks and releases; panned near the centre.
- drums: a kick (decaying sine sweep 120 -> 50 Hz), a snare (band-passed noise with a tonal
  body) and hi-hats (short high-passed noise) on the beat grid; hats and snare off-centre.
- bass: the chord roots (and sometimes fifths) at 41-117 Hz, a plucked tone with a few
  harmonics, one note per beat or per half bar; centred.
- other: sustained 3- or 4-note chords of saw-like partials from 220 Hz up, with slow attacks,
  changing every one or two bars; voices spread across the stereo field and detuned per
  channel, so the channels differ (the training pipeline swaps channels as augmentation).

Audio is kept as ``(nb_channels, nb_samples)`` float arrays throughout; only the WAV writer
transposes to soundfile's ``(nb_samples, nb_channels)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf

from umxtools import fileio
from umxtools.errors import OutputError, UsageError
from umxtools.toy_synth import NB_CHANNELS, _bass, _drums, _other, _plan_song, _vocals

STEMS: tuple[str, ...] = ("vocals", "drums", "bass", "other")
MIXTURE = "mixture"

# Loudness of each stem before the mixture is checked for clipping; each track draws a gain of
# +-3 dB around these so a model cannot rely on a fixed balance between the stems.
_TARGET_RMS: dict[str, float] = {"vocals": 0.07, "drums": 0.05, "bass": 0.07, "other": 0.05}
# The brief for the toy set: mixture peak below 0.9. Normalising to a little less leaves room for
# the float32 rounding of the stem sum.
_MAX_PEAK = 0.85
# Below this rate the hi-hat band (6 kHz and up) would not exist.
_MIN_SAMPLE_RATE = 16000
# A typo (--seconds 80000) fails at once instead of exhausting memory: a track is synthesised
# whole, in float64, several arrays per stem.
MAX_SECONDS = 600.0


def make_toy_dataset(
    root: Path,
    tracks: int = 8,
    seconds: float = 8.0,
    seed: int = 0,
    test_tracks: int | None = None,
    sample_rate: int = 44100,
) -> list[Path]:
    """Write a synthetic dataset in the MUSDB18-HQ layout under ``root``.

    Args:
        root: dataset folder; ``train/`` and ``test/`` are created inside it.
        tracks: number of train tracks (at least 1).
        seconds: length of every track.
        seed: same seed, same bytes; each track draws from its own stream of this seed.
        test_tracks: number of test tracks; defaults to ``max(2, tracks // 4)``.
        sample_rate: of every file, in Hz.

    Returns:
        The track folders, train then test, named ``toy_000``, ``toy_001``, ... numbered
        continuously across both splits. Each holds the four stems and ``mixture.wav``, every
        one ``round(seconds * sample_rate)`` samples of stereo 32-bit float.

    Raises:
        UsageError: an argument out of range.
        OutputError: ``root`` holds files that ``make_toy_dataset`` did not write (a real dataset
            must never get toy tracks beside its own), or a toy dataset made with other arguments.

    ``root`` must be missing, empty, or a toy dataset made before with the same arguments (its
    marker file, :data:`umxtools.fileio.MARKER`, records them); then its files are rewritten with
    the same bytes, so an interrupted run can simply be repeated. Each file is written under a
    temporary name and renamed, so an interrupted run never leaves a partial WAV under a final name.
    """
    if tracks < 1:
        raise UsageError(None, f"tracks must be at least 1, got {tracks}")
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise UsageError(None, f"seconds must be a positive number of at most {MAX_SECONDS:g}, got {seconds}")
    if test_tracks is None:
        test_tracks = max(2, tracks // 4)
    if test_tracks < 0:
        raise UsageError(None, f"test_tracks must be 0 or more, got {test_tracks}")
    if seed < 0:
        raise UsageError(None, f"seed must be 0 or more, got {seed}")
    if sample_rate < _MIN_SAMPLE_RATE:
        raise UsageError(None, f"sample_rate must be at least {_MIN_SAMPLE_RATE} Hz, got {sample_rate}")
    nb_samples = round(seconds * sample_rate)
    if nb_samples < 1:
        raise UsageError(None, f"seconds={seconds} is shorter than one sample at {sample_rate} Hz")

    root = Path(root)
    _claim(root, {"tracks": tracks, "test_tracks": test_tracks, "seconds": seconds, "seed": seed, "sample_rate": sample_rate})
    splits = ["train"] * tracks + ["test"] * test_tracks
    folders = []
    for index, split in enumerate(splits):
        folder = root / split / f"toy_{index:03d}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fileio.output_error(folder, exc) from exc
        stems = synthesize_track(seed, index, nb_samples, sample_rate)
        # Stems before the mixture: a folder whose mixture.wav exists is complete.
        for name in STEMS:
            _write_wav(folder / f"{name}.wav", stems[name], sample_rate)
        _write_wav(folder / f"{MIXTURE}.wav", _mix(stems), sample_rate)
        folders.append(folder)
    return folders


def _claim(root: Path, arguments: dict) -> None:
    """Make ``root`` a toy dataset folder (see :func:`umxtools.fileio.claim_folder`) for ``arguments``.

    A toy folder made with other arguments is refused too: rewriting it would leave the old
    tracks beside the new ones, and with another track count ``train/toy_004`` of the old run
    would be the same audio as ``test/toy_004`` of the new one (tracks depend on seed and index).
    """
    fileio.claim_folder(root, "toy", {"arguments": arguments})
    try:
        made = json.loads((root / fileio.MARKER).read_text()).get("arguments")
    except (OSError, ValueError, AttributeError):
        made = None
    if made != arguments:
        was = ", ".join(f"{k}={v}" for k, v in made.items()) if isinstance(made, dict) else "unknown arguments"
        raise OutputError(root, f"holds a toy dataset made with {was}; choose another folder (its tracks would mix with these)")


def synthesize_track(
    seed: int, index: int, nb_samples: int, sample_rate: int
) -> dict[str, np.ndarray]:
    """The four stems of track ``index`` for ``seed``, each ``(nb_channels, nb_samples)`` float32.

    Their float32 sum, in :data:`STEMS` order, peaks below 0.9.
    """
    # One child stream per part, so changing how one stem is drawn leaves the others' bytes alone,
    # and (seed, index) pairs never share a stream the way seed + index would.
    song_rng, vocals_rng, drums_rng, bass_rng, other_rng, gain_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(6)
    )
    seconds = nb_samples / sample_rate
    song = _plan_song(song_rng, seconds)
    raw = {
        "vocals": _vocals(vocals_rng, song, nb_samples, sample_rate),
        "drums": _drums(drums_rng, song, nb_samples, sample_rate),
        "bass": _bass(bass_rng, song, nb_samples, sample_rate),
        "other": _other(other_rng, song, nb_samples, sample_rate),
    }
    for name in STEMS:
        rms = math.sqrt(float(np.mean(raw[name] ** 2)))
        if rms > 0:
            gain_db = gain_rng.uniform(-3.0, 3.0)
            raw[name] *= _TARGET_RMS[name] * 10 ** (gain_db / 20) / rms
    peak = float(np.max(np.abs(sum(raw[name] for name in STEMS))))
    scale = min(1.0, _MAX_PEAK / peak) if peak > 0 else 1.0
    stems = {name: (raw[name] * scale).astype(np.float32) for name in STEMS}
    assert float(np.max(np.abs(_mix(stems)))) < 0.9
    return stems


def _mix(stems: dict[str, np.ndarray]) -> np.ndarray:
    """Float32 sum of the stems in :data:`STEMS` order: what a reader reproduces from the files."""
    mixture = np.zeros_like(stems[STEMS[0]])
    for name in STEMS:
        mixture += stems[name]
    return mixture


# --- writing ----------------------------------------------------------------------------------


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write ``audio`` (nb_channels, nb_samples) float32 to ``path`` as float WAV, atomically."""
    assert audio.ndim == 2 and audio.shape[0] == NB_CHANNELS, audio.shape
    assert audio.dtype == np.float32, audio.dtype
    with fileio.atomic(path) as tmp:
        # soundfile wants (nb_samples, nb_channels)
        sf.write(tmp, audio.T, sample_rate, subtype="FLOAT", format="WAV")
        _clear_peak_timestamp(tmp)


def _clear_peak_timestamp(path: Path) -> None:
    """Zero the write time that libsndfile stores in the PEAK chunk of float WAVs.

    libsndfile stamps ``time(NULL)`` into that chunk, so two runs a second apart would give
    different bytes for the same seed. The chunk is: id, size, version (4 bytes), timestamp
    (4 bytes), then the peaks.
    """
    with open(path, "r+b") as f:
        header = f.read(12)
        assert header[:4] == b"RIFF" and header[8:12] == b"WAVE", path
        offset = 12
        while True:
            f.seek(offset)
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            chunk_id, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if chunk_id == b"PEAK":
                f.seek(offset + 12)
                f.write(bytes(4))
                return
            if chunk_id == b"data":
                return
            offset += 8 + size + (size & 1)
