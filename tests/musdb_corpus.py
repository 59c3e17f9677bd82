"""A MUSDB18-HQ-shaped corpus for rehearsing the Makefile on real-data settings.

:func:`write_musdb_corpus` writes ``root/train/<track>/`` and ``root/test/<track>/`` folders of
``mixture.wav vocals.wav drums.wav bass.wav other.wav`` (44.1 kHz stereo 16-bit PCM, MUSDB18-HQ's
format), the stems drawn by :func:`umxtools.toy.synthesize_track`. The train subset holds musdb's
own validation tracks (``musdb/configs/mus.yaml``) among its tracks, so musdb's train/valid split
applies as on MUSDB18. The other names are made up but shaped like MUSDB18's (``Artist - Title``
with spaces, apostrophes, ampersands, parentheses and dots), since musdb ships no full track list.

Used by tests/test_make_musdb.py and bench/bench_make.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from umxtools.datasets import MUSDB_SOURCES
from umxtools.toy import synthesize_track

SAMPLE_RATE = 44100
_ARTISTS = ("The Rehearsal Band", "Mock Artist feat. Stand-In", "A.B.C. Music", "Dry Run & The Takes",
            "Placeholder's Finest", "Test Tone (Live)")
_TITLES = ("Don't Mind Me", "Sirens, Again", "Pony & Trap", "One Minute", "Left Blind", "Oh No")


def musdb_validation_tracks() -> list[str]:
    """musdb's validation list, read from the installed musdb's own configuration."""
    import musdb  # noqa: PLC0415

    config = Path(musdb.__file__).parent / "configs" / "mus.yaml"
    return list(yaml.safe_load(config.read_text())["validation_tracks"])


def corpus_names(train: int, test: int) -> tuple[list[str], list[str]]:
    """``(train names, test names)``: musdb's validation tracks first among the train names."""
    valid = musdb_validation_tracks()
    if train < len(valid):
        raise ValueError(f"train must hold musdb's {len(valid)} validation tracks, got {train}")
    made = [f"{_ARTISTS[i % len(_ARTISTS)]} {i:03d} - {_TITLES[i // len(_ARTISTS) % len(_TITLES)]}"
            for i in range(train - len(valid) + test)]
    return valid + made[: train - len(valid)], made[train - len(valid):]


def write_musdb_corpus(root: str | Path, train: int = 100, test: int = 50, seconds: float = 2.0,
                       seed: int = 0) -> tuple[list[str], list[str]]:
    """Write the corpus under ``root``; returns ``(train names, test names)``."""
    root = Path(root)
    train_names, test_names = corpus_names(train, test)
    nb_samples = int(round(seconds * SAMPLE_RATE))
    index = 0
    for subset, names in (("train", train_names), ("test", test_names)):
        for name in names:
            folder = root / subset / name
            folder.mkdir(parents=True)
            stems = synthesize_track(seed, index, nb_samples, SAMPLE_RATE)  # each (2, nb_samples)
            index += 1
            mixture = np.zeros_like(stems[MUSDB_SOURCES[0]])
            for source in MUSDB_SOURCES:
                mixture += stems[source]
                sf.write(folder / f"{source}.wav", stems[source].T, SAMPLE_RATE, subtype="PCM_16")
            sf.write(folder / "mixture.wav", mixture.T, SAMPLE_RATE, subtype="PCM_16")
    return train_names, test_names


def snapshot(root: str | Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of everything under ``root``, folders included."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}
