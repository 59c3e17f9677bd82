"""Starting a fresh run from another model's weights (``train --init-from``).

:func:`source_state` reads a state dict from any source umxtools reads weights from: an
open-unmix ``.pth`` (or checkpoint with a ``state_dict``) or model folder, a umxtools model folder
(its raw weights), a demucs ``.th`` file or published name (:mod:`umxtools.models.foreign`), an
MSST ``.ckpt`` (:mod:`umxtools.msst`); every file is read with ``weights_only=True``.
:func:`init_from` copies the entries whose name and shape match into the model and says what
matched. Nothing here writes a file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from umxtools import model_folder
from umxtools.errors import ModelError, UsageError
from umxtools.model_folder import MODEL_JSON, SEPARATOR_JSON

NAMES_SHOWN = 3  # names listed per kind of mismatch in the note


def source_state(source: str, targets: list[str], joint: bool) -> dict[str, torch.Tensor]:
    """The state dict ``--init-from`` names. An open-unmix folder gives the run's target's
    ``<target>.pth``, or for a joint model every target's under the joint model's names
    (``models.<i>.``)."""
    from umxtools.models import foreign
    from umxtools.models.separation_model import load_state

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MODEL_JSON).exists():
            return load_state(model_folder.read_model_json(path).weights)
        if (path / SEPARATOR_JSON).exists():
            found = {t: model_folder.weights_path(path, t) for t in targets}
            if not any(found.values()):
                raise ModelError(path, f"has no weights for {', '.join(targets)} (<target>.pth) to start from")
            if not joint:
                return load_state(found[targets[0]])
            return {f"models.{i}.{k}": v for i, t in enumerate(targets) if found[t] for k, v in load_state(found[t]).items()}
        raise ModelError(path, "not a model folder: it has neither model.json nor separator.json")
    if path.suffix == ".ckpt":
        from umxtools.msst import load_msst_checkpoint

        return load_msst_checkpoint(path)
    if path.suffix == ".th" or str(source) in foreign.DEMUCS_NAMES:
        model = foreign.load_demucs_file(path) if path.suffix == ".th" else foreign.load_demucs_name(str(source))
        model = getattr(model, "models", [model])[0]  # a bag: its first model
        return model.state_dict()
    if path.suffix == ".pth" and path.is_file():
        state = load_state(path)
        return state["state_dict"] if isinstance(state.get("state_dict"), dict) else state
    raise UsageError(None, f"--init-from {source}: no such model folder, .pth, .th, .ckpt file or demucs name")


def msst_stems(state: dict[str, torch.Tensor], source_targets: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
    """An MSST state dict's per-stem mask estimators renumbered to ``targets``' order.

    MSST numbers ``mask_estimators.<i>`` in its config's instruments' order (``source_targets``),
    so matching by name alone would start a model of other targets from the wrong stems'. A stem
    the run does not train is kept under its name (``mask_estimators.<target>.``), which no model
    has: the note lists it as unexpected.
    """
    out = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        index, _, tail = rest.partition(".")
        if prefix != "mask_estimators" or not index.isdigit() or int(index) >= len(source_targets):
            out[key] = value
            continue
        name = source_targets[int(index)]
        at = str(targets.index(name)) if name in targets else name
        out[f"mask_estimators.{at}.{tail}"] = value
    return out


def init_from(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """Copy ``state``'s entries whose name and shape match into ``model``; what matched:
    ``{"loaded", "missing", "unexpected", "mismatched"}``, each a list of names."""
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)]
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(state[k])
    return {"loaded": loaded, "missing": [k for k in own if k not in state], "unexpected": [k for k in state if k not in own],
            "mismatched": mismatched}


def describe(source: str, matched: dict) -> str:
    """The note a run prints: counts, and the first names of each kind of mismatch."""
    parts = [f"{len(matched['loaded'])} loaded"]
    for kind in ("missing", "unexpected", "mismatched"):
        names = matched[kind]
        shown = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
        parts.append(f"{len(names)} {kind}" + (f" ({shown})" if names else ""))
    return f"--init-from {source}: weights whose name and shape match: {'; '.join(parts)}"
