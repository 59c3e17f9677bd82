"""umxtools.metrics against museval 0.4.1 (``museval.evaluate``, BSSEval v4) computed in the test.

Every frame score must be within a few times the difference measured for that case (1e-12 to 2e-6
dB; each test states its figure), NaN and +-inf exactly where museval's are. The synthetic cases add
a noise floor to every reference (``toy_references`` says why); real music (the shared sample) is
compared without one. museval is slow (about 1 s per second of 4-target stereo audio on one core,
plus four LUs of the 4096-square Gram matrix), so the signals are short, 2-5 s, most not a whole
number of 1 s frames, and most tests use 1 to 3 targets.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import SAMPLE, need_shared
from umxtools import metrics
from umxtools.toy import STEMS, synthesize_track

museval = pytest.importorskip("museval")

# The default tolerance of the parity tests (tests/test_eval.py uses it too): 10x the largest
# difference measured among them, 1.9e-6 dB (references plus noise at -10 dB SNR). Each test passes
# its own, about 10x the difference measured for it (stated beside it).
TOLERANCE_DB = 2e-5
RATE = 44100


def museval_scores(references, estimates, win=RATE, hop=RATE) -> np.ndarray:
    """museval.evaluate as ``(4, targets, frames)``: SDR, ISR, SIR, SAR."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # museval's log10(0) and 0/0 in silent frames
        return np.array(museval.evaluate(references, estimates, win=win, hop=hop))


def fast_scores(references, estimates, window=RATE, hop=RATE) -> np.ndarray:
    """umxtools.metrics.bss_eval_v4 as ``(4, targets, frames)``, museval.evaluate's order."""
    scores = metrics.bss_eval_v4(references, estimates, window=window, hop=hop)
    return np.array([scores[name] for name in metrics.SCORES])


def assert_matches(fast: np.ndarray, reference: np.ndarray, tolerance: float = TOLERANCE_DB) -> None:
    """Same shape, NaN and +-inf at the same places, finite scores within ``tolerance`` dB."""
    fast, reference = np.asarray(fast), np.asarray(reference)
    assert fast.shape == reference.shape
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(reference))
    np.testing.assert_array_equal(np.isposinf(fast), np.isposinf(reference))
    np.testing.assert_array_equal(np.isneginf(fast), np.isneginf(reference))
    finite = np.isfinite(reference)
    assert np.abs(fast[finite] - reference[finite]).max(initial=0) <= tolerance


def toy_references(seconds: float, seed: int = 0, floor: float = 1e-5) -> np.ndarray:
    """``(4, samples, 2)`` toy stems (vocals, drums, bass, other) over a white noise floor.

    The floor (about a 16-bit recording's) keeps museval's Gram system well posed: the toy's
    sources are mono signals panned with fixed gains (the bass is exactly dual mono), for which
    museval's own scores move by up to 15 dB under a 1e-14 relative change of the input (its LU
    solves a numerically singular system; docs/metrics.md).
    """
    nb_samples = round(seconds * RATE)
    stems = synthesize_track(seed, 0, nb_samples, RATE)
    references = np.stack([stems[name].T for name in STEMS]).astype(np.float64)
    rng = np.random.default_rng(seed + 1000)
    return references + floor * rng.standard_normal(references.shape)


def ideal_ratio_mask_estimates(references: np.ndarray, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """A separation: the mixture's STFT masked by each source's share of the magnitudes, inverted."""
    audio = torch.as_tensor(references).permute(0, 2, 1)  # (targets, channels, samples)
    nb_targets, nb_channels, nb_samples = audio.shape
    window = torch.hann_window(n_fft, dtype=audio.dtype)
    spec = torch.stft(audio.reshape(-1, nb_samples), n_fft, hop, window=window, return_complex=True)
    spec = spec.reshape(nb_targets, nb_channels, *spec.shape[-2:])
    mask = spec.abs() / spec.abs().sum(dim=0, keepdim=True).clamp_min(1e-12)
    masked = (mask * spec.sum(dim=0)).reshape(-1, *spec.shape[-2:])
    estimates = torch.istft(masked, n_fft, hop, window=window, length=nb_samples)
    return estimates.reshape(nb_targets, nb_channels, nb_samples).permute(0, 2, 1).numpy()


# --- exactness against museval ----------------------------------------------------------------


def test_shared_sample_random_estimates_match_museval_reference_json():
    """museval's own regression reference: 80s Rock, vocals/accompaniment, seeded random estimates."""
    import musdb

    root = need_shared(SAMPLE / "hq")
    reference = json.loads(need_shared(SAMPLE / "museval-reference-random.json").read_text())
    track = musdb.DB(root=str(root), subsets="train", is_wav=True).tracks[0]
    np.random.seed(0)  # the sample's README: drawn in this order right after seeding
    estimates = {name: np.random.random(track.audio.shape) for name in ("vocals", "accompaniment")}
    references = np.stack([track.targets[name].audio for name in estimates])

    sdr, isr, sir, sar = metrics.evaluate(references, np.stack(list(estimates.values())))

    by_name = {target["name"]: target["frames"] for target in reference["targets"]}
    for j, name in enumerate(estimates):
        expected = np.array([[frame["metrics"][key] for frame in by_name[name]] for key in ("SDR", "ISR", "SIR", "SAR")])
        # measured 5.5e-6 dB, of which up to 5e-6 is the JSON's rounding to 5 decimals
        assert_matches(np.stack([sdr[j], isr[j], sir[j], sar[j]]), expected, tolerance=1e-5)


def test_separation_estimates_match_museval():
    """Ideal-ratio-mask separation of a 4-target toy track: filtering, leakage and artifacts."""
    references = toy_references(3.2)
    estimates = ideal_ratio_mask_estimates(references)
    fast = np.array(metrics.evaluate(references, estimates))
    assert fast.shape == (4, 4, 3)  # (scores, targets, frames): 3.2 s gives 3 whole 1 s frames
    assert_matches(fast, museval_scores(references, estimates), tolerance=6e-6)  # measured 6.3e-7 dB
    assert np.isfinite(fast).all() and np.ptp(fast[0]) > 3  # a real separation, not a trivial case


def test_trained_toy_model_estimates_match_museval(toy_cache, tmp_path):
    """Estimates of a UMX model trained on the toy cache (vocals, the masked mixture STFT as
    open-unmix with niter 0; accompaniment, the rest of the mixture) of an unseen toy track."""
    from umxtools import transforms
    from umxtools.models import OpenUnmix
    from umxtools.training import TrainConfig, train

    out = tmp_path / "model"
    train(TrainConfig(cache=toy_cache, valid=toy_cache, output=out, hidden_size=16, seq_dur=1.0, samples_per_track=8,
                      batch_size=4, epochs=3, lr=0.01))
    model = OpenUnmix(nb_bins=2049, hidden_size=16, max_bin=1487)
    model.load_state_dict(torch.load(out / "vocals.pth", weights_only=True))
    stems = toy_references(2.6, seed=21)  # (vocals, drums, bass, other), samples, channels
    references = np.stack([stems[0], stems[1:].sum(axis=0)])  # vocals, accompaniment
    mixture = torch.from_numpy(stems.sum(axis=0).T.astype(np.float32))  # (channels, samples)
    spec = transforms.stft(mixture, center=True)
    with torch.no_grad():
        magnitude = model.eval()(spec.abs()[None])[0]
    vocals = transforms.istft(magnitude * torch.exp(1j * spec.angle()), length=mixture.shape[-1]).double().numpy().T
    estimates = np.stack([vocals, mixture.double().numpy().T - vocals])
    # measured 1.7e-8 dB
    assert_matches(np.array(metrics.evaluate(references, estimates)), museval_scores(references, estimates), tolerance=2e-7)


def test_references_plus_noise_at_several_snrs_match_museval():
    """Target j is its reference plus white noise at SNR -10, 20 or 50 dB; 2.5 s: a partial frame."""
    rng = np.random.default_rng(3)
    references = toy_references(2.5, seed=3)[1:]
    snrs = np.array([-10.0, 20.0, 50.0])
    power = (references**2).mean(axis=(1, 2), keepdims=True)
    noise = rng.standard_normal(references.shape) * np.sqrt(power / 10 ** (snrs[:, None, None] / 10))
    estimates = references + noise
    fast = np.array(metrics.evaluate(references, estimates))
    assert fast.shape == (4, 3, 2)
    assert_matches(fast, museval_scores(references, estimates), tolerance=TOLERANCE_DB)  # measured 1.9e-6 dB
    # the SDR is the framewise SNR: the four targets are ordered by it
    assert np.all(np.diff(np.median(fast[0], axis=1)) > 10)


@pytest.mark.parametrize("channels", [1, 2])
def test_silent_frames_in_a_reference_and_in_an_estimate_match_museval(channels):
    """Frame 1 of reference 0 and frame 2 of estimate 1 are silent: NaN for every target there."""
    rng = np.random.default_rng(channels)
    references = toy_references(4.5, seed=7)[[1, 3], :, :channels]  # drums and other
    estimates = references + 0.2 * rng.standard_normal(references.shape) * references.std()
    references[0, RATE:2 * RATE] = 0
    estimates[1, 2 * RATE - 10:3 * RATE + 10] = 0
    fast = np.array(metrics.evaluate(references, estimates))
    expected = museval_scores(references, estimates)
    assert_matches(fast, expected, tolerance={1: 5e-9, 2: 6e-6}[channels])  # measured 4.5e-10 dB, 6.1e-7 dB
    nan_frames = np.isnan(fast).all(axis=(0, 1))
    np.testing.assert_array_equal(nan_frames, [False, True, True, False])


def test_overlapping_windows_one_target_and_mono_match_museval():
    """Frames that overlap (hop < window), a single target (SIR is +inf: no interference), mono."""
    rng = np.random.default_rng(5)
    references = toy_references(2.6, seed=5)[[0], :, :1]
    estimates = 0.8 * references + 0.1 * rng.standard_normal(references.shape) * references.std()
    fast = np.array(metrics.evaluate(references, estimates, win=22050, hop=11025))
    expected = museval_scores(references, estimates, win=22050, hop=11025)
    assert fast.shape == (4, 1, 9)
    assert np.isposinf(expected[2]).all()
    assert_matches(fast, expected, tolerance=5e-7)  # measured 4.9e-8 dB


@pytest.mark.parametrize(
    ("shape", "window", "hop"),
    [
        ((2, 2000, 2), 300, 700),  # hop > window: samples between frames are not scored
        ((1, 2000, 2), 1999, 1),  # a hop of one sample: two frames (one target: SIR +inf)
        ((2, 2000), 5000, 5000),  # mono (targets, samples), a window longer than the signal
        ((2, 2000), np.inf, RATE),  # museval.evaluate(win=np.inf): one frame over the whole signal
    ],
)
def test_window_and_hop_variants_match_museval(shape, window, hop):
    """museval's own test_bsseval setting: independent uniform random references and estimates,
    2000 samples (well-posed Gram systems, no noise floor needed); frames as museval's Framing."""
    rng = np.random.default_rng(len(shape) + int(min(window, 10**6)))
    references, estimates = rng.random(shape), rng.random(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.array(museval.metrics.bss_eval(references, estimates, window=window, hop=hop,
                                                     compute_permutation=False, framewise_filters=False,
                                                     bsseval_sources_version=False)[:4])
    # measured 1.9e-12 dB (300/700), 1e-14 to 6e-14 dB (the others)
    assert_matches(fast_scores(references, estimates, window, hop), expected, tolerance=2e-11)


def test_whole_signal_window_is_museval_bss_eval_images():
    """``window=np.inf`` (any hop, np.inf too) is one frame over the whole signal: museval's
    bss_eval_images, which passes window=hop=np.inf; the v4 SDR alone agrees with it."""
    rng = np.random.default_rng(12)
    references, estimates = rng.random((2, 2000, 1)), rng.random((2, 2000, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.array(museval.metrics.bss_eval_images(references, estimates, compute_permutation=False)[:4])
    fast = np.array(metrics.evaluate(references, estimates, win=np.inf, hop=np.inf))
    assert fast.shape == (4, 2, 1)
    assert_matches(fast, expected, tolerance=1e-12)  # measured 1e-13 dB
    np.testing.assert_allclose(metrics.sdr_v4(references, estimates, window=np.inf, hop=np.inf).numpy(), fast[0], rtol=1e-12)
    with pytest.raises(ValueError, match="window and hop"):  # several frames need a finite hop (museval fails too)
        metrics.bss_eval_v4(references, estimates, window=600, hop=np.inf)


@pytest.mark.parametrize(
    ("stems", "start", "seconds", "channels"),
    [(("vocals", "drums"), 2.0, 2.6, 2), (("vocals", "bass"), 0.0, 3.2, 1)],
)
def test_real_music_without_a_noise_floor_matches_museval(stems, start, seconds, channels):
    """The shared MUSDB18 sample's stems as they are (16-bit, no added floor), ideal-ratio-mask
    estimates. Real recordings keep museval's Gram system well posed: multiplying the references
    by ``1 + 1e-14 * noise`` moves museval's own scores by 1.8e-8 dB (stereo) and 2.6e-9 dB (mono)."""
    import soundfile as sf

    folder = need_shared(SAMPLE / "hq" / "train" / "Music Delta - 80s Rock")
    first, count = round(start * RATE), round(seconds * RATE)
    references = np.stack([sf.read(folder / f"{name}.wav", dtype="float64", start=first, frames=count)[0][:, :channels]
                           for name in stems])
    estimates = ideal_ratio_mask_estimates(references)
    fast = np.array(metrics.evaluate(references, estimates))
    assert fast.shape == (4, 2, int(seconds)) and np.isfinite(fast).all()
    # measured 2.3e-8 dB (stereo), 6.8e-9 dB (mono)
    assert_matches(fast, museval_scores(references, estimates), tolerance={2: 2.3e-7, 1: 7e-8}[channels])


# --- the API ----------------------------------------------------------------------------------


def _noisy_pair(targets=2, seconds=2.3, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    references = rng.standard_normal((targets, round(seconds * RATE), channels))
    return references, references + 0.5 * rng.standard_normal(references.shape)


def test_bss_eval_v4_returns_numpy_for_numpy_and_float64_tensors_for_tensors():
    references, estimates = _noisy_pair()
    scores = metrics.bss_eval_v4(references, estimates)
    assert set(scores) == {"sdr", "isr", "sir", "sar"}
    assert all(isinstance(v, np.ndarray) and v.shape == (2, 2) and v.dtype == np.float64 for v in scores.values())
    tensors = metrics.bss_eval_v4(torch.from_numpy(references).float(), torch.from_numpy(estimates).float())
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in tensors.values())
    for name in scores:  # float32 inputs: the same numbers to float32 rounding of the audio
        np.testing.assert_allclose(tensors[name].numpy(), scores[name], atol=1e-3)
    as_list = metrics.evaluate(list(references), list(estimates))  # museval's list-of-arrays input
    for value, name in zip(as_list, metrics.SCORES):
        np.testing.assert_array_equal(value, scores[name])


def test_evaluate_pads_and_truncates_estimates_like_museval():
    references, estimates = _noisy_pair(targets=1, channels=1)
    full = metrics.evaluate(references, estimates)
    short = estimates[:, :-3000]
    padded = np.concatenate([short, np.zeros((1, 3000, 1))], axis=1)
    for a, b in zip(metrics.evaluate(references, short), metrics.evaluate(references, padded)):
        np.testing.assert_array_equal(a, b)
    longer = np.concatenate([estimates, estimates[:, :500]], axis=1)
    for a, b in zip(metrics.evaluate(references, longer), full):
        np.testing.assert_array_equal(a, b)


def test_sdr_v4_and_median_sdr_equal_the_full_computation():
    references, estimates = _noisy_pair(targets=2, seconds=5.2)
    references[1, RATE:2 * RATE] = 0  # a NaN frame
    full = metrics.bss_eval_v4(references, estimates)
    sdr = metrics.sdr_v4(torch.from_numpy(references), torch.from_numpy(estimates))
    np.testing.assert_allclose(sdr.numpy(), full["sdr"], rtol=1e-12, atol=1e-12)
    median = metrics.median_sdr(references, estimates)
    np.testing.assert_allclose(median.numpy(), np.nanmedian(full["sdr"], axis=1), rtol=1e-12)


def test_sdr_v4_gradient_is_the_analytic_one():
    """d SDR / d estimate = -(20 / ln 10) (estimate - reference) / |estimate - reference|^2 within
    each frame, zero after the last whole frame; the median's gradient is its frames' (an even
    count: half of each of the two middle frames')."""
    win = 4410  # 0.1 s frames keep the signal short
    references, estimates = _noisy_pair(targets=2, seconds=0.25)  # 2 whole frames, half a frame left
    references[1, :win] *= 0.5  # different SDRs in the two frames
    refs = torch.from_numpy(references)
    ests = torch.from_numpy(estimates).requires_grad_()
    sdr = metrics.sdr_v4(refs, ests, window=win, hop=win)  # (targets, frames)
    error = torch.from_numpy(estimates - references)
    frame_error = error[:, :2 * win].reshape(2, 2, win, 2).square().sum(dim=(2, 3))  # (targets, frames)
    frame_energy = refs[:, :2 * win].reshape(2, 2, win, 2).square().sum(dim=(2, 3))
    torch.testing.assert_close(sdr.detach(), 10 * torch.log10(frame_energy / frame_error), rtol=1e-12, atol=0)
    expected = torch.zeros_like(error)
    for t in range(2):
        part = slice(t * win, (t + 1) * win)
        expected[:, part] = -(20 / math.log(10)) * error[:, part] / frame_error[:, t, None, None]
    (grad,) = torch.autograd.grad(sdr.sum(), ests)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=0)
    (grad,) = torch.autograd.grad(metrics.median_sdr(refs, ests, window=win, hop=win).sum(), ests)
    torch.testing.assert_close(grad, expected / 2, rtol=1e-10, atol=0)


def test_frames_kept_from_the_first_pass_equal_frames_transformed_again(monkeypatch):
    references, estimates = _noisy_pair(targets=2, seconds=3.4)
    kept = metrics.bss_eval_v4(references, estimates)
    monkeypatch.setattr(metrics, "_KEEP_BYTES", 0)
    again = metrics.bss_eval_v4(references, estimates)
    for name in kept:
        np.testing.assert_allclose(kept[name], again[name], rtol=1e-9)


@pytest.mark.parametrize(
    ("references", "estimates", "kwargs", "message"),
    [
        (np.ones((2, 100, 2)), np.ones((2, 90, 2)), {}, "same"),
        (np.ones((2, 10, 2, 1)), np.ones((2, 10, 2, 1)), {}, "expected"),
        (np.ones((2, 100, 2)), np.full((2, 100, 2), np.nan), {}, "NaN"),
        (np.ones((2, 100, 2)), np.ones((2, 100, 2)), {"window": 0}, "window"),
    ],
)
def test_bad_input_raises_value_error(references, estimates, kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.bss_eval_v4(references, estimates, **kwargs)


def test_a_silent_source_is_refused_like_museval():
    references, estimates = _noisy_pair(targets=2)
    references[1] = 0
    with pytest.raises(ValueError, match="reference 1 is silent"):
        metrics.bss_eval_v4(references, estimates)
    with pytest.raises(ValueError):
        museval.evaluate(references, estimates)
    references, estimates = _noisy_pair(targets=2)
    estimates[0] = 0  # museval's test_silent_input: a silent estimate
    with pytest.raises(ValueError, match="estimate 0 is silent"):
        metrics.bss_eval_v4(references, estimates)
    with pytest.raises(ValueError):
        museval.evaluate(references, estimates)
    with pytest.raises(ValueError, match="only 'v4'"):
        metrics.evaluate(*_noisy_pair(), mode="v3")


def test_solve_falls_back_from_cholesky_to_lu_to_least_squares():
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64, generator=rng)
    b = torch.randn(6, 2, dtype=torch.float64, generator=rng)
    none = torch.zeros(6, dtype=torch.bool)
    indefinite = a + a.T  # Cholesky fails, LU solves
    torch.testing.assert_close(metrics._solve(indefinite, b, none), torch.linalg.solve(indefinite, b))
    singular = a @ a.T
    singular[:, 0] = singular[0, :] = 0  # LU meets an exact zero pivot: least squares, minimum norm
    expected = torch.linalg.pinv(singular) @ b
    torch.testing.assert_close(metrics._solve(singular, b, none), expected)
    repeated = a @ a.T
    repeated[5], repeated[:, 5] = repeated[4], repeated[:, 4]  # row 5 copies row 4: left out
    b[5] = b[4]
    solution = metrics._solve(repeated, b, torch.tensor([False] * 5 + [True]))
    assert torch.all(solution[5] == 0)
    torch.testing.assert_close(repeated @ solution, b)


def test_a_dual_mono_reference_matches_museval():
    """A stem whose two channels are the same samples (mono stored as stereo): the Gram system is
    exactly singular; museval's LU still gives stable scores and we must give the same."""
    rng = np.random.default_rng(11)
    references = toy_references(2.4, seed=11)[[0, 2]]  # vocals, bass
    references[1, :, 1] = references[1, :, 0]
    estimates = references + 0.1 * rng.standard_normal(references.shape) * references.std()
    assert metrics._channel_copies(torch.from_numpy(references), torch.ones(4, 8)).tolist() == [0, 1, 2, 2]
    # measured 1.2e-7 dB
    assert_matches(np.array(metrics.evaluate(references, estimates)), museval_scores(references, estimates), tolerance=1.2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    references, estimates = _noisy_pair(targets=4, seconds=3.2)
    cpu = metrics.bss_eval_v4(references, estimates)
    cuda = metrics.bss_eval_v4(torch.from_numpy(references).cuda(), torch.from_numpy(estimates).cuda())
    for name in cpu:
        assert cuda[name].device.type == "cuda"
        np.testing.assert_allclose(cuda[name].cpu().numpy(), cpu[name], atol=1e-6)
