"""umxtools.segments against the references: demucs's ``apply_model`` and MSST's ``demix``, and its memory bound.

demucs (4.1.0, installed) is called itself. MSST is not installable, so its ``demix`` is restated
in tests/support/msst_reference.py (shared with bench/bench_models.py).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.support.msst_reference import msst_demix
from umxtools.segments import (
    DemucsMember,
    DemucsPlan,
    MsstPlan,
    draw_shift_offsets,
    run_whole,
)

demucs_apply = pytest.importorskip("demucs.apply", reason="demucs is the reference: pip install 'umxtools[htdemucs]'")

from umxtools.models.bsroformer import BSRoformer  # noqa: E402  (after importorskip: these modules import demucs)
from umxtools.models.htdemucs import HTDemucs, HTDemucsBag, demucs_plan  # noqa: E402  (after importorskip: these modules import demucs)

TOLERANCE = 1e-5
RATE = 8000
SOURCES = ["drums", "bass", "other", "vocals"]
TINY = {"channels": 4, "depth": 2, "nfft": 256, "t_layers": 1, "t_heads": 2, "dconv_comp": 2}


def tiny_htdemucs(seed: int = 0, segment="1/2") -> HTDemucs:
    torch.manual_seed(seed)
    return HTDemucs(SOURCES, nb_channels=2, sample_rate=RATE, segment=segment, demucs_args=TINY).eval()


@pytest.fixture(scope="module")
def model() -> HTDemucs:
    return tiny_htdemucs()


@pytest.fixture(scope="module")
def mix() -> torch.Tensor:
    # 0.9 s: not a multiple of the 0.5 s segment nor of its stride (3 segments, the last one short)
    return torch.randn(2, int(0.9 * RATE) + 7, generator=torch.Generator().manual_seed(1))


def record_offsets(monkeypatch) -> list[int]:
    """The offsets demucs's apply_model draws (its global ``random``), recorded as it draws them."""
    drawn, draw = [], random.randint

    def randint(a, b):
        drawn.append(draw(a, b))
        return drawn[-1]

    monkeypatch.setattr(demucs_apply.random, "randint", randint)
    return drawn


# --- demucs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shifts, batch_size, overlap", [(0, 1, 0.25), (0, 2, 0.5), (1, 1, 0.25)])
def test_demucs_rule_equals_apply_model(model, mix, shifts, batch_size, overlap):
    random.seed(7)  # apply_model draws its shift from the global random; the plan from Random(7)
    with torch.no_grad():
        ref = demucs_apply.apply_model(model.demucs, mix[None], shifts=shifts, split=True, overlap=overlap)[0]
        plan = demucs_plan(model, overlap=overlap, shifts=shifts, batch_size=batch_size, seed=7)
        out = run_whole(plan, mix)
    assert out.shape == (4, 2, mix.shape[-1])
    assert (out - ref).abs().max() <= TOLERANCE
    if batch_size == 1:  # the same segments, weights and additions in the same order: the same bits
        assert torch.equal(out, ref)


def test_two_shifts_and_a_shorter_segment(model, mix, monkeypatch):
    """With two shifts demucs's second offset depends on the random numbers HTDemucs's transformer
    draws in between (``random.randrange`` per forward), so the offsets it drew are passed on."""
    drawn = record_offsets(monkeypatch)
    with torch.no_grad():
        ref = demucs_apply.apply_model(model.demucs, mix[None], shifts=2, split=True, overlap=0.25, segment=0.4)[0]
        out = run_whole(demucs_plan(model, segment=0.4, shifts=2, shift_offsets=[drawn]), mix)
    assert len(drawn) == 2 and torch.equal(out, ref)


def test_seeded_offsets_are_demucs_draws():
    random.seed(3)
    assert draw_shift_offsets(2, 3, RATE // 2, seed=3) == [[random.randint(0, RATE // 2) for _ in range(3)] for _ in range(2)]


def test_bag_equals_apply_model_on_a_bag_of_models(mix):
    members = [tiny_htdemucs(seed) for seed in (1, 2)]
    weights = [[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 0.5, 1.0]]
    bag = demucs_apply.BagOfModels([m.demucs for m in members], weights)
    with torch.no_grad():
        ref = demucs_apply.apply_model(bag, mix[None], shifts=0, split=True, overlap=0.25)[0]
        ours = HTDemucsBag.adopt([m.demucs for m in members], weights).eval()
        out = run_whole(demucs_plan(ours), mix)
        assert torch.equal(ours(mix[None])[0], out)  # forward of a long input runs the same rule
    assert torch.equal(out, ref)


def test_a_longer_segment_than_trained_is_refused(model):
    from umxtools.models import ModelError

    with pytest.raises(ModelError, match=r"^htdemucs: segment 0.6 s is longer than the 0.5 s this model was trained on"):
        demucs_plan(model, segment=0.6)


# --- MSST ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roformer() -> BSRoformer:
    torch.manual_seed(0)
    return BSRoformer(dim=16, depth=1, stereo=True, num_stems=2, dim_head=8, heads=2, time_transformer_depth=1,
                      freq_transformer_depth=1, freqs_per_bands=(128, 129), stft_n_fft=512, stft_win_length=512,
                      stft_hop_length=128, mlp_expansion_factor=1).eval()


@pytest.mark.parametrize("length, chunk_size, num_overlap, batch_size", [
    (9000, 2048, 2, 1),   # padded; the last chunk more than half full (reflected)
    (9000, 2048, 4, 3),   # batches: the last batch loses its fade-out, the first keeps its fade-in
    (6700, 2048, 2, 2),   # the last chunk less than half full (zeros)
    (1500, 2048, 2, 1),   # shorter than 2 * border: no padding, one chunk
    (3000, 1000, 1, 1),   # no overlap at all: border 0
])
def test_msst_rule_equals_demix(roformer, length, chunk_size, num_overlap, batch_size):
    mix = torch.randn(2, length, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = msst_demix(roformer, mix, chunk_size, num_overlap, batch_size)
        out = run_whole(MsstPlan(roformer, 2, chunk_size, num_overlap, batch_size), mix)
    assert out.shape == ref.shape == (2, 2, length)
    assert (out - ref).abs().max() <= TOLERANCE


# --- memory ----------------------------------------------------------------------------------------


class Smear(torch.nn.Module):
    """A cheap position-dependent 'model' with demucs's attributes: each source a different filter."""

    samplerate, segment, sources = RATE, 0.5, ["a", "b"]

    def valid_length(self, length):  # as HTDemucs: every segment is run at the full segment length
        return int(self.samplerate * self.segment)

    def forward(self, x):  # (batch, channels, n) -> (batch, 2, channels, n)
        return torch.stack([x.cumsum(-1) / x.shape[-1], x.flip(-1)], dim=1)


def test_long_input_is_run_segment_by_segment():
    """3 minutes at 8 kHz: blocks come out as segments finish, never more than two segments held,
    and the result is apply_model's (which holds the whole song's outputs)."""
    mix = torch.randn(2, 180 * RATE, generator=torch.Generator().manual_seed(2))
    seg = RATE // 2
    plan = DemucsPlan([DemucsMember(Smear(), seg)], nb_sources=2, max_shift=RATE // 2, shifts=1, seed=0)
    blocks = plan.blocks(mix)
    first = next(blocks)
    assert first.shape[-1] < 2 * seg  # handed on before the rest of the song is touched
    out = torch.cat([first, *blocks], dim=-1)
    assert max(plan.held) <= 2 * seg
    random.seed(0)
    ref = demucs_apply.apply_model(Smear(), mix[None], shifts=1, split=True, overlap=0.25)[0]
    assert torch.equal(out, ref)

    msst = MsstPlan(Smear(), 2, chunk_size=4000, num_overlap=4)
    sizes = [b.shape[-1] for b in msst.blocks(mix)]
    assert sum(sizes) == mix.shape[-1] and max(sizes) <= 4000 and msst.held <= 4000
    assert (run_whole(msst, mix) - msst_demix(Smear(), mix, 4000, 4, 1)).abs().max() <= TOLERANCE
