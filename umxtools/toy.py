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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from umxtools import fileio
from umxtools.errors import OutputError, UsageError

STEMS: tuple[str, ...] = ("vocals", "drums", "bass", "other")
MIXTURE = "mixture"
NB_CHANNELS = 2

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

_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)

# (centre Hz, bandwidth Hz, gain) of the first three formants of a few vowels, after the
# classic Peterson & Barney (1952) averages; they give the vocal stem a speech-like envelope
# that is unlike the flat saw spectrum of the chords.
_VOWELS: tuple[tuple[tuple[float, float, float], ...], ...] = (
    ((730.0, 90.0, 1.0), (1090.0, 110.0, 0.5), (2440.0, 160.0, 0.25)),  # a
    ((530.0, 80.0, 1.0), (1840.0, 100.0, 0.5), (2480.0, 160.0, 0.25)),  # e
    ((270.0, 60.0, 1.0), (2290.0, 100.0, 0.4), (3010.0, 180.0, 0.25)),  # i
    ((570.0, 80.0, 1.0), (840.0, 90.0, 0.6), (2410.0, 160.0, 0.2)),  # o
    ((300.0, 60.0, 1.0), (870.0, 90.0, 0.4), (2240.0, 160.0, 0.2)),  # u
)


@dataclass(frozen=True)
class _Song:
    """The musical plan shared by all four stems of one track."""

    tempo: float  # beats per minute
    tonic: int  # pitch class, 0 = C
    scale: tuple[int, ...]  # semitones above the tonic, 7 degrees
    chords: tuple[int, ...]  # scale degree (0-based) of each chord's root, in order
    bars_per_chord: int
    sevenths: bool

    @property
    def beat_s(self) -> float:
        return 60.0 / self.tempo

    @property
    def chord_s(self) -> float:
        return 4 * self.beat_s * self.bars_per_chord

    def chord_at(self, t: float) -> int:
        """Scale degree of the chord sounding at time ``t`` seconds."""
        return self.chords[min(int(t // self.chord_s), len(self.chords) - 1)]

    def pitch_class(self, degree: int) -> int:
        return (self.tonic + self.scale[degree % 7]) % 12

    def chord_pitch_classes(self, degree: int) -> list[int]:
        """Stacked thirds on ``degree``: a triad, or a seventh chord for songs that use them."""
        return [self.pitch_class(degree + 2 * i) for i in range(4 if self.sevenths else 3)]

    def scale_notes(self, low: int, high: int) -> list[int]:
        """MIDI notes of the key between ``low`` and ``high`` inclusive."""
        degrees = {(self.tonic + s) % 12 for s in self.scale}
        return [m for m in range(low, high + 1) if m % 12 in degrees]


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


# --- the song ---------------------------------------------------------------------------------


def _plan_song(rng: np.random.Generator, seconds: float) -> _Song:
    tempo = float(rng.uniform(90.0, 140.0))
    bars_per_chord = int(rng.choice([1, 2]))
    nb_chords = math.ceil(seconds / (4 * 60.0 / tempo * bars_per_chord))
    # Start on the tonic, then wander over the common pop degrees (ii, IV, V, vi) without
    # repeating a chord, so every chord change is audible in bass and chords.
    chords = [0]
    while len(chords) < nb_chords:
        chords.append(int(rng.choice([d for d in (0, 1, 3, 4, 5) if d != chords[-1]])))
    return _Song(
        tempo=tempo,
        tonic=int(rng.integers(12)),
        scale=_MINOR if rng.random() < 0.5 else _MAJOR,
        chords=tuple(chords),
        bars_per_chord=bars_per_chord,
        sevenths=bool(rng.random() < 0.5),
    )


# --- building blocks --------------------------------------------------------------------------


def _midi_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _harmonics(
    freq: np.ndarray, amps: np.ndarray, sample_rate: int, phase0: float = 0.0
) -> np.ndarray:
    """Sum of partials ``k * freq`` weighted by ``amps[k - 1]``.

    freq: (nb_samples,) instantaneous fundamental in Hz; amps: (nb_partials,).
    Returns (nb_samples,) float32.
    """
    cycles = np.cumsum(freq / sample_rate)  # (nb_samples,) float64, so long notes keep their pitch
    # Wrapped to one cycle, float32 is exact enough for audio and its sin() is ~10x faster here.
    phase = (2 * np.pi * (cycles - np.floor(cycles)) + phase0).astype(np.float32)
    # Partials near Nyquist would alias into the low band and blur the stems' spectral identity.
    nb_partials = min(len(amps), int(0.45 * sample_rate / float(np.max(freq))))
    # sin(k x) = 2 cos(x) sin((k-1) x) - sin((k-2) x): one multiply-add per partial instead of a
    # sin() call, which dominated generation time; the rounding error grows only linearly in k.
    two_cos = 2 * np.cos(phase)
    previous, current = np.zeros_like(phase), np.sin(phase)
    out = amps[0] * current
    scratch = np.empty_like(phase)
    for k in range(2, nb_partials + 1):
        # In place: fresh temporaries per partial cost as much again as the arithmetic.
        np.multiply(two_cos, current, out=scratch)
        scratch -= previous
        previous, current, scratch = current, scratch, previous
        np.multiply(current, amps[k - 1], out=scratch)
        out += scratch
    return out


def _fade(nb_samples: int, sample_rate: int, attack_s: float, release_s: float) -> np.ndarray:
    """(nb_samples,) raised-cosine attack and release: no clicks at note edges."""
    env = np.ones(nb_samples)
    nb_attack = min(int(attack_s * sample_rate), nb_samples // 2)
    nb_release = min(int(release_s * sample_rate), nb_samples // 2)
    if nb_attack:
        env[:nb_attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(nb_attack) / nb_attack)
    if nb_release:
        fall = np.arange(1, nb_release + 1) / nb_release
        env[nb_samples - nb_release :] = 0.5 + 0.5 * np.cos(np.pi * fall)
    return env


def _pan_gains(pan: float) -> tuple[float, float]:
    """(left, right) constant-power gains; pan -1 is left, +1 right."""
    theta = (pan + 1) * np.pi / 4
    return math.cos(theta), math.sin(theta)


def _pan(mono: np.ndarray, pan: float) -> np.ndarray:
    """(nb_samples,) -> (2, nb_samples)."""
    left, right = _pan_gains(pan)
    return np.stack([left * mono, right * mono])


def _add_at(out: np.ndarray, start_s: float, sound: np.ndarray, sample_rate: int) -> None:
    """Add ``sound`` (nb_channels, n) into ``out`` (nb_channels, nb_samples) from ``start_s``.

    Whatever runs past the end of ``out`` is cut.
    """
    start = int(round(start_s * sample_rate))
    if start >= out.shape[1]:
        return
    stop = min(out.shape[1], start + sound.shape[1])
    out[:, start:stop] += sound[:, : stop - start]


def _band_noise(
    rng: np.random.Generator, nb_samples: int, sample_rate: int, low_hz: float, high_hz: float
) -> np.ndarray:
    """(nb_samples,) white noise limited to [low_hz, high_hz] by zeroing FFT bins, unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(nb_samples))
    freqs = np.fft.rfftfreq(nb_samples, 1 / sample_rate)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    noise = np.fft.irfft(spectrum, nb_samples)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


# --- stems ------------------------------------------------------------------------------------


def _formant_amps(
    f0: float, vowel: tuple[tuple[float, float, float], ...], nb_harmonics: int
) -> np.ndarray:
    """(nb_harmonics,) amplitudes: a -6 dB/octave source shaped by resonances at the formants."""
    f = f0 * np.arange(1, nb_harmonics + 1)
    envelope = sum(gain / (1 + ((f - centre) / width) ** 2) for centre, width, gain in vowel)
    return (0.05 + envelope) * f0 / f


def _vocals(rng: np.random.Generator, song: _Song, nb_samples: int, sample_rate: int) -> np.ndarray:
    out = np.zeros((NB_CHANNELS, nb_samples))
    seconds = nb_samples / sample_rate
    low = int(rng.integers(52, 60))  # a one-octave range from E3..B3, inside 165-494 Hz
    notes = song.scale_notes(low, low + 12)
    rate_hz = rng.uniform(5.0, 6.0)
    depth = rng.uniform(0.015, 0.03)
    pan = rng.uniform(-0.1, 0.1)
    position = int(rng.integers(len(notes)))
    t = rng.uniform(0.0, 1.0) * song.beat_s
    while t < seconds:
        for _ in range(int(rng.integers(3, 7))):
            # Stepwise motion, as sung melodies mostly move.
            position = int(np.clip(position + rng.choice([-2, -1, 0, 1, 1, 2]), 0, len(notes) - 1))
            duration = song.beat_s * float(rng.choice([0.5, 1.0, 1.0, 1.5, 2.0]))
            nb = int(0.92 * duration * sample_rate)
            time = np.arange(nb) / sample_rate
            f0 = _midi_hz(notes[position])
            # Singers settle on the pitch before the vibrato builds up.
            wobble = np.sin(2 * np.pi * rate_hz * time + rng.uniform(0, 2 * np.pi))
            vibrato = depth * np.minimum(time / 0.25, 1.0) * wobble
            amps = _formant_amps(f0, _VOWELS[int(rng.integers(len(_VOWELS)))], 16)
            tone = _harmonics(f0 * (1 + vibrato), amps, sample_rate)
            tone *= _fade(nb, sample_rate, 0.04, 0.08)
            _add_at(out, t, _pan(tone, pan), sample_rate)
            t += duration
        t += song.beat_s * float(rng.choice([1.0, 1.5, 2.0, 3.0]))  # a breath between phrases
    return out


def _kick(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    time = np.arange(int(0.35 * sample_rate)) / sample_rate
    freq = 50.0 + 70.0 * np.exp(-time / 0.03)  # the pitch drop that makes a kick "thump"
    body = np.sin(2 * np.pi * np.cumsum(freq) / sample_rate) * np.exp(-time / 0.12)
    # The beater click dies within 20 ms; computing its envelope further only underflows exp(),
    # which is slow.
    nb_click = int(0.02 * sample_rate)
    click = _band_noise(rng, nb_click, sample_rate, 1000.0, 5000.0)
    body[:nb_click] += 0.3 * click * np.exp(-time[:nb_click] / 0.003)
    return body


def _snare(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    time = np.arange(int(0.2 * sample_rate)) / sample_rate
    rattle = 0.5 * _band_noise(rng, len(time), sample_rate, 1000.0, 8000.0) * np.exp(-time / 0.05)
    body = 0.6 * np.sin(2 * np.pi * 185.0 * time) * np.exp(-time / 0.04)
    return rattle + body


def _hat(rng: np.random.Generator, sample_rate: int, open_hat: bool) -> np.ndarray:
    time = np.arange(int((0.25 if open_hat else 0.06) * sample_rate)) / sample_rate
    high = min(16000.0, 0.45 * sample_rate)
    decay_s = 0.08 if open_hat else 0.012
    return 0.25 * _band_noise(rng, len(time), sample_rate, 6000.0, high) * np.exp(-time / decay_s)


def _drums(rng: np.random.Generator, song: _Song, nb_samples: int, sample_rate: int) -> np.ndarray:
    out = np.zeros((NB_CHANNELS, nb_samples))
    beat = song.beat_s
    snare_pan = rng.uniform(-0.15, 0.15)
    hat_pan = rng.uniform(0.2, 0.5) * rng.choice([-1.0, 1.0])
    syncopated_kick = rng.random() < 0.5
    sixteenth_hats = song.tempo < 110 and rng.random() < 0.5
    nb_beats = math.ceil(nb_samples / sample_rate / beat)
    hits: list[tuple[float, np.ndarray, float]] = []  # (time in beats, mono hit, pan)
    for n in range(nb_beats):
        if n % 4 in (0, 2):
            hits.append((n, rng.uniform(0.85, 1.0) * _kick(rng, sample_rate), 0.0))
        if n % 4 == 2 and syncopated_kick:
            hits.append((n + 0.5, rng.uniform(0.6, 0.8) * _kick(rng, sample_rate), 0.0))
        if n % 4 in (1, 3):
            hits.append((n, rng.uniform(0.85, 1.0) * _snare(rng, sample_rate), snare_pan))
        for step in (0.0, 0.25, 0.5, 0.75) if sixteenth_hats else (0.0, 0.5):
            accent = 1.0 if step == 0.0 else rng.uniform(0.5, 0.8)
            open_hat = n % 4 == 3 and step == 0.5
            hits.append((n + step, accent * _hat(rng, sample_rate, open_hat), hat_pan))
    for beats, sound, pan in hits:
        # A few ms of timing spread (and the velocities above) keep hits apart, as a drummer's are.
        _add_at(out, beats * beat + rng.uniform(0.0, 0.003), _pan(sound, pan), sample_rate)
    return out


def _bass(rng: np.random.Generator, song: _Song, nb_samples: int, sample_rate: int) -> np.ndarray:
    out = np.zeros((NB_CHANNELS, nb_samples))
    seconds = nb_samples / sample_rate
    step = song.beat_s * float(rng.choice([1.0, 2.0]))
    amps = np.array([1.0, rng.uniform(0.3, 0.6), rng.uniform(0.1, 0.3), rng.uniform(0.05, 0.15)])
    decay_s = rng.uniform(0.3, 0.8)
    t = 0.0
    while t < seconds:
        # Roots in E1..D#2 (41-78 Hz); a fifth above reaches at most 117 Hz.
        midi = 28 + (song.pitch_class(song.chord_at(t)) - 4) % 12
        if t > 0 and rng.random() < 0.25:
            midi += 7
        nb = int(0.9 * step * sample_rate)
        time = np.arange(nb) / sample_rate
        tone = _harmonics(np.full(nb, _midi_hz(midi)), amps, sample_rate)
        tone *= np.exp(-time / decay_s) * _fade(nb, sample_rate, 0.005, 0.03)
        _add_at(out, t, _pan(tone, 0.0), sample_rate)
        t += step
    return out


def _other(rng: np.random.Generator, song: _Song, nb_samples: int, sample_rate: int) -> np.ndarray:
    out = np.zeros((NB_CHANNELS, nb_samples))
    # Saw-like (1/k) partials with a random organ-style emphasis: bright and flat next to the
    # formant-shaped voice.
    nb_partials = 6
    amps = (1.0 / np.arange(1, nb_partials + 1)) * rng.uniform(0.6, 1.0, nb_partials)
    width = rng.uniform(0.3, 0.7)
    attack_s = rng.uniform(0.15, 0.4)
    nb = int(song.chord_s * sample_rate)
    for i, degree in enumerate(song.chords):
        start_s = i * song.chord_s
        if start_s * sample_rate >= nb_samples:
            break
        pitch_classes = song.chord_pitch_classes(degree)
        pans = np.linspace(-width, width, len(pitch_classes))
        envelope = _fade(nb, sample_rate, attack_s, 0.15)
        chord = np.zeros((NB_CHANNELS, nb))
        for pitch_class, pan in zip(pitch_classes, pans):
            f0 = _midi_hz(57 + (pitch_class - 9) % 12)  # A3..G#4 (220-415 Hz)
            gains = _pan_gains(float(pan))
            for channel in range(NB_CHANNELS):
                # A slight detune and phase per channel, like a chorused keyboard: the channels
                # beat differently, which gives width beyond the panning.
                detune = 1 + rng.uniform(-0.002, 0.002)
                phase0 = rng.uniform(0, 2 * np.pi)
                tone = _harmonics(np.full(nb, f0 * detune), amps, sample_rate, phase0)
                chord[channel] += gains[channel] * tone
        _add_at(out, start_s, chord * envelope, sample_rate)
    return out


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
