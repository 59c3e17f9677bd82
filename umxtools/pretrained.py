"""open-unmix's published models by name, downloaded into torch.hub's cache as open-unmix does.

The URLs, STFT settings and sizes are those of ``openunmix/__init__.py`` (openunmix 1.3.0). Each
file lives in ``$TORCH_HOME/hub/checkpoints`` (by default ``~/.cache/torch/hub/checkpoints``)
under the URL's file name, where ``torch.hub.load_state_dict_from_url`` keeps it, so a file
fetched once, or copied there by hand on a machine without network, is never fetched again.
Unlike that function (``weights_only=False`` by default in torch 2.13), the file is read with
``weights_only=True`` (:func:`umxtools.models.separation_model.load_state`): a pickle placed in the
cache cannot run code. Sizes are read off the weights themselves
(:func:`umxtools.models.separation_model.umx_from_state`).

``umxtools separate`` without ``--model`` uses :data:`DEFAULT` only when its files are already in
the cache (:func:`default_model`): a default never starts a download of several hundred MB (a
cluster's compute nodes often have no network); naming it (``--model umxl``) does.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

from umxtools import fileio


@dataclass(frozen=True)
class Published:
    """One published model: per-target weight URLs and the separator settings it was trained with."""

    urls: dict[str, str]
    sample_rate: int
    n_fft: int
    n_hop: int
    nb_channels: int
    description: str


def _zenodo(record: str, files: dict[str, str]) -> dict[str, str]:
    return {t: f"https://zenodo.org/records/{record}/files/{t}-{files[t]}.pth" for t in files}


PUBLISHED: dict[str, Published] = {
    "umxhq": Published(
        _zenodo("3370489", {"vocals": "b62c91ce", "drums": "9619578f", "bass": "8d85a5bd", "other": "b52fbbf7"}),
        44100, 4096, 1024, 2, "UMX trained on MUSDB18-HQ (hidden 512)"),
    "umx": Published(
        _zenodo("3370486", {"vocals": "c8df74a5", "drums": "5a48008b", "bass": "646024d3", "other": "f8e132cc"}),
        44100, 4096, 1024, 2, "UMX trained on MUSDB18 (hidden 512)"),
    "umxl": Published(
        _zenodo("5069601", {"vocals": "bccbd9aa", "drums": "69e0ebd4", "bass": "2ca1ce51", "other": "c8c5b3e6"}),
        44100, 4096, 1024, 2, "UMX-L trained on ~400 h of private multitracks (hidden 1024)"),
    "umxse": Published(
        {"speech": "https://zenodo.org/records/3786908/files/speech_f5e0d9f9.pth",
         "noise": "https://zenodo.org/records/3786908/files/noise_04a6fc2d.pth"},
        16000, 1024, 512, 1, "UMX speech enhancement, Voicebank+DEMAND, 16 kHz mono (hidden 256)"),
}


# what `umxtools separate` uses when no model is named, if its weights are in torch.hub's cache
DEFAULT = "umxl"


def hub_file(url: str) -> Path:
    """Where torch.hub keeps (or would keep) the file of ``url``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def download(name: str, url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` with torch.hub's downloader, atomically (a unique temporary name
    beside it, renamed when complete: concurrent jobs never read a half-written file)."""
    import torch.hub

    from umxtools.models import ModelError

    with fileio.atomic(path) as tmp:
        try:
            # no hash check, as open-unmix: the suffix of these names is not guaranteed to be a
            # SHA-256 prefix. torch.hub announces downloads on stdout, where the command prints
            # its outputs: the caller warns once instead
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.hub.download_url_to_file(url, str(tmp), progress=False)
        except (URLError, HTTPException, ValueError) as exc:  # the network or the URL; a full disk is fileio's OutputError
            reason = str(getattr(exc, "reason", "") or exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ModelError(name, f"cannot download {url} ({reason})") from exc


def missing_files(name: str, targets: list[str] | None = None) -> list[str]:
    """The URLs of the weights of ``name`` (its ``targets``) that are not in torch.hub's cache."""
    from umxtools.models.separation_model import select_targets

    pub = PUBLISHED[name]
    return [pub.urls[t] for t in select_targets(list(pub.urls), targets, name) if not hub_file(pub.urls[t]).exists()]


def _put_them(urls: list[str]) -> str:
    where = hub_file(urls[0]).parent
    return f"put {'this file' if len(urls) == 1 else 'these files'} in {where}: {', '.join(urls)}"


def default_model(targets: list[str] | None = None) -> str:
    """:data:`DEFAULT` when its weights (of ``targets``) are in torch.hub's cache; else
    ``ModelError`` naming every missing file's URL and where to put it (nothing is downloaded)."""
    from umxtools.models import ModelError

    missing = missing_files(DEFAULT, targets)
    if missing:
        raise ModelError(DEFAULT, f"no --model given, and the default model {DEFAULT} is not in torch.hub's cache; "
                                  f"{_put_them(missing)} (or pass --model {DEFAULT} to download them, or --model MODEL_FOLDER)")
    return DEFAULT


def load_published(name: str, targets: list[str] | None = None, identity: bool = True):
    """The published model ``name`` as a :class:`~umxtools.models.separation_model.SeparationModel`.

    Weights come from torch.hub's cache, downloaded when absent. Raises ``ModelError`` when a
    download fails (no network: the message names every file still missing and where to put
    them) or when a cached file is not plain weights (it is refused without running anything in it).
    """
    from umxtools.models import ModelError
    from umxtools.models.separation_model import (  # torch: imported when a model loads
        SeparationModel,
        file_identity,
        load_state,
        select_targets,
        umx_args,
        umx_from_state,
    )

    pub = PUBLISHED[name]
    chosen = select_targets(list(pub.urls), targets, name)
    missing = missing_files(name, chosen)
    for i, url in enumerate(missing):
        try:
            download(name, url, hub_file(url))
        except ModelError as exc:
            raise ModelError(name, f"{exc.problem}; without network, {_put_them(missing[i:])}") from exc
        warnings.warn(f"{name}: downloaded {url} to {hub_file(url)}", stacklevel=2)
    models, files = {}, {}
    for target in chosen:
        path = hub_file(pub.urls[target])
        models[target] = umx_from_state(load_state(path), pub.n_fft, path)
        if identity:
            files[path.name] = file_identity(path)
    ident = {"source": name, "format": "published", "description": pub.description, "class": "umxtools.models.umx:OpenUnmix",
             "urls": {t: pub.urls[t] for t in chosen}, "args": {t: umx_args(m) for t, m in models.items()}}
    if identity:
        ident["files"] = files
    return SeparationModel(kind="spectrogram", targets=chosen, sample_rate=pub.sample_rate, nb_channels=pub.nb_channels,
                           n_fft=pub.n_fft, n_hop=pub.n_hop, umx=models, identity=ident)
