"""open-unmix's published models by name, downloaded through torch.hub as open-unmix does.

The URLs, STFT settings and sizes are those of ``openunmix/__init__.py`` (openunmix 1.3.0):
``torch.hub.load_state_dict_from_url`` keeps each file in ``$TORCH_HOME/hub/checkpoints`` (by
default ``~/.cache/torch/hub/checkpoints``) under the URL's file name, so a file fetched once,
or copied there by hand on a machine without network, is never fetched again. Sizes are read
off the weights themselves (:func:`umxtools.models.loading.umx_from_state`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


@dataclass(frozen=True)
class Published:
    """One published model: per-target weight URLs and the separator settings it was trained with."""

    urls: dict[str, str]
    sample_rate: int
    n_fft: int
    n_hop: int
    nb_channels: int
    description: str


_MUSDB = ("vocals", "drums", "bass", "other")


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


def hub_file(url: str) -> Path:
    """Where torch.hub keeps (or would keep) the file of ``url``."""
    import torch.hub  # noqa: PLC0415

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def load_published(name: str, targets: list[str] | None = None, identity: bool = True):
    """The published model ``name`` as a :class:`~umxtools.models.loading.SeparationModel`.

    Weights come from torch.hub's cache, downloaded when absent. Raises ``ModelError`` when a
    download fails (no network: the message says where to put the file).
    """
    import torch.hub  # noqa: PLC0415

    from umxtools.models import ModelError  # noqa: PLC0415
    from umxtools.models.loading import SeparationModel, file_identity, select_targets, umx_args, umx_from_state  # noqa: PLC0415

    pub = PUBLISHED[name]
    chosen = select_targets(list(pub.urls), targets, name)
    models, files = {}, {}
    for target in chosen:
        url = pub.urls[target]
        cached = hub_file(url).exists()
        try:
            # check_hash off, as open-unmix: the suffix of these names is not guaranteed to be a
            # SHA-256 prefix, and a cached file is never re-checked anyway. torch.hub announces
            # downloads on stdout, where the command prints its outputs: one warning instead
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=False)
        except Exception as exc:  # noqa: BLE001  (URLError, HTTPError, OSError, unpickling errors, ...)
            reason = str(getattr(exc, "reason", "") or exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ModelError(name, f"cannot load {url} ({reason}); without network, put that file in {hub_file(url).parent}") from exc
        if not cached:
            warnings.warn(f"{name}: downloaded {url} to {hub_file(url)}", stacklevel=2)
        models[target] = umx_from_state(state, pub.n_fft, hub_file(url))
        if identity and hub_file(url).exists():
            files[hub_file(url).name] = file_identity(hub_file(url))
    ident = {"source": name, "format": "published", "description": pub.description, "class": "umxtools.models.umx:OpenUnmix",
             "urls": {t: pub.urls[t] for t in chosen}, "args": {t: umx_args(m) for t, m in models.items()}}
    if identity:
        ident["files"] = files
    return SeparationModel(kind="spectrogram", targets=chosen, sample_rate=pub.sample_rate, nb_channels=pub.nb_channels,
                           n_fft=pub.n_fft, n_hop=pub.n_hop, umx=models, identity=ident)
