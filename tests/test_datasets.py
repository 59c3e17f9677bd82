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


# --- musdb finds no tracks: the error names why (it said `expected track folders of wavs` when they were there) ---


def _musdb(run_cli, root, tmp_path, *flags):
    return run_cli("cache", "musdb", root, "-q", "-o", tmp_path / "c.h5", *flags)


def test_musdb_valid_split_of_tracks_not_named_as_musdb18s(run_cli, toy_root, tmp_path):
    r = _musdb(run_cli, toy_root, tmp_path, "--is-wav", "--split", "valid")
    assert error_line(r) == (f"umxtools: error: {toy_root / 'train'}: --split valid selects none of the 4 tracks: musdb's validation "
                             "list names MUSDB18's tracks ('Actions - One Minute Smile', ...); pass --valid-tracks NAME,... to choose "
                             "the validation tracks")
    r = _musdb(run_cli, toy_root, tmp_path, "--is-wav", "--split", "train", "--valid-tracks", "toy_000,toy_001,toy_002,toy_003")
    assert error_line(r) == (f"umxtools: error: {toy_root / 'train'}: --split train selects none of the 4 tracks: --valid-tracks names "
                             "all of them; use --split all, or fewer --valid-tracks")


def test_musdb_track_folders_without_the_musdb_file_names(run_cli, toy_copy, tmp_path):
    for track in (toy_copy / "train").iterdir():  # FLAC-converted, or a trackfolder dataset with its own names
        for wav in track.glob("*.wav"):
            wav.rename(wav.with_suffix(".flac"))
    r = _musdb(run_cli, toy_copy, tmp_path, "--is-wav", "--split", "all")
    assert error_line(r) == (f"umxtools: error: {toy_copy / 'train'}: 4 track folders, but none has all of mixture.wav, vocals.wav, "
                             "drums.wav, bass.wav, other.wav (toy_000/ holds bass.flac, drums.flac, mixture.flac, other.flac, "
                             "vocals.flac)")


def test_musdb_layout_and_flag_disagree(run_cli, toy_root, tmp_path):
    r = _musdb(run_cli, toy_root, tmp_path, "--split", "all")  # MUSDB18-HQ without --is-wav
    assert error_line(r) == f"umxtools: error: {toy_root / 'train'}: 4 track folders and no .stem.mp4 files: this looks like MUSDB18-HQ; pass --is-wav"
    stems = tmp_path / "musdb18" / "train"
    stems.mkdir(parents=True)
    (stems / "A - B.stem.mp4").write_bytes(b"")
    r = _musdb(run_cli, stems.parent, tmp_path, "--is-wav", "--split", "all")
    assert error_line(r) == (f"umxtools: error: {stems}: 1 .stem.mp4 file and no track folders: this is MUSDB18, not MUSDB18-HQ; "
                             "drop --is-wav")
    r = _musdb(run_cli, toy_root / "train", tmp_path, "--is-wav", "--split", "all")  # the subset folder given as the root
    assert error_line(r) == (f"umxtools: error: {toy_root / 'train'}: no train/ folder (a MUSDB18 root holds train/ and test/); "
                             f"{toy_root / 'train'} is itself a subset folder: pass its parent {toy_root}")


def test_musdb_track_folder_missing_a_stem_is_named_before_any_work(run_cli, toy_copy, tmp_path):
    missing = toy_copy / "train" / "toy_003" / "drums.wav"
    missing.unlink()
    r = _musdb(run_cli, toy_copy, tmp_path, "--is-wav", "--split", "all")
    assert error_line(r) == (f"umxtools: error: {missing}: missing; every MUSDB18-HQ track folder holds mixture.wav, vocals.wav, "
                             "drums.wav, bass.wav, other.wav")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no output, no parts folder


def test_eval_references_name_the_layout_problem_too(toy_root):
    from umxtools.errors import DatasetError
    from umxtools.references import MusdbReferences

    with pytest.raises(DatasetError, match=r"4 track folders and no \.stem\.mp4 files: this looks like MUSDB18-HQ; pass --is-wav"):
        MusdbReferences(str(toy_root), is_wav=False, subset="train").track_names()
