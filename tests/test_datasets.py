"""Dataset listings: a trackfolder dataset whose tracks lack a stem, names from flags that would leave the root."""

from __future__ import annotations

import pytest

from tests.conftest import error_line
from umxtools.cache import open_cache


def test_a_track_without_a_stem_is_named(run_cli, toy_copy, tmp_path):
    """A trackfolder track lacking bass.wav was cached without it, and training on bass then ran."""
    missing = toy_copy / "train" / "toy_002" / "bass.wav"
    missing.unlink()
    out = tmp_path / "tf.h5"
    r = run_cli("cache", "folder", toy_copy, "--split", "train", "--layout", "trackfolder", "-q", "-o", out)
    assert error_line(r) == (f"umxtools: error: {missing}: missing; every track of a trackfolder dataset needs the same sources "
                             "(--sources to choose, --variable-sources to allow silence)")
    assert not out.exists()
    r = run_cli("cache", "folder", toy_copy, "--split", "train", "--layout", "trackfolder", "--variable-sources", "-q", "-o", out)
    assert r.code == 0, r.err
    meta = open_cache(out)
    assert meta.sources == ("bass", "drums", "other", "vocals")
    assert [t.roles for t in meta.tracks if t.name == "toy_002"] == [("mixture", "drums", "other", "vocals")]


@pytest.mark.parametrize("flag,value,message", [
    ("--sources", "vocals,../../secret", "--sources: source '../../secret' contains a path separator; it must be a plain file name"),
    ("--mixture-file", "../mix.wav", "--mixture-file: file name '../mix.wav' contains a path separator; it must be a plain file name"),
])
def test_names_from_flags_stay_inside_the_dataset(run_cli, toy_root, tmp_path, flag, value, message):
    r = run_cli("cache", "folder", toy_root, "--split", "train", "--layout", "trackfolder", flag, value, "-q", "-o", tmp_path / "x.h5")
    assert error_line(r) == f"umxtools: error: {message}"
