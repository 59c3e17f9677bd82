"""Your own dataset as a Python class, cached with ``umxtools cache module``.

This is open-unmix's ``TemplateDataset`` pattern: when no built-in kind (``cache musdb``,
``cache folder --layout aligned|sourcefolder|trackfolder``) fits your data, write a small class
and point umxtools at it::

    umxtools cache module examples/template_dataset.py:SineDataset \\
        --arg tracks=8 --arg seconds=10 -o cache/sines.h5
    umxtools cache module examples/template_dataset.py:StemFolderDataset \\
        --arg root=data/stems --arg sources=vocals,accompaniment -o cache/stems.h5

``MODULE:CLASS`` is either a file path ending in ``.py`` (imported from that file) or a dotted
module name on ``sys.path`` (``mypackage.data:MyDataset``).

The contract (checked by ``umxtools.datasets.instantiate_module`` and ``load_track``)
-----------------------------------------------------------------------------------
``CLASS(**args)``
    Built from the ``--arg KEY=VALUE`` flags. Each VALUE is parsed as JSON when it parses and
    is the plain string otherwise: ``tracks=3`` -> ``3``, ``seconds=2.5`` -> ``2.5``,
    ``flag=true`` -> ``True``, ``mixture=null`` -> ``None``, ``sources='["a","b"]'`` -> a list,
    but ``root=data/stems`` and ``sources=vocals,drums`` -> strings. Quote a value that must
    stay a string although it looks like JSON: ``--arg 'name="123"'``. A ``TypeError`` from
    the constructor (a missing or unknown argument) is reported as a one-line error. The
    arguments are recorded in the cache (root attribute ``dataset``) and are part of the
    build's identity: resuming an interrupted build needs the same arguments.

``sample_rate`` (attribute, a number; umxtools uses ``int(sample_rate)``)
    The rate of the audio ``__getitem__`` returns. It must equal the build's ``--sample-rate``
    (default 44100) unless ``--resample`` is given (then soxr converts every stream).

``__len__()`` and ``__getitem__(index)``
    ``index`` runs over ``range(len(dataset))``. An item is a mapping (a ``dict``; anything
    with ``.items()``) from a source name to that source's audio, shape ``(channels,
    samples)``, as a numpy array or a torch tensor (converted to float32). A 1-D
    array is one channel; mono is duplicated to stereo and more than two channels is an error,
    so every cache is stereo. All streams of an item must have the same length and only
    finite values (NaN or inf is a one-line error naming ``MODULE:CLASS[index]``).

    An optional ``"mixture"`` entry is stored as given (umxtools does not check that it is the
    sum of the sources). Without one, the stored mixture is the float32 sum of the returned
    sources. Note that the cache marks module datasets as additive: the random training
    sampler (``umxtools.loaders.RandomDataset``) builds its mixtures from the sources and
    ignores a stored mixture; the validation sampler (``IndexDataset``) reads it.

    Every key returned is stored as its own role (``stft/<key>``, and ``wave/<key>`` unless
    ``--no-waveforms``); an item may omit sources (that track then lacks them).

``sources`` (optional attribute, a list of names)
    The cache's source names (root attribute ``sources``, what ``--targets`` can name). Make it
    a list or tuple: a comma-separated string would be read as its characters. Without it,
    umxtools uses the keys (other than ``"mixture"``) of item 0.

``track_name(index)`` (optional method)
    The track's name in the cache. Without it tracks are named ``CLASS-00000``,
    ``CLASS-00001``, ...

What else umxtools relies on
----------------------------
- Determinism. An item can be loaded more than once (item 0 is loaded to find the sources
  when there is no ``sources`` attribute; a resumed build reloads the tracks it had not
  finished), so ``dataset[i]`` must give the same audio every time and in every process:
  seed per item (``numpy.random.default_rng((seed, index))``), never from a shared stream.
- Cheap construction, no import-time side effects. The class is built once per process and
  kept; with ``-j N`` each of the N decode processes (started with ``spawn``) imports this file
  again and builds its own instance from the same arguments.
- Staleness. The cache records this module file (path, size, mtime) as the input of every
  track, not the files your class reads: editing the module marks the cache stale, editing
  your audio files does not. Rebuild (``--force``) after changing the data.
- Errors. Raise ``umxtools.errors.DatasetError`` or ``AudioError`` (``(path, problem)``) for
  problems a user can fix: the command prints them as one line, ``umxtools: error: PATH:
  problem``, and exits with 1. Other exceptions escape with a traceback.

Two classes follow: ``SineDataset`` needs no files (the tests build caches from it), and
``StemFolderDataset`` reads ``ROOT/<track>/<source>.wav`` folders with soundfile, the starting
point for a real layout. (For exactly that layout the built-in ``umxtools cache folder --layout
trackfolder`` also records the WAV files for staleness checks; a class earns its keep when the
files need code: renaming, cutting, summing stems, decoding an unusual format.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from umxtools.errors import AudioError, DatasetError

MUSDB_SOURCES = ("vocals", "drums", "bass", "other")
MIXTURE = "mixture"


def _names(sources: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"`` (what ``--arg sources=a,b`` gives) or a JSON list -> ``["a", "b"]``."""
    names = sources.split(",") if isinstance(sources, str) else list(sources)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise DatasetError(None, "sources is empty; name at least one source")
    if MIXTURE in names:
        raise DatasetError(None, f"{MIXTURE!r} is not a source name (it is the sum of the sources)")
    return names


class SineDataset:
    """Synthetic tracks, one harmonic melody per source; no files needed.

    Source ``k`` (in ``sources`` order) plays notes of half a second whose fundamentals are drawn
    from ``[110 * 2**k, 220 * 2**k)`` Hz, with 3 harmonics (amplitudes 1, 1/2, 1/3; those at or
    above Nyquist are left out) and a raised-cosine envelope per note, panned at a random
    constant angle. Items are ``{source: (channels, samples) float32}`` without a mixture, so
    umxtools stores their sum as the mixture.

    Args:
        tracks: number of items.
        seconds: length of every track (``round(seconds * sample_rate)`` samples).
        seed: items are drawn from ``numpy.random.default_rng((seed, index))``.
        sample_rate: in Hz; pass the same ``--sample-rate`` to the cache command.
        channels: 1 (umxtools duplicates it to stereo) or 2.
        sources: comma-separated names or a list.
    """

    NOTE_SECONDS = 0.5
    LEVEL = 0.2  # per source: four sources sum to a peak below 1

    def __init__(
        self,
        tracks: int = 4,
        seconds: float = 3.0,
        seed: int = 0,
        sample_rate: int = 44100,
        channels: int = 2,
        sources: str | list[str] = ",".join(MUSDB_SOURCES),
    ):
        if int(tracks) < 1:
            raise DatasetError(None, f"tracks={tracks}: need at least one track")
        if float(seconds) <= 0:
            raise DatasetError(None, f"seconds={seconds}: need a positive length")
        if channels not in (1, 2):
            raise DatasetError(None, f"channels={channels}: 1 or 2")
        self.tracks = int(tracks)
        self.seconds = float(seconds)
        self.seed = int(seed)
        self.sample_rate = int(sample_rate)
        self.channels = channels
        self.sources = _names(sources)
        self.nb_samples = round(self.seconds * self.sample_rate)

    def __len__(self) -> int:
        return self.tracks

    def track_name(self, index: int) -> str:
        return f"sine-{self.seed}-{index:03d}"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.tracks:
            raise IndexError(f"index {index} out of range for {self.tracks} tracks")
        rng = np.random.default_rng((self.seed, index))  # per item: same audio in any process
        return {name: self._melody(rng, k) for k, name in enumerate(self.sources)}

    def _melody(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """``(channels, samples)`` float32 melody of source number ``k``."""
        rate, n = self.sample_rate, self.nb_samples
        note = max(1, round(self.NOTE_SECONDS * rate))
        nb_notes = -(-n // note)
        f0 = np.repeat(rng.uniform(110 * 2**k, 220 * 2**k, size=nb_notes), note)[:n]  # (samples,)
        phase = 2 * np.pi * np.cumsum(f0) / rate  # continuous phase across note changes
        tone = np.zeros(n)
        for h in (1, 2, 3):
            audible = h * f0 < rate / 2  # (samples,) no aliased partials at low rates
            tone += audible * np.sin(h * phase) / h
        pos = np.arange(n) % note
        tone *= np.sin(np.pi * pos / note) ** 2  # each note fades in and out
        angle = rng.uniform(0.2, 0.8) * np.pi / 2
        gains = np.array([np.cos(angle), np.sin(angle)])[: self.channels, None]  # (channels, 1)
        return (self.LEVEL * gains * tone[None]).astype(np.float32)  # (channels, samples)


class StemFolderDataset:
    """``ROOT/<track>/<source>.wav`` stems, one folder per track, read with soundfile.

    Every track folder must hold every source; a ``mixture`` file, when present, is returned
    too (otherwise umxtools sums the sources). All files must share one sample rate, which
    becomes ``sample_rate``. Folders whose names start with ``.`` are ignored.

    Args:
        root: the folder of track folders.
        sources: comma-separated stem names (file stems without ``.wav``) or a list.
        mixture: the mixture's file name in each track folder; ``null`` never returns one.
        max_seconds: read only the first ``max_seconds`` of every file (quick experiments).
    """

    def __init__(
        self,
        root: str,
        sources: str | list[str] = ",".join(MUSDB_SOURCES),
        mixture: str | None = "mixture.wav",
        max_seconds: float | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(self.root, "no such dataset folder")
        self.sources = _names(sources)
        self.mixture = mixture
        self.max_seconds = max_seconds
        self.folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.folders:
            raise DatasetError(self.root, "no track folders (expected ROOT/<track>/<source>.wav)")
        # check every file up front: a bad file should stop the command before the build starts
        rates = {}
        for folder in self.folders:
            for path in self._files(folder).values():
                rates[path] = self._rate(path)
        first = next(iter(rates))
        odd = next((p for p, r in rates.items() if r != rates[first]), None)
        if odd is not None:
            raise DatasetError(odd, f"sample rate {rates[odd]} Hz, but {first} has {rates[first]} Hz")
        self.sample_rate = rates[first]

    def _files(self, folder: Path) -> dict[str, Path]:
        """Role -> file of one track folder; raises for a missing stem."""
        files = {}
        for source in self.sources:
            path = folder / f"{source}.wav"
            if not path.is_file():
                raise DatasetError(path, f"missing stem of track {folder.name!r}")
            files[source] = path
        if self.mixture is not None and (folder / self.mixture).is_file():
            files[MIXTURE] = folder / self.mixture
        return files

    @staticmethod
    def _rate(path: Path) -> int:
        try:
            return int(sf.info(str(path)).samplerate)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(path, f"not a readable audio file ({str(exc).strip()})") from exc

    def __len__(self) -> int:
        return len(self.folders)

    def track_name(self, index: int) -> str:
        return self.folders[index].name

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        frames = -1 if self.max_seconds is None else round(self.max_seconds * self.sample_rate)
        item = {}
        for role, path in self._files(self.folders[index]).items():
            try:
                audio = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)[0]  # (samples, channels)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioError(path, f"not a readable audio file ({str(exc).strip()})") from exc
            item[role] = audio.T  # (channels, samples)
        return item
