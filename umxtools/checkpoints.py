"""The files of a model folder (docs/model-format.md): names, atomic writes, checkpoints, metadata.

A folder holds one or more *runs*. A single-target UMX run is named after its target and writes
open-unmix's files (``vocals.pth``, ``vocals.chkpnt``, ``vocals.json``); several of them (one per
target, trained one after another or side by side) make open-unmix's usual 4-target folder. A
joint, waveform or custom model is one run named ``model`` (``model.pth``, ``model.chkpnt``,
``model.json``); a joint model also exports every target as open-unmix files. Every run adds
``<run>.history.csv``; the folder has one ``separator.json`` and one ``curves.png``.

Every file is written under a temporary name in the folder and renamed when complete, so a
killed process (even ``kill -9``) leaves either the previous file or the new one, never half of
one. The checkpoint is the source of truth for resuming: the other files can be rewritten from it.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import json
import math
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from umxtools import fileio
from umxtools.errors import CheckpointError, OutputError

CHECKPOINT_FORMAT = "umxtools.checkpoint"
CHECKPOINT_VERSION = 1
MODEL_FORMAT = "umxtools.model"
MODEL_FORMAT_VERSION = 1
MODEL_RUN = "model"  # the run name of joint, waveform and custom models


# --- names -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """Where one run's files go. ``name`` is the target (single UMX) or ``"model"``."""

    folder: Path
    name: str
    exports: tuple[str, ...] = ()  # targets exported as open-unmix files (joint models)

    @property
    def weights(self) -> Path:
        return self.folder / f"{self.name}.pth"

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"{self.name}.chkpnt"

    @property
    def metadata(self) -> Path:
        """``<target>.json`` (open-unmix's) or ``model.json`` (umxtools')."""
        return self.folder / f"{self.name}.json"

    @property
    def history(self) -> Path:
        return self.folder / f"{self.name}.history.csv"

    @property
    def separator(self) -> Path:
        return self.folder / "separator.json"

    @property
    def curves(self) -> Path:
        return self.folder / "curves.png"

    def export_weights(self, target: str) -> Path:
        return self.folder / f"{target}.pth"

    def export_metadata(self, target: str) -> Path:
        return self.folder / f"{target}.json"

    def own(self) -> list[Path]:
        """Every file this run writes except the folder-wide ``separator.json`` and ``curves.png``."""
        paths = [self.weights, self.checkpoint, self.metadata, self.history]
        for t in self.exports:
            paths += [self.export_weights(t), self.export_metadata(t)]
        return paths


def _run_files_in(folder: Path) -> list[Path]:
    """Files of any run: weights, checkpoints, metadata, histories (not separator.json or plots)."""
    if not folder.is_dir():
        return []
    found = [p for p in sorted(folder.iterdir())
             if not p.name.startswith(".") and (p.suffix in (".pth", ".chkpnt") or p.name.endswith(".history.csv"))]
    stems = {p.name.split(".")[0] for p in found}
    # metadata counts only beside a run's weights (a user's notes.json is not a run)
    found += [p for p in sorted(folder.glob("*.json")) if p.stem in stems or p.name == f"{MODEL_RUN}.json"]
    return sorted(found)


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
    existing = _run_files_in(folder)
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


def check_separator(files: RunFiles, conf: dict) -> None:
    """Models sharing a folder share one separator: refuse other STFT settings than the folder's."""
    path = files.separator
    if not path.exists():
        return
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(path, f"unreadable ({exc}); delete it or use another folder") from exc
    others = [t for t in have.get("targets", []) if t not in _targets_of(files) and (files.folder / f"{t}.pth").exists()]
    if not others:
        return
    for key in ("nfft", "nhop", "sample_rate", "nb_channels"):
        if key in have and float(have[key]) != float(conf[key]):
            raise OutputError(path, f"the folder's models ({', '.join(others)}) use {key}={have[key]}, this run {conf[key]}; "
                                    "use another folder")


def _targets_of(files: RunFiles) -> list[str]:
    return list(files.exports) if files.name == MODEL_RUN else [files.name]


# --- atomic writes -----------------------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (see :func:`umxtools.fileio.atomic`)."""
    with fileio.atomic(path) as tmp:
        write(tmp)


def write_json(path: Path, data: dict) -> None:
    # sort_keys and indent 4: what open-unmix's train.py writes
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n"))


def save_torch(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


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


# --- checkpoints -------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> dict:
    """A umxtools checkpoint, loaded with ``weights_only=True`` (no code runs from the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(path, f"refused by weights-only loading (it holds more than tensors and plain values: {first})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, "unreadable checkpoint (truncated or not a torch file); delete it or pass --force") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, "not a umxtools checkpoint (no 'format' key); pass --force to start over")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(path, f"checkpoint format version {state.get('format_version')}, this umxtools reads {CHECKPOINT_VERSION}")
    return state


def check_identity(path: Path, have: dict, want: dict) -> None:
    """Refuse to resume a checkpoint whose run differs from the flags (the first difference named)."""
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise CheckpointError(path, f"a checkpoint of another run: {key} is {_short(have.get(key))} there, {_short(want.get(key))} "
                                        "here; pass the same flags to resume, or --force to start over")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def rng_state() -> dict:
    """The generators' states, in types ``weights_only`` loading accepts."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    # random.setstate wants tuples; a round trip through some serialisers gives lists
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- metadata and history ------------------------------------------------------------------------


def separator_conf(sample_rate: int, n_fft: int, n_hop: int, nb_channels: int) -> dict:
    """open-unmix's separator.json fields (``load_separator`` reads sample_rate, nfft, nhop, nb_channels)."""
    return {"rate": float(sample_rate), "sample_rate": float(sample_rate), "nfft": n_fft, "nhop": n_hop, "nb_channels": nb_channels}


def write_separator(files: RunFiles, conf: dict) -> None:
    """``separator.json`` listing every target with weights in the folder (this run's first if new)."""
    targets = []
    if files.separator.exists():
        try:
            targets = [t for t in json.loads(files.separator.read_text()).get("targets", []) if (files.folder / f"{t}.pth").exists()]
        except (OSError, ValueError):
            targets = []
    for t in _targets_of(files):
        if t not in targets:
            targets.append(t)
    write_json(files.separator, {"targets": targets, **conf})


HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "best", "lr", "seconds", "samples", "samples_per_s", "data_wait")


def write_history(path: Path, history: list[dict]) -> None:
    """One row per epoch; per-target losses (``train_loss_<target>``, ...) after the fixed columns."""
    extra = sorted({k for row in history for k in row} - set(HISTORY_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*HISTORY_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (int(v) if isinstance(v, bool) else v) for k, v in row.items()})
    write_atomic(path, lambda tmp: tmp.write_text(buf.getvalue()))


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("epoch", "samples") else float(v)) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def write_curves(files: RunFiles) -> None:
    """``curves.png``: train (dashed) and valid (solid) loss per epoch of every run in the folder,
    the epoch of the kept weights marked (on the train loss for a run without validation)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training runs on servers
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    runs = {}
    for p in sorted(files.folder.glob("*.history.csv")):
        try:
            runs[p.name[: -len(".history.csv")]] = read_history(p)
        except (OSError, ValueError, KeyError):
            continue  # another process is rewriting it: its next epoch redraws the figure
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    # fixed margins: tight_layout measures every label and costs more than the drawing (0.7 s)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    values = []
    for k, (name, rows) in enumerate(runs.items()):
        color = f"C{k % 10}"
        epochs = [r["epoch"] for r in rows]
        validated = any("valid_loss" in r for r in rows)  # a run without --valid has none
        for key, style in (("train_loss", "--"), ("valid_loss", "-")):
            if key == "valid_loss" and not validated:
                continue
            ys = [r.get(key, math.nan) for r in rows]
            values += [y for y in ys if math.isfinite(y)]
            ax.plot(epochs, ys, style, color=color, label=f"{name} {key.split('_')[0]}")
        best = [r["epoch"] for r in rows if r.get("best")]
        if best:
            row = next(r for r in rows if r["epoch"] == best[-1])
            ax.plot([best[-1]], [row["valid_loss" if validated else "train_loss"]], "o", color=color)
    if values and min(values) > 0:
        ax.set_yscale("log")  # MSE losses span decades; SDR losses are negative and stay linear
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(files.folder.name)
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize="small")
    write_atomic(files.curves, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
