"""The README's single-target chain, run as written: toy data, caches, a vocals-only model,
separation with --residual, evaluation of vocals and accompaniment.

The accident: the README's chain did not work. A vocals-only model failed under the default
--niter 1 with an error naming no flag; with --residual it wrote residual.wav, which eval does
not score, and eval's own hint (--targets vocals,accompaniment) then failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from tests.conftest import REPO


def _readme_chain() -> str:
    """The sh block of the README's separate section that trains a vocals model."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## `umxtools separate`"):]
    section = section[:section.index("\n## ")]
    blocks = [b.split("```", 1)[0] for b in section.split("```sh\n")[1:]]
    return next(b for b in blocks if "--targets vocals" in b)


def test_readme_single_target_chain_runs_as_written(tmp_path):
    block = _readme_chain()
    assert "--residual" in block and "--targets vocals,accompaniment" in block
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    tracks = sorted(p.name for p in (tmp_path / "data" / "toy" / "test").iterdir())
    assert len(tracks) == 2
    for track in tracks:
        folder = tmp_path / "estimates" / "vocals" / "test" / track
        assert sorted(p.name for p in folder.iterdir()) == ["accompaniment.wav", "separation.json", "vocals.wav"]
        record = json.loads((folder / "separation.json").read_text())
        assert record["residual_output"] == "accompaniment" and record["settings"]["niter"] == 1
        mix = sf.read(tmp_path / "data" / "toy" / "test" / track / "mixture.wav")[0]
        vocals, rest = sf.read(folder / "vocals.wav")[0], sf.read(folder / "accompaniment.wav")[0]
        assert vocals.shape == rest.shape == mix.shape and vocals.any() and rest.any()
        scores = json.loads((tmp_path / "scores" / "vocals" / "test" / f"{track}.json").read_text())
        assert [t["name"] for t in scores["targets"]] == ["vocals", "accompaniment"]
        assert all(frame["metrics"]["SDR"] is not None for t in scores["targets"] for frame in t["frames"])
    assert r.stdout.splitlines()[-1] == "scores/vocals"  # eval prints the scores folder it wrote
