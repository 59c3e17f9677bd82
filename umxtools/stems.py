"""Writing separated stems: streamed block by block, atomic per track, in the requested format.

A :class:`StemWriter` owns one output folder (``OUT/<track>/``). It writes into a hidden temporary
folder beside it (``OUT/.<track>.<pid>-<random>.partial``, unique to the process and the call) and
renames that into place only when every stem and the JSON record are complete, so an error (a
full disk included), a Ctrl-C or a crash never leaves a half-written separation under the final
name. Only a folder that holds ``separation.json`` (one a separation made) is ever replaced:
never a dataset's track folder or anything else that happens to have the name. A writer killed
outright (``kill -9``, a node failure) leaves its temporary folder behind: :func:`remove_stale`
removes those of a track, called by whoever holds the track's lock (:mod:`umxtools.separate_files`).

- Blocks arrive at the model's rate; with ``out_rate`` different they pass through one streaming
  soxr resampler (VHQ) per stem, and the stems are cut or zero-padded to exactly ``length``
  frames, the input's length at its own rate.
- ``32f``: float32, nothing clipped (a float WAV holds values beyond +-1). ``16``/``24``: the
  writer quantises itself (round to nearest, scale ``2**(bits - 1)``) and clips at full scale,
  counting the samples it clipped: libsndfile's own float-to-integer conversion wraps values
  beyond +-1 around instead. ``clip="rescale"`` keeps float temporaries and, at the end, scales
  every stem of the track by one gain (the stems still sum to the mixture) so that the loudest
  sample fits, then quantises.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from umxtools import fileio
from umxtools.errors import OutputError, UsageError

FORMATS = ("wav", "flac")
BITS = ("16", "24", "32f")
CLIP_MODES = ("clip", "rescale")
RECORD = "separation.json"
_SUBTYPES = {"16": "PCM_16", "24": "PCM_24", "32f": "FLOAT"}
_READ_BLOCK = 1 << 18


@dataclass(frozen=True)
class OutputOptions:
    """How stems are written.

    Attributes:
        format: ``wav`` or ``flac``.
        bits: ``16``, ``24`` or ``32f`` (float); default ``32f`` for WAV, ``24`` for FLAC (FLAC
            holds integers only).
        clip: ``clip`` (clip at full scale, count what was clipped) or ``rescale`` (one gain per
            track so that nothing clips) for integer output.
        keep_rate: write at the input's sample rate (else at the model's).
        force: redo inputs whose output folder is already complete (earlier separations only).
    """

    format: str = "wav"
    bits: str | None = None
    clip: str = "clip"
    keep_rate: bool = True
    force: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise UsageError(None, f"format {self.format!r}: one of {', '.join(FORMATS)}")
        if self.bits is not None and self.bits not in BITS:
            raise UsageError(None, f"bits {self.bits!r}: one of {', '.join(BITS)}")
        if self.clip not in CLIP_MODES:
            raise UsageError(None, f"clip {self.clip!r}: one of {', '.join(CLIP_MODES)}")
        if self.format == "flac" and self.bits == "32f":
            raise UsageError(None, "FLAC holds 16- or 24-bit integers, not float: --bits 16 or 24")

    @property
    def resolved_bits(self) -> str:
        return self.bits or ("24" if self.format == "flac" else "32f")

    @property
    def suffix(self) -> str:
        return f".{self.format}"

    def as_dict(self) -> dict:
        return {"format": self.format, "bits": self.resolved_bits, "clip": self.clip, "keep_rate": self.keep_rate}


def made_by_separate(folder: Path) -> bool:
    """Whether ``folder`` is a folder (not a link) holding ``separation.json``: an earlier separation."""
    return not folder.is_symlink() and (folder / RECORD).is_file()


def check_replaceable(folder: Path, replace: bool) -> None:
    """Refuse an existing ``folder`` that a separation did not make (no ``separation.json``: a
    dataset's track, a link), always; and an earlier separation unless ``replace``."""
    if not (folder.exists() or folder.is_symlink()):
        return
    if not made_by_separate(folder):
        raise OutputError(folder, f"exists and was not made by umxtools separate (no {RECORD} in it); --force replaces "
                                  "only earlier separations: remove it yourself or choose another -o")
    if not replace:
        raise OutputError(folder, "exists; pass --force to replace it")


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporaries of ``folder`` that killed writers left (``.<name>.<pid>-<hex>.partial``,
    and ``.old`` ones of a replacement cut short); returns them. Only for a caller holding the
    track's lock (:func:`umxtools.fileio.exclusive`): every writer holds it, so none of these is
    being written."""
    stale = [*fileio.remove_leftovers(folder, ".partial"), *fileio.remove_leftovers(folder, ".old")]
    return stale


def _sf_problem(exc: Exception, file: sf.SoundFile | None = None) -> str:
    """What went wrong in a libsndfile write, in :func:`umxtools.fileio.os_problem`'s words.

    libsndfile reports a failed ``write`` (a full disk) as "System error." and keeps the OS's
    reason on the file ("System error : No space left on device."): read it there, map it back
    to its errno where it is one of the usual ones.
    """
    text = str(exc)
    if file is not None:
        # soundfile's private handles: without them, the exception's own text
        with contextlib.suppress(Exception):
            text = sf._ffi.string(sf._snd.sf_strerror(file._file)).decode(errors="replace")
    reason = text.rpartition(":")[2].strip().rstrip(".") or text.strip().rstrip(".")
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO):
        if reason.lower() == os.strerror(code).lower():
            return fileio.os_problem(OSError(code, os.strerror(code)))
    return f"cannot write ({reason.lower() or type(exc).__name__})"


def read_record(folder: Path) -> dict | None:
    """The ``separation.json`` of an output folder, or None where it is missing or unreadable."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(folder: Path, record: dict) -> bool:
    """Whether ``folder`` holds every stem its ``record`` lists, each of the recorded length (a
    stem deleted or truncated by hand makes it incomplete; the writer itself never leaves one so)."""
    output = record.get("output")
    files = output.get("files") if isinstance(output, dict) else None
    if not isinstance(files, dict) or list(files) != record.get("outputs_order"):
        return False
    for name in files.values():
        if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
            return False
        try:
            if sf.info(str(folder / name)).frames != output.get("frames"):
                return False
        except (sf.LibsndfileError, RuntimeError, OSError):
            return False
    return True


@dataclass
class _Stem:
    path: Path
    file: sf.SoundFile
    resampler: object | None
    written: int = 0
    clipped: int = 0
    peak: float = 0.0


@dataclass
class StemWriter:
    """Streams blocks of several stems into ``folder`` (see the module docstring).

    Args:
        folder: the final output folder ``OUT/<track>``.
        names: the stems, in order (``<name><suffix>`` each).
        rate: the rate of the blocks; ``out_rate``: the rate written.
        length: frames per stem at ``out_rate``.
        channels: channels per stem.
        replace: replace an earlier separation in ``folder`` (never anything else).
    """

    folder: Path
    names: list[str]
    rate: int
    out_rate: int
    length: int
    options: OutputOptions
    channels: int = 2
    replace: bool = False
    stems: dict[str, _Stem] = field(default_factory=dict, init=False)

    def __post_init__(self):
        check_replaceable(self.folder, self.replace)
        for name in self.names:
            fileio.check_name(name, "output", self.folder)
        self.tmp = fileio.temp_path(self.folder, ".partial")
        try:
            self.tmp.mkdir(parents=True)
        except OSError as exc:
            raise fileio.output_error(self.folder.parent, exc) from exc
        self.bits = self.options.resolved_bits
        # rescaling needs the peak of every stem first: float temporaries, converted at the end
        self.staged = self.bits != "32f" and self.options.clip == "rescale"
        try:
            for name in self.names:
                self.stems[name] = self._open(name)
        except BaseException:
            self.abort()
            raise

    def _open(self, name: str) -> _Stem:
        path = self.tmp / f"{name}{self.options.suffix}"
        try:
            if self.staged:
                f = sf.SoundFile(self.tmp / f".{name}.f32.wav", "w", self.out_rate, self.channels, "FLOAT", format="WAV")
            else:
                f = sf.SoundFile(path, "w", self.out_rate, self.channels, _SUBTYPES[self.bits], format=self.options.format.upper())
        except sf.LibsndfileError as exc:
            raise OutputError(self.folder, _sf_problem(exc)) from exc
        resampler = None
        if self.rate != self.out_rate:
            import soxr

            resampler = soxr.ResampleStream(self.rate, self.out_rate, self.channels, dtype="float32", quality="VHQ")
        return _Stem(path, f, resampler)

    def write(self, blocks: dict[str, np.ndarray]) -> None:
        """The next samples of every stem: ``{name: (channels, n)}`` at ``rate``."""
        for name, block in blocks.items():
            stem = self.stems[name]
            frames = np.ascontiguousarray(block.T, dtype=np.float32)  # (n, channels)
            if stem.resampler is not None:
                frames = stem.resampler.resample_chunk(frames, last=False)
            self._put(stem, frames)

    def _put(self, stem: _Stem, frames: np.ndarray) -> None:
        frames = frames[: max(0, self.length - stem.written)]
        if not len(frames):
            return
        stem.written += len(frames)
        stem.peak = max(stem.peak, float(np.abs(frames).max()))
        if not (self.bits == "32f" or self.staged):
            frames, clipped = quantize(frames, int(self.bits))
            stem.clipped += clipped
        try:
            stem.file.write(frames)
        except (sf.LibsndfileError, OSError, AssertionError) as exc:  # a full disk, a quota (soundfile asserts short writes)
            raise OutputError(self.folder, _sf_problem(exc, stem.file)) from exc

    def close(self, record: dict) -> Path:
        """Finish every stem, write ``separation.json`` (``record`` plus what writing found) and
        rename the folder into place. Returns the folder."""
        try:
            for stem in self.stems.values():
                if stem.resampler is not None:
                    self._put(stem, stem.resampler.resample_chunk(np.zeros((0, self.channels), np.float32), last=True))
                if stem.written < self.length:
                    if stem.resampler is None:  # the separation streams every sample: a shortfall is a bug, never padded
                        raise RuntimeError(f"{self.folder}: {stem.path.name} received {stem.written} of {self.length} samples")
                    # a resampler's last block can fall a few samples short of the rounded output length
                    self._put(stem, np.zeros((self.length - stem.written, self.channels), np.float32))
                self._close(stem.file)
            gain = self._rescale() if self.staged else 1.0
            record = {**record, "output": {"files": {n: s.path.name for n, s in self.stems.items()}, "sample_rate": self.out_rate,
                                           "frames": self.length, **self.options.as_dict(), "gain": gain,
                                           "clipped_samples": {n: s.clipped for n, s in self.stems.items()},
                                           "peak": {n: round(s.peak, 6) for n, s in self.stems.items()}}}
            fileio.write_json(self.tmp / RECORD, record, indent=2)
            self._commit()
        except BaseException:
            self.abort()
            raise
        return self.folder

    @property
    def clipped(self) -> dict[str, int]:
        return {n: s.clipped for n, s in self.stems.items() if s.clipped}

    def _rescale(self) -> float:
        """Convert the float temporaries to integers with one gain that fits the loudest stem."""
        bits = int(self.bits)
        top = (2 ** (bits - 1) - 1) / 2 ** (bits - 1)
        peak = max(s.peak for s in self.stems.values())
        gain = min(1.0, top / peak) if peak > 0 else 1.0
        for name, stem in self.stems.items():
            staged = self.tmp / f".{name}.f32.wav"
            with sf.SoundFile(staged) as src:
                try:
                    dst = sf.SoundFile(stem.path, "w", self.out_rate, self.channels, _SUBTYPES[self.bits],
                                       format=self.options.format.upper())
                except sf.LibsndfileError as exc:
                    raise OutputError(self.folder, _sf_problem(exc)) from exc
                stem.file = dst  # abort() closes it
                for frames in src.blocks(_READ_BLOCK, dtype="float32", always_2d=True):
                    ints, clipped = quantize(frames * np.float32(gain), bits)
                    stem.clipped += clipped
                    try:
                        dst.write(ints)
                    except (sf.LibsndfileError, OSError) as exc:
                        raise OutputError(self.folder, _sf_problem(exc, dst)) from exc
                self._close(dst)
            staged.unlink()
        return gain

    def _close(self, file: sf.SoundFile) -> None:
        """Close a stem; libsndfile writes its header now, which can fail on a full disk too."""
        try:
            file.close()
        except (sf.LibsndfileError, OSError) as exc:
            raise OutputError(self.folder, _sf_problem(exc)) from exc

    def _commit(self) -> None:
        """Rename the finished folder into place; an earlier separation under the name is replaced
        (checked again here: another process may have put something there meanwhile)."""
        old = None
        try:
            if self.folder.exists() or self.folder.is_symlink():
                check_replaceable(self.folder, self.replace)
                old = fileio.temp_path(self.folder, ".old")
                os.replace(self.folder, old)
            os.replace(self.tmp, self.folder)
        except OSError as exc:
            if old is not None and not self.folder.exists():
                os.replace(old, self.folder)  # the earlier separation stays where it was
            raise fileio.output_error(self.folder, exc) from exc
        if old is not None:
            fileio.remove_tree(old, RECORD)

    def abort(self) -> None:
        """Drop everything written so far."""
        for stem in self.stems.values():
            try:
                stem.file.close()
            except (sf.LibsndfileError, OSError, RuntimeError):
                pass  # the folder goes anyway
        shutil.rmtree(self.tmp, ignore_errors=True)


def quantize(frames: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """float ``(n, channels)`` -> integers for ``bits``-bit PCM, clipped at full scale; and the
    number of samples clipped. 24-bit values are left-justified in int32, as soundfile writes them."""
    scale = float(2 ** (bits - 1))
    q = np.rint(frames.astype(np.float64) * scale)
    over = (q > scale - 1) | (q < -scale)
    clipped = int(np.count_nonzero(over))
    if clipped:
        np.clip(q, -scale, scale - 1, out=q)
    if bits == 16:
        return q.astype(np.int16), clipped
    return q.astype(np.int32) << 8, clipped
