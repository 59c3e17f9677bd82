"""BS-RoFormer and Mel-Band RoFormer against an independent reference, and MSST configs/checkpoints.

The reference is the ``audio-separator`` package's MSST-compatible roformer modules, imported by
tests/support/roformer_reference.py (which says what to install). Both models get the same random weights; outputs must agree
to 1e-5 in float32.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.support.roformer_reference import INSTALL, import_roformer_modules
from umxtools.models import MODELS, ModelError, load_class
from umxtools.losses import loss_function
from umxtools.models.bsroformer import DEFAULT_FREQS_PER_BANDS, BSRoformer
from umxtools.models.melroformer import MelBandRoformer, mel_filterbank
from umxtools.msst import MsstError, build_msst_model, load_msst_checkpoint, read_msst_config

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    """``(bs_roformer, mel_band_roformer)`` modules of audio-separator, imported without its ``__init__``."""
    try:
        return import_roformer_modules()
    except ImportError as exc:
        pytest.skip(f"reference not importable: {exc}")


# n_fft 512 (257 bins), hop 128: tiny models that still have several bands, frames and heads
SMALL = dict(dim=16, dim_head=8, heads=2, stft_n_fft=512, stft_win_length=512, stft_hop_length=128,
             time_transformer_depth=1, freq_transformer_depth=1, attn_dropout=0.0, ff_dropout=0.0)
BANDS_A = (1,) * 16 + (4,) * 16 + (16,) * 8 + (49,)
BANDS_B = (128, 129)

BS_CONFIGS = {
    "stereo-4stems-depth1-mask2": dict(SMALL, depth=1, stereo=True, num_stems=4, freqs_per_bands=BANDS_A, mask_estimator_depth=2),
    "mono-1stem-depth2-mask1-noflash": dict(SMALL, depth=2, stereo=False, num_stems=1, freqs_per_bands=BANDS_A,
                                            mask_estimator_depth=1, flash_attn=False),
    "stereo-1stem-2bands-linear-tf2": dict(SMALL, depth=1, stereo=True, num_stems=1, freqs_per_bands=BANDS_B,
                                           linear_transformer_depth=1, time_transformer_depth=2, freq_transformer_depth=2),
}
MEL_CONFIGS = {
    "stereo-4stems-8bands-8k": dict(SMALL, depth=1, stereo=True, num_stems=4, num_bands=8, sample_rate=8000, mask_estimator_depth=1),
    "mono-1stem-16bands-44k-depth2-mask2-noflash": dict(SMALL, depth=2, stereo=False, num_stems=1, num_bands=16, sample_rate=44100,
                                                        mask_estimator_depth=2, flash_attn=False),
    "stereo-2stems-24bands-16k": dict(SMALL, depth=1, stereo=True, num_stems=2, num_bands=24, sample_rate=16000,
                                      mask_estimator_depth=1),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every trained parameter drawn anew (norm gains around 1), so no layer hides behind its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("freqs"):  # the reference's frozen rotary table
                continue
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1.0 + noise if name.endswith("gamma") else noise)


def audio(channels: int, samples: int, seed: int = 1) -> torch.Tensor:
    """``(2, channels, samples)`` uniform noise in [-0.5, 0.5)."""
    return torch.rand(2, channels, samples, generator=torch.Generator().manual_seed(seed)) - 0.5


def pair(reference_cls, cls, config: dict):
    """The reference model with random weights and ours with the same weights, both in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's stft without a window, "Use Sage Attention" etc.
        ref = reference_cls(**config)
    randomize(ref, seed=0)
    ours = cls(**config)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def compare(ref, ours, config: dict, samples: int = 4096) -> float:
    """Max |difference| of the outputs on the same input, over the samples both return."""
    x = audio(2 if config["stereo"] else 1, samples)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    nb_stems = config["num_stems"]
    assert got.shape == (2, nb_stems, x.shape[1], samples)
    if nb_stems == 1:  # the reference drops the stems axis of one-stem models
        expected = expected.unsqueeze(1)
    common = min(expected.shape[-1], samples)
    assert expected.shape[:-1] == got.shape[:-1] and common > samples - config["stft_hop_length"]
    assert got.abs().max() > 1e-3  # a real signal, not a vanishing one
    return float((expected[..., :common] - got[..., :common]).abs().max())


def check_state_dicts(ref, ours) -> None:
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs)
    assert all(mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype for k in mine)
    ref.load_state_dict(mine)  # and back: the reference loads ours


@pytest.mark.parametrize("name", list(BS_CONFIGS))
def test_bsroformer_matches_reference(reference, name):
    config = BS_CONFIGS[name]
    ref, ours = pair(reference[0].BSRoformer, BSRoformer, config)
    check_state_dicts(ref, ours)
    assert compare(ref, ours, config) < TOLERANCE


@pytest.mark.parametrize("name", list(MEL_CONFIGS))
def test_melroformer_matches_reference(reference, name):
    config = MEL_CONFIGS[name]
    ref, ours = pair(reference[1].MelBandRoformer, MelBandRoformer, config)
    check_state_dicts(ref, ours)
    assert torch.equal(ours.freq_indices, ref.freq_indices)
    assert compare(ref, ours, config) < TOLERANCE


def test_length_not_a_multiple_of_the_hop(reference):
    """MSST's band-split model keeps the input length; audio-separator's returns whole hops: same values."""
    config = BS_CONFIGS["stereo-1stem-2bands-linear-tf2"]
    ref, ours = pair(reference[0].BSRoformer, BSRoformer, config)
    assert compare(ref, ours, config, samples=4000) < TOLERANCE


def test_msst_loss_matches_reference(reference):
    config = dict(MEL_CONFIGS["stereo-2stems-24bands-16k"], multi_stft_resolutions_window_sizes=(512, 256),
                  multi_stft_hop_size=64, multi_stft_resolution_loss_weight=0.5)
    ref, ours = pair(reference[1].MelBandRoformer, MelBandRoformer, config)
    x, target = audio(2, 4096), audio(2, 4096, seed=2)[:, None].expand(-1, 2, -1, -1) * 0.5
    with torch.no_grad():
        total, (wave, multi) = ref(x, target, return_loss_breakdown=True)
        got_total, (got_wave, got_multi) = ours(x, target, return_loss_breakdown=True)
    for a, b in ((total, got_total), (wave, got_wave), (multi, got_multi)):
        assert abs(float(a) - float(b)) < TOLERANCE * max(1.0, abs(float(a)))
    one = BSRoformer(**dict(BS_CONFIGS["mono-1stem-depth2-mask1-noflash"], multi_stft_resolutions_window_sizes=(256,)))
    y = audio(1, 2048)
    loss = one(y, y * 0.3)  # a one-stem target may leave out the stems axis, as in MSST
    assert loss.dim() == 0 and loss > 0


def test_l1_plus_cstft_is_msst_training_loss(reference):
    """``--loss l1+cstft`` (the roformers' default) of one target is the loss MSST's model returns
    with its default multi-resolution settings (stft_n_fft 2048, windows 4096..256, hop 147)."""
    config = dict(SMALL, stft_n_fft=2048, stft_win_length=2048, stft_hop_length=512, depth=1, stereo=True, num_stems=1,
                  freqs_per_bands=DEFAULT_FREQS_PER_BANDS)
    ref, ours = pair(reference[0].BSRoformer, BSRoformer, config)
    x, target = audio(2, 8192), audio(2, 8192, seed=2) * 0.5
    with torch.no_grad():
        expected = ref(x, target)
        got = loss_function("l1+cstft")(ours(x), target[:, None], x)
    assert got.shape == (1,)
    assert abs(float(got[0]) - float(expected)) < TOLERANCE * float(expected)


def test_flash_and_explicit_attention_agree():
    config = dict(MEL_CONFIGS["stereo-4stems-8bands-8k"], linear_transformer_depth=1)
    flash = MelBandRoformer(**config)
    randomize(flash, seed=3)
    explicit = MelBandRoformer(**dict(config, flash_attn=False))
    explicit.load_state_dict(flash.state_dict())
    x = audio(2, 2048)
    with torch.no_grad():
        assert (flash.eval()(x) - explicit.eval()(x)).abs().max() < TOLERANCE


@pytest.mark.parametrize("sample_rate,n_fft,n_mels", [(44100, 2048, 60), (44100, 512, 16), (8000, 512, 8), (16000, 512, 24),
                                                      (48000, 1024, 40), (22050, 256, 5)])
def test_mel_filterbank_equals_librosa(sample_rate, n_fft, n_mels):
    filters = pytest.importorskip("librosa.filters", reason=f"librosa (test-only) is not installed: {INSTALL}")
    expected = filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)
    got = mel_filterbank(sample_rate, n_fft, n_mels)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_model_contract():
    for name, cls in (("bsroformer", BSRoformer), ("melroformer", MelBandRoformer)):
        assert load_class(MODELS[name]) is cls and cls.kind == "waveform"
    # what umxtools train offers: targets and nb_channels set num_stems and stereo
    model = BSRoformer(**dict(BS_CONFIGS["stereo-4stems-depth1-mask2"], num_stems=None, stereo=None),
                       targets=["vocals", "drums"], nb_channels=2)
    assert (model.num_stems, model.stereo) == (2, True)
    assert model(audio(2, 1000)).shape == (2, 2, 2, 1000)
    with pytest.raises(ModelError, match=r"^BSRoformer: num_stems=4 but 2 targets \(vocals, drums\)$"):
        BSRoformer(**BS_CONFIGS["stereo-4stems-depth1-mask2"], targets=["vocals", "drums"])
    with pytest.raises(ModelError, match=r"^BSRoformer: freqs_per_bands must be .* summing to stft_n_fft // 2 \+ 1 = 257; "
                                         r"they sum to 256 over 2 bands$"):
        BSRoformer(**dict(BS_CONFIGS["stereo-4stems-depth1-mask2"], freqs_per_bands=(128, 128)))
    with pytest.raises(ModelError, match=r"^MelBandRoformer\(stereo=True\) takes \(batch, 2, samples\), got \(2, 1, 1000\)$"):
        MelBandRoformer(**MEL_CONFIGS["stereo-4stems-8bands-8k"])(audio(1, 1000))


MSST_YAML = """\
audio:
  chunk_size: 8192
  n_fft: 512
  num_channels: 2
  sample_rate: 8000

model:
  dim: 16
  depth: 1
  stereo: true
  num_stems: {num_stems}
  time_transformer_depth: 1
  freq_transformer_depth: 1
  linear_transformer_depth: 0
  {bands}
  dim_head: 8
  heads: 2
  attn_dropout: 0.1
  ff_dropout: 0.1
  flash_attn: True
  dim_freqs_in: 257
  stft_n_fft: 512
  stft_hop_length: 128
  stft_win_length: 512
  stft_normalized: False
  mask_estimator_depth: 2
  multi_stft_resolution_loss_weight: 1.0
  multi_stft_resolutions_window_sizes: !!python/tuple
  - 512
  - 256
  multi_stft_hop_size: 147
  multi_stft_normalized: False
  mlp_expansion_factor: 2
  use_torch_checkpoint: False
  skip_connection: False

training:
  batch_size: 2
  instruments:
  - vocals
  - other
  target_instrument: {target}
  lr: 1.0e-05
  use_amp: true

inference:
  batch_size: 4
  dim_t: 65
  num_overlap: 2
"""


def test_msst_config_and_checkpoint(tmp_path):
    path = tmp_path / "config_vocals_mel_band_roformer.yaml"
    path.write_text(MSST_YAML.format(num_stems=1, bands="num_bands: 8\n  sample_rate: 8000", target="vocals"))
    config = read_msst_config(path)
    assert config.targets == ["vocals"] and config.architecture() == "mel_band_roformer"
    assert (config.sample_rate, config.chunk_size, config.num_overlap, config.batch_size) == (8000, 8192, 2, 4)
    assert config.model["multi_stft_resolutions_window_sizes"] == [512, 256] and config.model["num_bands"] == 8
    model = build_msst_model(config)
    assert isinstance(model, MelBandRoformer) and not model.training and model.num_stems == 1
    # MSST .ckpt variants: a plain state dict, or wrapped in 'state_dict' with 'model.' prefixes
    randomize(model, seed=5)
    wrapped = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    assert list(load_msst_checkpoint(wrapped)) == list(model.state_dict())
    loaded = build_msst_model(path, wrapped)
    x = audio(2, 2048)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))

    two = tmp_path / "config_bs_roformer.yaml"
    two.write_text(MSST_YAML.format(num_stems=2, bands="freqs_per_bands: !!python/tuple [128, 129]", target="null"))
    config = read_msst_config(two)
    assert config.targets == ["vocals", "other"] and config.architecture() == "bs_roformer"
    bs = build_msst_model(config)
    assert isinstance(bs, BSRoformer) and bs.freqs_per_bands == [128, 129] and bs.num_stems == 2
    with pytest.raises(MsstError, match=r"model\.ckpt: does not fit the bs_roformer model of config_bs_roformer\.yaml \(.*\)$"):
        build_msst_model(config, wrapped)


def test_msst_errors_are_one_line(tmp_path):
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(MsstError, match=rf"^{missing}: not a readable checkpoint \(\w+: .*\)$"):
        load_msst_checkpoint(missing)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(MsstError, match=rf"^{text}: not a readable checkpoint"):
        load_msst_checkpoint(text)
    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(MsstError, match=rf"^{tensor}: not a state dict"):
        load_msst_checkpoint(tensor)
    yaml_path = tmp_path / "broken.yaml"
    yaml_path.write_text("model: [unclosed\n")
    with pytest.raises(MsstError, match=rf"^{yaml_path}: not a readable YAML config \(.*\)$"):
        read_msst_config(yaml_path)
    yaml_path.write_text("audio:\n  sample_rate: 44100\n")
    with pytest.raises(MsstError, match=rf"^{yaml_path}: not an MSST config: no 'model:' section$"):
        read_msst_config(yaml_path)
    yaml_path.write_text("model:\n  dim: 8\n  depth: 1\n  num_stems: 2\ntraining:\n  instruments: [vocals]\n")
    with pytest.raises(MsstError, match=r"num_stems is 2 but training: gives 1 output\(s\) \(vocals\)$"):
        read_msst_config(yaml_path)
    yaml_path.write_text("model:\n  dim: 8\n  depth: 1\n  unknown_knob: 3\n  num_bands: 4\n")
    with pytest.raises(MsstError, match=r"model: does not fit MelBandRoformer \(.*unknown_knob.*\)$"):
        build_msst_model(yaml_path)
    yaml_path.write_text("model: !!python/object/apply:os.system ['true']\n")  # safe loading: no code from configs
    with pytest.raises(MsstError, match="not a readable YAML config"):
        read_msst_config(yaml_path)
