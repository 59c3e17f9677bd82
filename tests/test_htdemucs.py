"""HTDemucs and MSST checkpoints in umxtools: demucs packages and names, model folders, and `separate`.

References: ``demucs.apply.apply_model`` on the model demucs's own ``demucs.states.load_model``
reads from the same ``.th``, and the restated MSST ``demix`` of tests/support/msst_reference.py.
"""

from __future__ import annotations

import random
import urllib.error
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import error_line
from tests.support.msst_reference import msst_demix
from tests.test_segments import (
    RATE,
    SOURCES,
    TINY,
    TOLERANCE,
    tiny_htdemucs,
)
from umxtools.models import MODELS, ModelError, load_class
from umxtools.models.loading import load_model
from umxtools.msst import build_msst_model

demucs_apply = pytest.importorskip("demucs.apply")
demucs_states = pytest.importorskip("demucs.states")

from umxtools.models import foreign  # noqa: E402  (after importorskip: these modules import demucs)
from umxtools.models.htdemucs import HTDemucs  # noqa: E402  (after importorskip: these modules import demucs)


def save_package(model: torch.nn.Module, path, half: bool = True):
    """A demucs package as demucs's ``serialize_model`` writes it (that function needs omegaconf,
    a training dependency, for ``training_args`` only): class, init arguments, state (half)."""
    args, kwargs = model._init_args_kwargs
    package = {"klass": type(model), "args": args, "kwargs": kwargs, "training_args": {},
               "state": demucs_states.get_state(model, None, half=half)}
    torch.save(package, path)
    return path


@pytest.fixture(scope="module")
def th_file(tmp_path_factory):
    return save_package(tiny_htdemucs(3).demucs, tmp_path_factory.mktemp("demucs") / "tiny.th")


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    path = tmp_path_factory.mktemp("songs") / "song.wav"
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, (int(0.8 * RATE) + 11, 2)).astype("float32"), RATE, subtype="FLOAT")
    return path


def read_stems(folder, names):
    return np.stack([sf.read(folder / f"{n}.wav", dtype="float32", always_2d=True)[0].T for n in names])


# --- the model family ------------------------------------------------------------------------------


def test_registry_and_contract():
    assert load_class(MODELS["htdemucs"]) is HTDemucs and HTDemucs.kind == "waveform"
    model = tiny_htdemucs()
    x = torch.randn(2, 2, 3000)
    model.train()
    assert model(x).shape == (2, 4, 2, 3000)
    assert model.demucs.segment == Fraction(1, 2)  # demucs would have made it 3000 / 8000
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 9001)).shape == (1, 4, 2, 9001)  # longer than a segment
    args = model.constructor_args()
    assert args == {"targets": SOURCES, "nb_channels": 2, "sample_rate": RATE, "segment": "1/2", "demucs_args": TINY}
    rebuilt = HTDemucs(**args)
    rebuilt.load_state_dict(model.state_dict())
    with pytest.raises(ModelError, match=r"^htdemucs: demucs_args 'samplerate': give it as 'sample_rate'$"):
        HTDemucs(SOURCES, demucs_args={"samplerate": 8000})
    with pytest.raises(ModelError, match=r"^htdemucs: demucs_args 'chanels' is not an argument of demucs.htdemucs.HTDemucs$"):
        HTDemucs(SOURCES, demucs_args={"chanels": 8})


# --- demucs packages and names ---------------------------------------------------------------------


def test_th_loads_without_running_code_and_equals_demucs(th_file):
    ours = foreign.load_demucs_file(th_file)
    theirs = demucs_states.load_model(str(th_file)).eval()  # demucs's loader: weights_only=False
    for (k, a), (_, b) in zip(sorted(ours.demucs.state_dict().items()), sorted(theirs.state_dict().items())):
        assert torch.equal(a, b), k
    assert ours.segment_length == int(RATE * Fraction(1, 2)) and ours.targets == SOURCES


def test_foreign_globals_and_quantized_packages_are_refused(tmp_path):
    from demucs.hdemucs import HDemucs

    other = tmp_path / "hdemucs.th"
    torch.save({"klass": HDemucs, "args": (), "kwargs": {}, "state": {}}, other)
    with pytest.raises(ModelError, match=r"hdemucs.th: names demucs.hdemucs.HDemucs, which umxtools does not load .*nothing in it was run$"):
        foreign.read_demucs_package(other)
    quantized = tmp_path / "q.th"
    torch.save({"klass": type(tiny_htdemucs().demucs), "args": (), "kwargs": {}, "state": {"__quantized": True}}, quantized)
    with pytest.raises(ModelError, match=r"q.th: holds quantized \(diffq\) weights"):
        foreign.read_demucs_package(quantized)


def test_a_name_offline_names_what_to_fetch_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError) as info:
        load_model("htdemucs_ft")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("htdemucs_ft: cannot download https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/f7e0c4bc-ba3fe64a.th "
                              "(network is unreachable); without network, put ")
    assert message.count("https://") == 5 and message.endswith(f" in {tmp_path / 'torch' / 'hub' / 'checkpoints'}")
    with pytest.raises(ModelError, match=r"^mdx_extra: not a demucs HTDemucs model name"):
        foreign.load_demucs_name("mdx_extra")


# --- separate ----------------------------------------------------------------------------------------


def test_separate_th_equals_apply_model(run_cli, th_file, song, tmp_path):
    r = run_cli("separate", song, "--model", th_file, "--shifts", "1", "--seed", "5", "-o", tmp_path / "out", "-q")
    assert r.code == 0, r.err
    audio, _ = sf.read(song, dtype="float32", always_2d=True)
    random.seed(5)
    with torch.no_grad():
        ref = demucs_apply.apply_model(demucs_states.load_model(str(th_file)).eval(), torch.from_numpy(audio.T)[None], shifts=1,
                                       split=True, overlap=0.25)[0].numpy()
    out = read_stems(tmp_path / "out" / "song", SOURCES)
    assert np.abs(out - ref).max() <= TOLERANCE

    # the same model as a model folder: the same bits through `separate --model FOLDER`
    folder = foreign.write_model_folder(load_model(th_file), tmp_path / "folder")
    r = run_cli("separate", song, "--model", folder, "--shifts", "1", "--seed", "5", "-o", tmp_path / "out2", "-q")
    assert r.code == 0, r.err
    np.testing.assert_array_equal(read_stems(tmp_path / "out2" / "song", SOURCES), out)

    r = run_cli("separate", song, "--model", th_file, "--segment", "0.7", "-o", tmp_path / "out3")
    assert error_line(r) == ("umxtools: error: htdemucs: segment 0.7 s is longer than the 0.5 s this model was trained on; "
                             "give a shorter one or none")


MSST_YAML = """\
audio:
  chunk_size: 2048
  num_channels: 2
  sample_rate: 8000
model:
  dim: 16
  depth: 1
  stereo: true
  num_stems: 2
  time_transformer_depth: 1
  freq_transformer_depth: 1
  freqs_per_bands: !!python/tuple [128, 129]
  dim_head: 8
  heads: 2
  stft_n_fft: 512
  stft_hop_length: 128
  stft_win_length: 512
  mlp_expansion_factor: 1
training:
  instruments: [vocals, other]
  use_amp: true
inference:
  batch_size: 2
  num_overlap: 2
"""


def test_separate_msst_checkpoint_equals_demix(run_cli, song, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(MSST_YAML)
    torch.manual_seed(4)
    model = build_msst_model(config)
    ckpt = tmp_path / "model.ckpt"
    torch.save(model.state_dict(), ckpt)
    r = run_cli("separate", song, "--model", ckpt, "--model-config", config, "-o", tmp_path / "out", "-q")
    assert r.code == 0, r.err
    audio, _ = sf.read(song, dtype="float32", always_2d=True)
    with torch.no_grad():
        ref = msst_demix(model, torch.from_numpy(audio.T), 2048, 2, 2).numpy()
    out = read_stems(tmp_path / "out" / "song", ["vocals", "other"])
    assert np.abs(out - ref).max() <= TOLERANCE

    folder = foreign.write_model_folder(load_model(ckpt, config=config), tmp_path / "folder")
    r = run_cli("separate", song, "--model", folder, "-o", tmp_path / "out2", "-q")
    assert r.code == 0, r.err
    np.testing.assert_array_equal(read_stems(tmp_path / "out2" / "song", ["vocals", "other"]), out)

    r = run_cli("separate", song, "--model", ckpt, "-o", tmp_path / "out3")
    assert error_line(r) == f"umxtools: error: {ckpt}: an MSST checkpoint needs its YAML config (--model-config)"
    r = run_cli("separate", song, "--model", ckpt, "--model-config", config, "--shifts", "2", "-o", tmp_path / "out4")
    assert error_line(r) == "umxtools: error: shifts are demucs's; MSST's inference has none"


def test_shifts_need_a_segment_based_model(run_cli, song, tmp_path):
    from tests.test_separate import write_umx_folder

    umx = write_umx_folder(tmp_path / "umx", hidden=8)
    r = run_cli("separate", song, "--model", umx, "--shifts", "1", "-o", tmp_path / "out")
    assert error_line(r) == ("umxtools: error: shifts, batch size and num_overlap apply to segment-based models "
                             "(HTDemucs, MSST checkpoints)")
