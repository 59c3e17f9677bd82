"""Reading, writing and resampling audio.

Audio arrays are numpy ``float32`` of shape ``(channels, samples)`` everywhere in umxtools.

- soundfile is the default backend: WAV/FLAC/OGG/AIFF, with frame-range reads that do not decode
  the whole file (training-free tools such as ``separate --start`` rely on it).
- ``.mp4``/``.m4a``/``.mp3``/``.aac`` go through stempeg's ffmpeg path, the one musdb uses for
  MUSDB18's ``.stem.mp4`` files.
- torchaudio is used only when soundfile cannot read a file and torchaudio imports; it is never
  required.
- Resampling uses soxr (VHQ), never a hand-written filter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from umxtools import fileio
from umxtools.errors import AudioError

FFMPEG_SUFFIXES = (".mp4", ".m4a", ".mp3", ".aac")


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds, without decoding it."""

    sample_rate: int
    frames: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def _is_ffmpeg_file(path: Path) -> bool:
    return path.suffix.lower() in FFMPEG_SUFFIXES


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise AudioError(path, "no such file")
    if path.is_dir():
        raise AudioError(path, "is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file")


def info(path: str | Path) -> AudioInfo:
    """Sample rate, length in frames and channel count of an audio file."""
    path = Path(path)
    _check_exists(path)
    if _is_ffmpeg_file(path):
        stempeg = _import_stempeg(path)
        try:
            meta = stempeg.Info(str(path))
        except Exception as exc:  # stempeg raises bare ffmpeg/ffprobe errors of many kinds
            raise AudioError(path, f"not readable by ffmpeg ({_first_line(exc)})") from exc
        return AudioInfo(int(meta.sample_rate(0)), int(meta.samples(0)), int(meta.channels(0)))
    try:
        meta = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(path, f"not a readable audio file ({_first_line(exc)})") from exc
    return AudioInfo(int(meta.samplerate), int(meta.frames), int(meta.channels))


def read(
    path: str | Path,
    start: int = 0,
    frames: int | None = None,
    sample_rate: int | None = None,
    stereo: bool = True,
) -> tuple[np.ndarray, int]:
    """Read ``frames`` samples from ``start`` (in the file's own rate).

    Returns ``(audio, rate)`` with ``audio`` of shape ``(channels, samples)``, float32. With
    ``stereo`` a mono file is duplicated to two channels (open-unmix's stereo models expect two)
    and more than two channels is an error. With ``sample_rate`` set and different from the
    file's, the audio is resampled with soxr and a warning says so.
    Raises :class:`AudioError` for missing, empty, unreadable or non-finite audio.
    """
    path = Path(path)
    _check_exists(path)
    if _is_ffmpeg_file(path):
        audio, rate = _read_ffmpeg(path, start, frames)
    else:
        audio, rate = _read_soundfile(path, start, frames)
    if audio.shape[1] == 0:
        raise AudioError(path, "no audio samples" if start == 0 else f"no samples after frame {start}")
    if not np.isfinite(audio).all():
        raise AudioError(path, "contains NaN or infinite samples")
    if stereo:
        audio = to_stereo(audio, path)
    if sample_rate is not None and sample_rate != rate:
        warnings.warn(f"{path}: resampling from {rate} Hz to {sample_rate} Hz", stacklevel=2)
        audio = resample(audio, rate, sample_rate)
        rate = sample_rate
    return audio, rate


def _read_soundfile(path: Path, start: int, frames: int | None) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            if start:
                f.seek(min(start, f.frames))
            data = f.read(-1 if frames is None else frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        return _read_torchaudio(path, start, frames, exc)
    return np.ascontiguousarray(data.T), int(rate)


def _read_torchaudio(path: Path, start: int, frames: int | None, cause: Exception) -> tuple[np.ndarray, int]:
    """Last resort for formats soundfile lacks; torchaudio is optional and often absent."""
    try:
        import torchaudio
    except Exception:  # torchaudio missing or built for another torch: both mean "not available"
        raise AudioError(path, f"not a readable audio file ({_first_line(cause)})") from cause
    try:
        wav, rate = torchaudio.load(str(path), frame_offset=start, num_frames=-1 if frames is None else frames)
    except Exception as exc:  # torchaudio's backends raise RuntimeError, OSError and others
        raise AudioError(path, f"not a readable audio file ({_first_line(exc)})") from exc
    return wav.numpy().astype(np.float32, copy=False), int(rate)


def _read_ffmpeg(path: Path, start: int, frames: int | None) -> tuple[np.ndarray, int]:
    stempeg = _import_stempeg(path)
    meta = info(path)
    rate = meta.sample_rate
    try:
        audio, rate = stempeg.read_stems(
            str(path),
            stem_id=0,
            start=start / rate if start else None,
            duration=frames / rate if frames is not None else None,
            dtype=np.float32,
            ffmpeg_format="s16le",  # as musdb decodes: 16-bit PCM, equal to MUSDB18-HQ's wavs
            always_3d=False,
        )
    except Exception as exc:  # ffmpeg failures surface as several exception types
        raise AudioError(path, f"not readable by ffmpeg ({_first_line(exc)})") from exc
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    return np.ascontiguousarray(audio.T), int(rate)


def read_stems(path: str | Path) -> tuple[np.ndarray, int]:
    """All streams of a multi-stream file such as MUSDB18's ``.stem.mp4``.

    Returns ``(stems, rate)`` with ``stems`` of shape ``(streams, channels, samples)``.
    """
    path = Path(path)
    _check_exists(path)
    stempeg = _import_stempeg(path)
    try:
        # 16-bit PCM as musdb asks ffmpeg for: the samples then equal MUSDB18-HQ's wavs exactly
        # (with float output ffmpeg keeps the AAC decoder's unquantised floats)
        stems, rate = stempeg.read_stems(str(path), dtype=np.float32, always_3d=True, ffmpeg_format="s16le")
    except Exception as exc:  # ffmpeg failures surface as several exception types
        raise AudioError(path, f"not readable by ffmpeg ({_first_line(exc)})") from exc
    stems = np.ascontiguousarray(np.asarray(stems, dtype=np.float32).transpose(0, 2, 1))
    if stems.shape[-1] == 0:
        raise AudioError(path, "no audio samples")
    if not np.isfinite(stems).all():
        raise AudioError(path, "contains NaN or infinite samples")
    return stems, int(rate)


def _import_stempeg(path: Path):
    try:
        import stempeg  # it raises at import time unless ffmpeg is installed
    except Exception as exc:
        raise AudioError(path, "reading this format needs ffmpeg and ffprobe on PATH (apt-get install ffmpeg)") from exc
    return stempeg


def to_stereo(audio: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """``(channels, samples)`` -> ``(2, samples)``: mono is duplicated, more than 2 is an error."""
    channels = audio.shape[0]
    if channels == 2:
        return audio
    if channels == 1:
        return np.repeat(audio, 2, axis=0)
    raise AudioError(path, f"has {channels} channels; umxtools handles mono and stereo only")


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample ``(channels, samples)`` with soxr's very-high-quality preset."""
    import soxr  # only needed when rates differ

    if rate_in == rate_out:
        return audio
    out = soxr.resample(np.ascontiguousarray(audio.T), rate_in, rate_out, quality="VHQ")
    return np.ascontiguousarray(out.T, dtype=np.float32)


def write(path: str | Path, audio: np.ndarray, rate: int, subtype: str = "FLOAT") -> Path:
    """Write ``(channels, samples)`` atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    fmt = "FLAC" if path.suffix.lower() == ".flac" else "WAV"
    if audio.ndim != 2:
        raise AudioError(path, f"expected audio of shape (channels, samples), got {tuple(audio.shape)}")
    with fileio.atomic(path) as tmp:
        sf.write(tmp, np.ascontiguousarray(audio.T), rate, subtype=subtype, format=fmt)
    return path


def _first_line(exc: BaseException) -> str:
    # libsndfile's own reason, without soundfile's "Error opening 'PATH': " prefix (the path is
    # already at the start of our message)
    text = str(getattr(exc, "error_string", "") or exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
