"""The file-writing helpers every writer uses: atomic writes, locks, checked names, disjoint outputs."""

import multiprocessing
import os
import stat

import pytest

from umxtools import fileio
from umxtools.errors import LockedError, OutputError, UnsafeNameError


def test_atomic_write_has_the_umask_mode_and_leaves_no_temporary(tmp_path):
    old = os.umask(0o022)
    try:
        path = fileio.write_text(tmp_path / "a" / "x.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    # mkstemp's 0600 would hide results from colleagues on a shared cluster
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~fileio._umask()
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = fileio.write_text(tmp_path / "x.txt", "old")
    with pytest.raises(ZeroDivisionError):
        with fileio.atomic(path) as tmp:
            tmp.write_text("half")
            1 / 0
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_temporary_names_differ_between_calls(tmp_path):
    names = {fileio.temp_path(tmp_path / "x.h5") for _ in range(50)}
    assert len(names) == 50
    assert all(str(os.getpid()) in n.name for n in names)


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc/passwd", "..", ".", "", "a\x00b", "tab\tname", "a\\b"])
def test_path_climbing_names_are_refused(tmp_path, name):
    with pytest.raises(UnsafeNameError, match="plain file name"):
        fileio.safe_child(tmp_path, name, "target", "model.json")


def test_plain_names_are_children(tmp_path):
    assert fileio.safe_child(tmp_path, "vocals") == tmp_path / "vocals"
    assert fileio.safe_child(tmp_path, "Artist - Song (feat. X)") == tmp_path / "Artist - Song (feat. X)"


def _hold(path, ready, release):
    with fileio.exclusive(path):
        ready.set()
        release.wait(30)


def test_a_second_writer_of_the_same_output_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out.h5"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockedError, match=f"pid {holder.pid} on host"):
            with fileio.exclusive(out):
                pass
    finally:
        release.set()
        holder.join(30)
    with fileio.exclusive(out):  # free again once the holder is done
        pass
    assert not fileio.lock_path(out).exists()


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "out.h5"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(out, ready, release))
    holder.start()
    assert ready.wait(30)
    holder.kill()
    holder.join(30)
    assert fileio.lock_path(out).exists()  # left behind by kill -9, but not locked
    with fileio.exclusive(out):
        pass


def test_outputs_are_never_inputs(tmp_path):
    data = tmp_path / "data"
    (data / "track").mkdir(parents=True)
    for output in (data, data / "track" / "out", tmp_path):
        with pytest.raises(OutputError, match="write the output somewhere else"):
            fileio.check_disjoint(output, [data / "track"], "dataset")
    fileio.check_disjoint(tmp_path / "out", [data], "dataset")
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(OutputError, match="is the dataset"):
        fileio.check_disjoint(link, [data], "dataset")


def test_a_folder_is_claimed_only_when_empty_or_made_by_the_same_command(tmp_path):
    fileio.claim_folder(tmp_path / "new", "oracle")
    fileio.claim_folder(tmp_path / "new", "oracle")  # a rerun
    assert fileio.made_by(tmp_path / "new") == "oracle"
    with pytest.raises(OutputError, match="holds the output of 'umxtools oracle'"):
        fileio.claim_folder(tmp_path / "new", "separate")
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "mixture.wav").write_bytes(b"RIFF")
    with pytest.raises(OutputError, match="did not make"):
        fileio.claim_folder(dataset, "toy")


def test_a_folder_claimed_by_a_sibling_shard_between_two_looks_is_accepted(tmp_path, monkeypatch):
    """Shards of one array start together: one finds no marker, then finds the folder full of the
    other shard's marker and files. That is the same command's folder, not a foreign one."""
    folder = tmp_path / "scores"
    fileio.claim_folder(folder, "eval")  # the other shard, first
    (folder / "test").mkdir()
    real, looks = fileio.made_by, []

    def made_by(f):
        looks.append(f)
        return None if len(looks) == 1 else real(f)  # the first look came before the other shard's marker

    monkeypatch.setattr(fileio, "made_by", made_by)
    fileio.claim_folder(folder, "eval")
    assert len(looks) == 2
    looks.clear()
    with pytest.raises(OutputError, match="holds the output of 'umxtools eval', not of 'umxtools report'"):
        fileio.claim_folder(folder, "report")


def test_force_removes_only_what_a_command_made(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "vocals.wav").write_bytes(b"x")
    with pytest.raises(OutputError, match="was not made by umxtools"):
        fileio.remove_tree(theirs, "separation.json")
    assert (theirs / "vocals.wav").exists()
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "separation.json").write_text("{}")
    fileio.remove_tree(ours, "separation.json")
    assert not ours.exists()


def test_os_errors_read_as_one_line():
    assert fileio.os_problem(OSError(28, "No space left on device")) == "no space left on device"
    assert str(fileio.output_error("/x/y.h5", OSError(30, "Read-only file system"))) == "/x/y.h5: read-only file system"
