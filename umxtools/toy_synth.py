"""The toy dataset's synthesisers: a song plan (tempo, key, chords) and the four stems drawn from it.

:func:`umxtools.toy.synthesize_track` calls these and sets the stems' loudness; the stems are
described in :mod:`umxtools.toy`. Audio is ``(nb_channels, nb_samples)`` float64 here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NB_CHANNELS = 2

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
