"""audio-separator's MSST-compatible RoFormer modules, imported without the package's ``__init__``.

The reference of tests/test_roformer.py and of bench/bench_models.py (test-only:
``pip install --no-deps audio-separator`` plus ``einops "beartype<0.19" "rotary-embedding-torch<0.7"
librosa``). Its package ``__init__`` imports onnxruntime, so the roformer modules are imported
under empty stand-in parent packages.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings

INSTALL = ('pip install --no-deps audio-separator && pip install einops "beartype<0.19" '
           '"rotary-embedding-torch<0.7" librosa')
ROFORMER_PACKAGE = "audio_separator.separator.uvr_lib_v5.roformer"


def import_roformer_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``(bs_roformer, mel_band_roformer)``; ImportError (saying what to install) when absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rotary-embedding-torch's torch.cuda.amp deprecation notices
        for name in ("einops", "beartype", "rotary_embedding_torch", "librosa"):
            importlib.import_module(name)
    spec = importlib.util.find_spec("audio_separator")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"audio-separator is not installed; install the test-only reference with: {INSTALL}")
    path = spec.submodule_search_locations[0]
    parts = ROFORMER_PACKAGE.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name not in sys.modules:
            stand_in = types.ModuleType(name)
            stand_in.__path__ = [path + "/" + "/".join(parts[1:depth]) if depth > 1 else path]
            sys.modules[name] = stand_in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return (importlib.import_module(f"{ROFORMER_PACKAGE}.bs_roformer"),
                    importlib.import_module(f"{ROFORMER_PACKAGE}.mel_band_roformer"))
        except ImportError as exc:
            raise ImportError(f"audio-separator's roformer modules do not import ({exc}); install with: {INSTALL}") from exc
