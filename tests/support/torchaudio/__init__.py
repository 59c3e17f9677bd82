"""A minimal stand-in for ``torchaudio``, so that ``import openunmix`` works in tests and benchmarks.

Why it exists: openunmix 1.3.0 imports ``torchaudio`` at module level (``data.py``, ``utils.py``,
``transforms.py``), but the registry's torchaudio build does not load beside the CPU torch the
Makefile pins, so openunmix is installed with ``--no-deps`` and has no torchaudio to import. Put
``tests/support`` first on ``sys.path`` and this package is imported instead.

It covers exactly what openunmix 1.3.0 calls, backed by soundfile and soxr:

- ``load`` / ``info``: ``data.load_audio`` and ``data.load_info`` (the folder datasets);
- ``get_audio_backend`` / ``set_audio_backend``: ``data.load_info`` refuses the ``"sox"`` backend;
  the CLIs set one;
- ``save``: ``cli.py`` writes estimates with ``torchaudio.save(path, tensor, sample_rate=...)``;
- ``transforms.Resample``: ``utils.preprocess`` resamples input at another rate than the model's.

``MUSDBDataset`` itself reads through musdb, not torchaudio. Nothing else of torchaudio exists
here: an attribute openunmix starts to use fails loudly (``AttributeError``) instead of being
guessed. Audio tensors are ``(channels, samples)`` float32, as torchaudio's with its defaults.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
import torch

__version__ = "0+umxtools.stub"

# what torchaudio.load returns with normalize=False: the file's integer type (torchaudio reads
# 24-bit PCM as left-justified int32, as soundfile does); float files stay float32 either way
_RAW_DTYPES = {"PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32"}

# torchaudio.save's (encoding, bits_per_sample) -> soundfile subtype; None means "from the dtype"
_SUBTYPES = {
    ("PCM_S", 16): "PCM_16",
    ("PCM_S", 24): "PCM_24",
    ("PCM_S", 32): "PCM_32",
    ("PCM_F", 32): "FLOAT",
    ("PCM_F", 64): "DOUBLE",
}
_DTYPE_SUBTYPES = {torch.int16: "PCM_16", torch.int32: "PCM_32", torch.float32: "FLOAT", torch.float64: "DOUBLE"}

_backend = "soundfile"


@dataclass(frozen=True)
class AudioMetaData:
    """What ``torchaudio.info`` returns (the fields openunmix reads, and two more)."""

    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int
    encoding: str


def get_audio_backend() -> str:
    """Always ``"soundfile"``: the only backend this stand-in has."""
    return _backend


def set_audio_backend(backend: str | None) -> None:
    """Accepted and ignored: openunmix's CLIs call it, and soundfile serves every backend name."""


def info(path, format: str | None = None) -> AudioMetaData:  # torchaudio's name
    """Sample rate, length in frames and channel count of an audio file, without decoding it."""
    i = sf.info(str(path))
    bits = {"PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32, "DOUBLE": 64}.get(i.subtype, 0)
    encoding = "PCM_F" if i.subtype in ("FLOAT", "DOUBLE") else "PCM_S" if i.subtype.startswith("PCM_") else i.subtype
    return AudioMetaData(int(i.samplerate), int(i.frames), int(i.channels), bits, encoding)


def load(
    path,
    frame_offset: int = 0,
    num_frames: int = -1,
    normalize: bool = True,
    channels_first: bool = True,
    format: str | None = None,  # torchaudio's name
) -> tuple[torch.Tensor, int]:
    """``(waveform, sample_rate)``: ``(channels, samples)`` (``(samples, channels)`` if not
    ``channels_first``), float32 in [-1, 1], or the file's integer type if not ``normalize``.

    Only ``num_frames`` frames from ``frame_offset`` are decoded (``-1``: to the end), as
    torchaudio does; soundfile's errors propagate unchanged.
    """
    with sf.SoundFile(str(path)) as f:
        dtype = "float32" if normalize else _RAW_DTYPES.get(f.subtype, "float32")
        f.seek(min(frame_offset, f.frames))
        data = f.read(num_frames, dtype=dtype, always_2d=True)  # (samples, channels)
        rate = int(f.samplerate)
    wav = torch.from_numpy(np.ascontiguousarray(data.T if channels_first else data))
    return wav, rate


def save(
    path,
    src: torch.Tensor,
    sample_rate,
    channels_first: bool = True,
    format: str | None = None,  # torchaudio's name
    encoding: str | None = None,
    bits_per_sample: int | None = None,
) -> None:
    """Write ``src`` ``(channels, samples)`` (or ``(samples,)`` mono; ``(samples, channels)`` if
    not ``channels_first``). float32 writes 32-bit float, as torchaudio's default does."""
    audio = src.detach().cpu()
    if audio.ndim == 1:
        audio = audio[None] if channels_first else audio[:, None]
    if audio.ndim != 2:
        raise ValueError(f"{path}: expected a (channels, samples) tensor, got shape {tuple(src.shape)}")
    if encoding is None and bits_per_sample is None:
        subtype = _DTYPE_SUBTYPES.get(audio.dtype)
    else:
        subtype = _SUBTYPES.get((encoding or ("PCM_S" if not audio.is_floating_point() else "PCM_F"), bits_per_sample or 32))
    if subtype is None:
        raise ValueError(f"{path}: this torchaudio stand-in cannot write dtype {audio.dtype} "
                         f"with encoding={encoding!r}, bits_per_sample={bits_per_sample!r}")
    frames = audio.T if channels_first else audio  # soundfile wants (samples, channels)
    # sample_rate may be a 0-d tensor: openunmix passes its Separator's sample_rate buffer
    sf.write(str(path), frames.numpy(), int(sample_rate), subtype=subtype, format=format)


class Resample(torch.nn.Module):
    """``torchaudio.transforms.Resample`` through soxr (high quality), along the last axis.

    Takes ``(..., time)`` and returns ``(..., ceil(time * new_freq / orig_freq))``, torchaudio's
    output length; soxr may give one sample fewer, padded here with a zero. The filter differs
    from torchaudio's windowed sinc (``resampling_method`` and its options are accepted but not
    followed), so outputs match torchaudio's closely, not bit for bit. No gradient flows.
    """

    def __init__(self, orig_freq: int = 16000, new_freq: int = 16000, resampling_method: str = "sinc_interp_hann",
                 lowpass_filter_width: int = 6, rolloff: float = 0.99, beta: float | None = None, dtype=None):
        super().__init__()
        self.orig_freq, self.new_freq = int(orig_freq), int(new_freq)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.orig_freq == self.new_freq:
            return waveform
        *lead, nb_timesteps = waveform.shape
        planes = waveform.detach().cpu().reshape(-1, nb_timesteps).T.numpy()  # (time, planes) for soxr
        out = soxr.resample(np.ascontiguousarray(planes), self.orig_freq, self.new_freq, quality="HQ")
        length = -(-nb_timesteps * self.new_freq // self.orig_freq)
        out = np.pad(out[:length], ((0, max(0, length - out.shape[0])), (0, 0)))
        return torch.from_numpy(np.ascontiguousarray(out.T)).reshape(*lead, length).to(waveform.device, waveform.dtype)


# torchaudio.transforms is a submodule: registered so both ``torchaudio.transforms.Resample`` and
# ``import torchaudio.transforms`` work from this single file
transforms = types.ModuleType(f"{__name__}.transforms", "The part of torchaudio.transforms openunmix uses.")
transforms.Resample = Resample
Resample.__module__ = transforms.__name__
sys.modules[transforms.__name__] = transforms
