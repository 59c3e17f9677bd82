"""umxtools.models.OpenUnmix against the reference openunmix.model.OpenUnmix and the shared fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umxtools.models import (
    JOINT,
    KINDS,
    MODELS,
    OFFERED_ARGS,
    SEGMENTING_RULES,
    STATISTICS_ARGS,
    ModelError,
    OpenUnmix,
    accepted_args,
    check_contract,
    load_class,
)
from tests.conftest import COMPAT, need_shared


def test_same_state_dict_and_output_as_openunmix(openunmix):
    import openunmix.model as ou_model

    rng = np.random.default_rng(0)
    mean, std = rng.random(2049), rng.random(2049) + 0.1
    for kwargs in ({"hidden_size": 32, "max_bin": 1487}, {"hidden_size": 16, "nb_layers": 1, "unidirectional": True}):
        torch.manual_seed(0)
        ref = ou_model.OpenUnmix(nb_bins=2049, input_mean=mean, input_scale=std, **kwargs)
        ours = OpenUnmix(nb_bins=2049, input_mean=mean, input_scale=std, **kwargs)
        theirs = ref.state_dict()
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
        torch.testing.assert_close(ours.state_dict()["input_scale"], theirs["input_scale"])
        ours.load_state_dict(theirs)
        ref.eval(), ours.eval()
        x = torch.rand(2, 2, 2049, 20)
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x))


def test_loads_the_compat_fixture_weights(openunmix):
    """The shared fixture's trained weights (openunmix 1.3.0) give open-unmix's own outputs."""
    import openunmix.model as ou_model

    folder = need_shared(COMPAT / "model")
    x = torch.rand(1, 2, 2049, 7, generator=torch.Generator().manual_seed(0))
    for target in ("vocals", "drums", "bass", "other"):
        state = torch.load(folder / f"{target}.pth", map_location="cpu", weights_only=True)
        model = OpenUnmix(nb_bins=2049, hidden_size=32, max_bin=1487)
        model.load_state_dict(state)
        ref = ou_model.OpenUnmix(nb_bins=2049, hidden_size=32, max_bin=1487)
        ref.load_state_dict(state)
        with torch.no_grad():
            out, expected = model.eval()(x), ref.eval()(x)
        assert out.shape == (1, 2, 2049, 7)
        assert torch.equal(out, expected), target


# --- the model contract: built-in classes keep the one a user class keeps -------------------------


@pytest.mark.parametrize("spec", [*MODELS.values(), JOINT])
def test_every_registered_class_loads_through_the_class_loader_and_keeps_the_contract(spec):
    if spec == MODELS.get("htdemucs"):
        pytest.importorskip("demucs")  # HTDemucs wraps demucs's own class
    cls = load_class(spec)  # the loader a user's MODULE:CLASS goes through
    assert f"{cls.__module__}:{cls.__name__}" == spec
    check_contract(cls, spec)
    assert cls.kind in KINDS
    assert "kind" in vars(cls) and "segmenting" in vars(cls), "declared by the class itself, not inherited"
    rule = cls.segmenting
    assert rule is None or rule["rule"] in SEGMENTING_RULES
    assert issubclass(cls, torch.nn.Module) and callable(cls.forward)
    assert set(accepted_args(cls)) <= set(OFFERED_ARGS) | set(STATISTICS_ARGS)


def test_umx_accepts_its_offered_arguments_and_not_targets():
    assert accepted_args(OpenUnmix) == ("nb_bins", "nb_channels", "max_bin", "input_mean", "input_scale")


def test_accepted_args_of_a_kwargs_constructor_leave_out_the_statistics():
    class Open(torch.nn.Module):
        kind = "waveform"

        def __init__(self, **kwargs):
            super().__init__()

    assert accepted_args(Open) == OFFERED_ARGS


def test_contract_refusals_name_the_class():
    class NoKind(torch.nn.Module):
        pass

    class BadRule(torch.nn.Module):
        kind = "waveform"
        segmenting = {"rule": "guess"}

    with pytest.raises(ModelError, match="needs a 'kind' attribute"):
        check_contract(NoKind, "x.py:NoKind")
    with pytest.raises(ModelError, match="'segmenting' must be None or a dict") as info:
        check_contract(BadRule, "x.py:BadRule")
    assert "x.py:BadRule" in str(info.value)


def test_umx_forward_is_decode_of_encode_and_context():
    torch.manual_seed(0)
    model = OpenUnmix(nb_bins=2049, hidden_size=16, nb_layers=2, max_bin=1487).eval()
    x = torch.rand(2, 2, 2049, 9)
    with torch.no_grad():
        mix = x.permute(3, 0, 1, 2)  # (frames, batch, channels, bins)
        h = model.encode(mix)
        assert h.shape == (9, 2, 16)
        y = model.decode(h, model.context(h), mix)
        assert y.shape == (9, 2, 2, 2049)
        assert torch.equal(y.permute(1, 2, 3, 0), model(x))
