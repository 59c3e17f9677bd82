"""A run and its output folder: resume it, replace it (``--force``) or refuse.

:func:`plan_output` decides from the files a folder holds whether a run starts fresh, resumes
its checkpoint or is refused because the folder holds another run; :func:`resume_from` reads the
checkpoint to continue and refuses one of another run (other flags, other caches) or one that
already trained more epochs than asked; :func:`remove_stale_tmp` clears what a killed process
left; :func:`rng_state` and :func:`set_rng_state` carry the random generators across a resume.
The files and their keys are :mod:`umxtools.model_folder`'s; nothing here writes a file.
"""

from __future__ import annotations

import glob
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from umxtools.errors import CheckpointError, OutputError, UsageError
from umxtools.model_folder import IDENTITY_BEFORE_RECIPE, MODEL_RUN, Resumed, RunFiles, load_checkpoint, resumed, run_files_in


def plan_output(files: RunFiles, force: bool, resume: bool) -> tuple[bool, list[Path]]:
    """Whether to resume, and which files of an earlier run to delete before writing (``--force``).

    Refuses (:class:`OutputError`) a folder holding another run unless ``force``; with
    ``resume``, the run's own checkpoint is resumed when it exists, and a folder with nothing of
    this run starts fresh (so a job script can always pass ``--resume``). Nothing is deleted here.
    """
    folder = files.folder
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "exists and is not a folder")
    own = set(files.own())
    existing = run_files_in(folder)
    if files.name == MODEL_RUN:
        # a model.json run owns the folder: any other run's weights or metadata is foreign
        foreign = [p for p in existing if p not in own]
    else:
        # single-target runs share a folder with other targets' runs, not with a model.json run
        foreign = [p for p in existing if p.name.startswith(f"{MODEL_RUN}.")]
    mine = [p for p in existing if p in own]
    if force:
        return False, foreign + mine
    if foreign:
        hint = "pass --force to replace it, or use another folder"
        raise OutputError(folder, f"holds another run ({foreign[0].name}); {hint}")
    if resume:
        if files.checkpoint.exists():
            return True, []
        if mine:
            raise OutputError(folder, f"holds {mine[0].name} but no {files.checkpoint.name} to resume; pass --force to start over")
        return False, []
    if mine:
        raise OutputError(folder, f"holds a run of {files.name!r} ({mine[0].name}); pass --resume to continue it or --force to replace it")
    return False, []


def resume_from(files: RunFiles, identity: dict, epochs: int) -> Resumed:
    """The run's checkpoint to continue, checked against this run's ``identity`` and ``--epochs``."""
    state = resumed(files.checkpoint, load_checkpoint(files.checkpoint))
    check_identity(files.checkpoint, state.identity, identity)
    trained = state.progress.epochs_trained
    if epochs < trained:
        # a typo, or a Makefile's EPOCHS lowered: training less than the checkpoint holds is
        # impossible, and silently keeping the longer run would hide that
        raise UsageError(files.checkpoint, f"already trained {trained} epochs; --epochs {epochs} is fewer, so nothing was "
                                           f"done (raise --epochs above {trained} to continue, or --force to start over)")
    return state


def check_identity(path: Path, have: dict, want: dict) -> None:
    """Refuse to resume a checkpoint whose run differs from the flags (the first difference named)."""
    have = {**{k: v for k, v in IDENTITY_BEFORE_RECIPE.items() if k not in have}, **have}
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise CheckpointError(path, f"a checkpoint of another run: {key} is {_short(have.get(key))} there, {_short(want.get(key))} "
                                        "here; pass the same flags to resume, or --force to start over")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def remove_stale_tmp(files: RunFiles) -> None:
    """Temporary files a killed process left behind: every one of this run's files (the caller
    holds the run's lock, so no live process writes them), and those of the folder-wide files
    (``separator.json``, ``curves.png``) whose writer is no longer running on this host; never a
    temporary file of another run that may be training side by side in the same folder."""
    if not files.folder.is_dir():
        return
    for path in files.own():
        for p in files.folder.glob(f".{glob.escape(path.name)}.*.tmp"):
            p.unlink(missing_ok=True)
    for path in (files.separator, files.curves):
        for p in files.folder.glob(f".{glob.escape(path.name)}.*.tmp"):
            pid = p.name[len(path.name) + 2:].split("-")[0]
            if pid.isdigit() and not _running(int(pid)):
                p.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def rng_state() -> dict:
    """The generators' states, in types ``weights_only`` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    # random.setstate wants tuples; a round trip through some serialisers gives lists
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
