"""umxtools.models.OpenUnmix against the reference openunmix.model.OpenUnmix and the shared fixture."""

from __future__ import annotations

import numpy as np
import torch

from umxtools.models import OpenUnmix
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
