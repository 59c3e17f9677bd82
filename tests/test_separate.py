"""Separation (umxtools.separation, umxtools.filtering): open-unmix's Separator, exactly, streamed.

The reference is the openunmix package itself (the ``openunmix`` fixture) and the shared
openunmix-compat fixture (its expected stems were made by openunmix 1.3.0). Models here are tiny
(hidden 8-16) and audio a few seconds, so that every setting can be compared in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import COMPAT, SAMPLE, need_shared
from umxtools import filtering
from umxtools.errors import UsageError
from umxtools.models.loading import SeparationModel, load_model
from umxtools.models.umx import OpenUnmix
from umxtools.separation import WAVE_BLOCK, SeparationSettings, Separator, parse_aggregate
from umxtools.transforms import CentredSTFT

TARGETS = ["vocals", "drums", "bass", "other"]
RATE = 44100


# --- helpers (also used by tests/test_separate_cli.py) --------------------------------------------


def random_umx(seed: int, hidden: int = 8, nb_bins: int = 2049, nb_channels: int = 2, max_bin: int | None = 1487,
               nb_layers: int = 1, unidirectional: bool = False) -> OpenUnmix:
    """An OpenUnmix with every parameter and batch-norm statistic random (so no buffer can be
    dropped or swapped unnoticed), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = OpenUnmix(nb_bins=nb_bins, nb_channels=nb_channels, hidden_size=hidden, nb_layers=nb_layers,
                      unidirectional=unidirectional, max_bin=max_bin)
    state = {}
    for name, value in model.state_dict().items():
        if not value.is_floating_point():
            state[name] = value
        elif "running_var" in name or name.endswith(("input_scale", "output_scale")):
            state[name] = torch.rand(value.shape, generator=g) + 0.5
        elif name.endswith("output_mean") or name.endswith(".weight") and name.startswith("bn"):
            state[name] = 1 + 0.3 * torch.randn(value.shape, generator=g)
        else:
            state[name] = 0.3 * torch.randn(value.shape, generator=g)
    model.load_state_dict(state)
    return model.freeze()


def write_umx_folder(folder: Path, targets=TARGETS, seed: int = 0, rate: int = RATE, nfft: int = 4096, nhop: int = 1024,
                     nb_channels: int = 2, **kwargs) -> Path:
    """An open-unmix model folder (separator.json, <target>.pth, <target>.json) of random models."""
    folder.mkdir(parents=True, exist_ok=True)
    max_bin = kwargs.pop("max_bin", min(1487, nfft // 2 + 1))
    for i, t in enumerate(targets):
        model = random_umx(seed + i, nb_bins=nfft // 2 + 1, nb_channels=nb_channels, max_bin=max_bin, **kwargs)
        torch.save(model.state_dict(), folder / f"{t}.pth")
        (folder / f"{t}.json").write_text(json.dumps({"args": {"nfft": nfft, "nhop": nhop, "nb_channels": nb_channels,
                                                               "hidden_size": model.hidden_size}, "rate": float(rate)}))
    (folder / "separator.json").write_text(json.dumps({"targets": list(targets), "rate": float(rate), "sample_rate": float(rate),
                                                       "nfft": nfft, "nhop": nhop, "nb_channels": nb_channels}))
    return folder


def music(seconds: float, rate: int = RATE, seed: int = 0, silence: tuple[float, float] | None = (0.5, 0.9)) -> np.ndarray:
    """``(2, samples)`` float32: a few harmonic tones, noise bursts and a bass line, with a stretch
    of digital silence (exactly-zero STFT bins exercise open-unmix's zero-phase rule)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    x = np.zeros((2, n))
    for f0, pan in ((220.0, 0.3), (330.0, 0.7), (55.0, 0.5)):
        tone = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
        x += np.array([[1 - pan], [pan]]) * tone * 0.15
    bursts = (np.sin(2 * np.pi * 4 * t) > 0.6) * rng.standard_normal((2, n)) * 0.2
    x += bursts
    if silence is not None:
        x[:, round(silence[0] * rate):round(silence[1] * rate)] = 0
    return x.astype(np.float32)


def umx_model(models: dict[str, OpenUnmix], rate: int = RATE, nfft: int = 4096, nhop: int = 1024, nb_channels: int = 2):
    return SeparationModel("spectrogram", list(models), rate, nb_channels, nfft, nhop, umx=models)


# --- the reference: the shared open-unmix fixture -------------------------------------------------


def test_compat_fixture_reproduces_openunmix_output():
    folder = need_shared(COMPAT / "model")
    mixture = need_shared(SAMPLE / "hq" / "train" / "Music Delta - 80s Rock" / "mixture.wav")
    settings = json.loads((COMPAT / "expected" / "settings.json").read_text())["separator"]
    assert settings["stft_center"] is True
    model = load_model(folder, settings["targets"])
    sep = Separator(model, SeparationSettings(niter=settings["niter"], softmask=settings["softmask"], residual=settings["residual"],
                                              wiener_win_len=settings["wiener_win_len"]))
    audio, rate = sf.read(mixture, dtype="float32", always_2d=True)
    assert rate == model.sample_rate
    out = sep.separate(audio.T)
    assert list(out) == settings["targets"]
    for target, estimate in out.items():
        expected, _ = sf.read(COMPAT / "expected" / f"{target}.wav", dtype="float32", always_2d=True)
        assert estimate.shape == expected.T.shape == audio.T.shape
        assert np.abs(estimate - expected.T).max() <= 8e-7, target  # measured 4.5e-8 to 7.5e-8


# --- the reference: openunmix.model.Separator with other settings ------------------------------


SETTINGS = [
    {"niter": 1},
    {"niter": 0},
    {"niter": 2},
    {"niter": 1, "softmask": True},
    {"niter": 1, "residual": True},
    {"niter": 0, "residual": True, "softmask": True},
    {"niter": 1, "wiener_win_len": 20},
    {"niter": 2, "wiener_win_len": None, "residual": True},
]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_matches_openunmix_separator(openunmix, kwargs):
    import openunmix.model as ou

    models = {t: random_umx(i, hidden=16) for i, t in enumerate(TARGETS)}
    audio = music(1.5)  # 65 frames: four Wiener windows of 20, one of 65
    ref = ou.Separator({t: _reference_copy(ou, m) for t, m in models.items()}, **kwargs).eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(audio)[None])[0].numpy()  # (sources, channels, samples)
    out = Separator(umx_model(models), SeparationSettings(**kwargs)).separate(audio)
    assert list(out) == TARGETS + (["residual"] if kwargs.get("residual") else [])
    got = np.stack(list(out.values()))
    assert got.shape == expected.shape
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 2.5e-6  # measured 6e-8 to 1.2e-7, 2.4e-7 with niter 0


@pytest.mark.parametrize("mono_input", [False, True])
def test_mono_models_match_openunmix(openunmix, mono_input):
    """open-unmix's mono models (umxse-like: 16 kHz, n_fft 1024) see the channel mean of the
    stereo STFT magnitude; mono input is duplicated to stereo before the STFT."""
    import openunmix.model as ou

    models = {t: random_umx(i, hidden=8, nb_bins=513, nb_channels=1, max_bin=None) for i, t in enumerate(["speech", "noise"])}
    audio = music(1.5, rate=16000)
    if mono_input:
        audio = np.repeat(audio[:1], 2, axis=0)
    # with mono input to a mono model every source's channels are equal: open-unmix's EM then
    # divides by a zero determinant (NaN everywhere), so its output is compared without EM
    niter = 0 if mono_input else 1
    ref = ou.Separator({t: _reference_copy(ou, m) for t, m in models.items()}, niter=niter, n_fft=1024, n_hop=512,
                       nb_channels=1, sample_rate=16000.0).eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(audio)[None])[0].numpy()
    model = umx_model(models, rate=16000, nfft=1024, nhop=512, nb_channels=1)
    got = np.stack(list(Separator(model, SeparationSettings(niter=niter)).separate(audio).values()))
    assert got.shape == expected.shape == (2, 2, audio.shape[1])
    np.testing.assert_array_equal(got, expected)  # measured: no difference
    if mono_input:
        # EM on identical channels: where open-unmix's float32 determinant is exactly 0 its output
        # is NaN (most samples, through the inverse STFT); umxtools filters those bins in float64
        # (tests/test_separate.py::test_singular_bins_are_filtered_in_float64) and equals
        # open-unmix everywhere else. (open-unmix in float64 is no tighter reference here: its
        # float32 determinants of nearly singular bins are rounding noise, 4e-3 off in samples
        # where float32 open-unmix is finite.)
        with torch.no_grad():
            expected = ou.Separator(ref.target_models, niter=1, n_fft=1024, n_hop=512, nb_channels=1,
                                    sample_rate=16000.0)(torch.from_numpy(audio)[None])[0].numpy()
        got = np.stack(list(Separator(model, SeparationSettings(niter=1)).separate(audio).values()))
        finite = np.isfinite(expected)
        assert 0.5 < 1 - finite.mean() < 1  # NaN in most samples, not all
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got[finite], expected[finite])  # measured: no difference


def _reference_copy(ou, model: OpenUnmix):
    ref = ou.OpenUnmix(nb_bins=model.nb_output_bins, nb_channels=model.nb_channels, hidden_size=model.hidden_size,
                       nb_layers=model.lstm.num_layers, unidirectional=not model.lstm.bidirectional, max_bin=model.nb_bins)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def test_wiener_is_bit_exact_with_openunmix_filtering(openunmix):
    import openunmix.filtering as of

    g = torch.Generator().manual_seed(0)
    nb_frames, nb_bins = 230, 65  # more than one 200-frame batch of open-unmix's EM statistics
    mix = torch.complex(torch.randn(2, nb_frames, nb_bins, generator=g), torch.randn(2, nb_frames, nb_bins, generator=g)) * 30
    mix[:, 10:20] = 0  # silent frames: open-unmix's zero-phase rule
    mags = torch.rand(3, 2, nb_frames, nb_bins, generator=g) * mix.abs()[None]
    for iterations, softmask, residual in ((0, False, False), (1, False, False), (3, False, True), (2, True, False), (1, True, True)):
        theirs = of.wiener(mags.permute(2, 3, 1, 0).contiguous(), torch.view_as_real(mix.permute(1, 2, 0).contiguous()).clone(),
                           iterations, softmask=softmask, residual=residual)  # (frames, bins, channels, 2, sources)
        theirs = torch.view_as_complex(theirs.permute(4, 2, 0, 1, 3).contiguous())
        ours = filtering.wiener(mags, mix, iterations, softmask=softmask, residual=residual)
        assert ours.shape == theirs.shape == (3 + residual, 2, nb_frames, nb_bins)
        assert torch.equal(ours, theirs), (iterations, softmask, residual)


def test_singular_bins_are_filtered_in_float64(openunmix):
    """Sources whose channels are exactly proportional make Cxx singular in float32: open-unmix
    divides by a zero determinant there (NaN); umxtools filters those bins in float64 and stays
    bit-exact with open-unmix everywhere else."""
    import openunmix.filtering as of

    g = torch.Generator().manual_seed(1)
    one = torch.complex(torch.randn(1, 40, 33, generator=g), torch.randn(1, 40, 33, generator=g)) * 50
    mix = one.expand(2, -1, -1).contiguous()  # identical channels
    mags = (torch.rand(3, 1, 40, 33, generator=g) * mix.abs()[:1]).contiguous()  # a mono model's estimates
    theirs = of.wiener(mags.permute(2, 3, 1, 0).contiguous(), torch.view_as_real(mix.permute(1, 2, 0).contiguous()).clone(), 1)
    theirs = torch.view_as_complex(theirs.permute(4, 2, 0, 1, 3).contiguous())  # (sources, channels, frames, bins)
    broken = torch.isnan(theirs.abs())
    assert broken.any() and not broken.all()
    ours = filtering.wiener(mags, mix, 1)
    assert torch.isfinite(torch.view_as_real(ours)).all()
    assert torch.equal(ours[~broken], theirs[~broken])
    exact = filtering.wiener(mags.double(), mix.to(torch.complex128), 1)  # no singular bins in float64
    # measured: 1.2e-7 relative (1.3e-5 absolute on values up to 113)
    torch.testing.assert_close(ours[broken].to(torch.complex128), exact[broken], rtol=1.2e-6, atol=0)


# --- the streamed pieces against their whole-signal equivalents -----------------------------------


def test_umx_in_two_halves_equals_forward():
    model = random_umx(3, hidden=16, nb_layers=2)
    mag = torch.rand(1, 2, 2049, 40) * 5
    whole = model(mag)[0]  # (channels, bins, frames)
    x = mag[0].permute(2, 0, 1)[:, None]  # (frames, 1, channels, bins)
    h = torch.cat([model.encode(x[:17]), model.encode(x[17:])])
    lstm = model.context(h)
    # decode: (frames, 1, channels, bins) -> the separator's (channels, frames, bins)
    halves = torch.cat([model.decode(h[a:b], lstm[a:b], x[a:b])[:, 0].permute(1, 0, 2) for a, b in ((0, 25), (25, 40))], dim=1)
    torch.testing.assert_close(halves, whole.transpose(1, 2), rtol=1e-6, atol=1e-6)


# --- behaviour ---------------------------------------------------------------------------------


def test_silence_in_gives_finite_zeros_out():
    models = {t: random_umx(i) for i, t in enumerate(TARGETS)}
    zeros = np.zeros((2, 20000), np.float32)
    out = Separator(umx_model(models), SeparationSettings()).separate(zeros)
    assert all(np.array_equal(x, np.zeros_like(x)) for x in out.values())
    # with the residual, open-unmix's zero-phase rule gives a constant unit spectrum, which the
    # Hann window's zero first sample turns into (near) silence again
    out = Separator(umx_model(models), SeparationSettings(residual=True, softmask=True)).separate(zeros)
    assert all(np.isfinite(x).all() and np.abs(x).max() < 1e-6 for x in out.values())


def test_aggregate_sums_outputs_and_replaces_them():
    models = {t: random_umx(i) for i, t in enumerate(TARGETS)}
    audio = music(1.5)
    plain = Separator(umx_model(models), SeparationSettings()).separate(audio)
    agg = parse_aggregate(["vocals=vocals", "accompaniment=drums+bass+other"])
    out = Separator(umx_model(models), SeparationSettings(aggregate=agg)).separate(audio)
    assert list(out) == ["vocals", "accompaniment"]
    np.testing.assert_array_equal(out["vocals"], plain["vocals"])
    np.testing.assert_array_equal(out["accompaniment"], plain["drums"] + plain["bass"] + plain["other"])


def test_setting_errors():
    models = {"vocals": random_umx(0)}
    with pytest.raises(UsageError, match="needs two or more outputs"):
        Separator(umx_model(models), SeparationSettings(niter=1))
    Separator(umx_model(models), SeparationSettings(niter=1, residual=True))
    Separator(umx_model(models), SeparationSettings(niter=0))
    with pytest.raises(UsageError, match="'piano' is not among the outputs"):
        Separator(umx_model(models), SeparationSettings(niter=0, aggregate={"x": ["vocals", "piano"]}))
    with pytest.raises(UsageError, match="bidirectional UMX"):
        Separator(umx_model(models), SeparationSettings(niter=0, segment=5.0))
    for bad in (["x"], ["=a"], ["x=a+"], ["x=a", "x=b"]):
        with pytest.raises(UsageError):
            parse_aggregate(bad)


# --- other models: whole modules, joint models, waveform models, segments ------------------------------


class _Gains(torch.nn.Module):
    """A waveform "model" scaling the input by a fixed gain per target: pointwise, so segments with
    cross-fades must give exactly what the whole signal gives."""

    kind = "waveform"

    def __init__(self, gains=(0.5, 0.25, 0.125)):
        super().__init__()
        self.register_buffer("gains", torch.tensor(gains))

    def forward(self, x):  # (batch, channels, samples) -> (batch, targets, channels, samples)
        return x[:, None] * self.gains[None, :, None, None]


class _Counter(torch.nn.Module):
    """Outputs the number of times it was called: shows where segments start and how they blend."""

    kind = "waveform"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.full((x.shape[0], 1, x.shape[1], x.shape[2]), float(self.calls))


def _wave_model(module, targets, rate=1000):
    return SeparationModel("waveform", list(targets), rate, 2, module=module, module_targets=list(targets))


def test_waveform_model_whole_segmented_and_residual():
    audio = music(3.0, rate=1000, silence=None)
    whole = Separator(_wave_model(_Gains(), ["a", "b", "c"]), SeparationSettings(residual=True)).separate(audio)
    assert list(whole) == ["a", "b", "c", "residual"]
    np.testing.assert_allclose(whole["a"], audio * 0.5, rtol=0, atol=0)
    np.testing.assert_array_equal(whole["residual"], audio - (whole["a"] + whole["b"] + whole["c"]))
    seg = Separator(_wave_model(_Gains(), ["a", "b", "c"]), SeparationSettings(residual=True, segment=0.7, overlap=0.3)).separate(audio)
    for name in whole:
        np.testing.assert_allclose(seg[name], whole[name], rtol=0, atol=1e-6)


def test_a_whole_run_longer_than_one_output_block_is_streamed_whole():
    # the whole-track output is handed out in blocks of WAVE_BLOCK samples: every block, not only the first
    audio = np.random.default_rng(0).standard_normal((2, 2 * WAVE_BLOCK + 1234)).astype(np.float32)
    sep = Separator(_wave_model(_Gains(), ["a", "b", "c"]), SeparationSettings(residual=True))
    blocks = list(sep.stream(audio))
    assert [b["a"].shape[-1] for b in blocks] == [WAVE_BLOCK, WAVE_BLOCK, 1234]
    out = {name: np.concatenate([b[name] for b in blocks], axis=-1) for name in blocks[0]}
    np.testing.assert_array_equal(out["a"], audio * np.float32(0.5))
    np.testing.assert_array_equal(out["residual"], audio - (out["a"] + out["b"] + out["c"]))


def test_segments_are_crossfaded_linearly():
    # 1000 Hz, segments of 100 samples overlapping by 20: segment k covers [80k, 80k + 100)
    sep = Separator(_wave_model(_Counter(), ["x"]), SeparationSettings(segment=0.1, overlap=0.2))
    out = sep.separate(np.ones((2, 250), np.float32))["x"][0]
    assert sep.model.module.calls == 3
    fade = (np.arange(20) + 0.5) / 20
    np.testing.assert_allclose(out[:80], 1)
    np.testing.assert_allclose(out[80:100], 1 * (1 - fade) + 2 * fade, atol=1e-6)
    np.testing.assert_allclose(out[100:160], 2)
    np.testing.assert_allclose(out[160:180], 2 * (1 - fade) + 3 * fade, atol=1e-6)
    np.testing.assert_allclose(out[180:], 3)


class _Joint(torch.nn.Module):
    """Per-target UMX models behind one forward, as umxtools' OpenUnmixJoint."""

    kind = "spectrogram"

    def __init__(self, models):
        super().__init__()
        self.targets, self.parts = list(models), torch.nn.ModuleList(models.values())

    def forward(self, x):
        return torch.stack([m(x) for m in self.parts], dim=1)

    def target_models(self):
        return dict(zip(self.targets, self.parts))


def test_whole_module_and_segmented_module_paths():
    models = {t: random_umx(i) for i, t in enumerate(TARGETS[:2])}
    audio = music(2.0)
    ref = Separator(umx_model(models), SeparationSettings()).separate(audio)
    module = SeparationModel("spectrogram", list(models), RATE, 2, 4096, 1024, module=_Joint(models), module_targets=list(models))
    whole = Separator(module, SeparationSettings()).separate(audio)
    for t in models:  # the same arithmetic on other matrix sizes: equal to rounding
        np.testing.assert_allclose(whole[t], ref[t], rtol=0, atol=1e-5)  # measured 1.6e-6
    # segments cut the LSTM's context: the output is the model's output on each segment of frames,
    # cross-faded linearly, then the same Wiener filter. 1 s at hop 1024: segments of 43 frames
    # overlapping by 11, [0, 43), [32, 75), [64, 87)
    seg = Separator(module, SeparationSettings(segment=1.0, overlap=0.25)).separate(audio)
    mag = CentredSTFT(torch.from_numpy(audio), 4096, 1024).frames(0, 87).abs()[None]  # (1, channels, bins, frames)
    with torch.no_grad():
        parts = [_Joint(models)(mag[..., a:b]) for a, b in ((0, 43), (32, 75), (64, 87))]
    fade = (torch.arange(11) + 0.5) / 11
    blended = torch.cat([parts[0][..., :32], parts[0][..., 32:] * (1 - fade) + parts[1][..., :11] * fade,
                         parts[1][..., 11:32], parts[1][..., 32:] * (1 - fade) + parts[2][..., :11] * fade, parts[2][..., 11:]], dim=-1)
    replay = SeparationModel("spectrogram", list(models), RATE, 2, 4096, 1024, module=_Replay(blended), module_targets=list(models))
    expected = Separator(replay, SeparationSettings()).separate(audio)
    for t in models:
        assert not np.allclose(seg[t], whole[t], atol=1e-3)  # the segments do change the output
        np.testing.assert_array_equal(seg[t], expected[t])  # measured: no difference


class _Replay(torch.nn.Module):
    """A spectrogram "model" that returns fixed magnitudes ``(1, targets, channels, bins, frames)``."""

    kind = "spectrogram"

    def __init__(self, magnitudes):
        super().__init__()
        self.register_buffer("magnitudes", magnitudes)

    def forward(self, x):
        assert x.shape[-1] == self.magnitudes.shape[-1]
        return self.magnitudes


def test_selected_targets_of_a_module():
    module = SeparationModel("waveform", ["c", "a"], 1000, 2, module=_Gains(), module_targets=["a", "b", "c"])
    out = Separator(module, SeparationSettings()).separate(np.ones((2, 10), np.float32))
    assert list(out) == ["c", "a"]
    np.testing.assert_allclose(out["c"], 0.125)
    np.testing.assert_allclose(out["a"], 0.5)


def test_the_residual_of_a_vocals_only_separation_is_the_accompaniment():
    audio = music(0.5)
    out = Separator(umx_model({"vocals": random_umx(0)}), SeparationSettings(residual=True)).separate(audio)
    assert list(out) == ["vocals", "accompaniment"]
    two = Separator(umx_model({"vocals": random_umx(0), "drums": random_umx(1)}), SeparationSettings(residual=True))
    assert two.outputs == ["vocals", "drums", "residual"] and two.residual == "residual"
    with pytest.raises(UsageError, match="the residual would be named 'residual', which is already one of the targets"):
        Separator(umx_model({"drums": random_umx(0), "residual": random_umx(1)}), SeparationSettings(residual=True))
