"""`umxtools separate` is safe by construction (issue 13): each test is the attack or accident it prevents.

- an output folder that is, holds or lies inside an input (``separate X -o X --force``) is refused
  and every input byte is kept; ``--force`` replaces only earlier separations;
- names read from model files or flags (targets, aggregates, output folders) never leave ``-o``;
- a model folder never runs code without ``--trust-code``: no Python file or foreign module named
  by ``model.json``, no pickle in a ``.pth`` file (model folder or torch.hub's cache);
- a read-only or full output location is one line and leaves nothing partial.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from tests.conftest import COMPAT, REPO, error_line, need_shared
from tests.test_separate import TARGETS, music, write_umx_folder
from umxtools import pretrained

VICTIM = b"a colleague's file\n"


@pytest.fixture(scope="module")
def umx_folder(tmp_path_factory) -> Path:
    return write_umx_folder(tmp_path_factory.mktemp("model") / "umx", hidden=8)


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("songs") / "song.wav"
    sf.write(path, music(0.5).T, 44100, subtype="FLOAT")
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``root`` (hidden ones too): relative path -> bytes (None: folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def dataset(root: Path) -> Path:
    """A MUSDB18-HQ-like split: two track folders with a mixture and true stems."""
    for track in ("A", "B"):
        (root / track).mkdir(parents=True)
        sf.write(root / track / "mixture.wav", music(0.5, seed=ord(track)).T, 44100)
        for t in TARGETS:
            sf.write(root / track / f"{t}.wav", music(0.5, seed=ord(track) + len(t)).T / 4, 44100)
    return root


class RunsCode:
    """A pickle that runs a shell command when unpickled by plain pickle (what weights_only refuses)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


# --- inputs are never outputs ---------------------------------------------------------------------


def test_separating_a_dataset_into_itself_with_force_keeps_every_byte(run_cli, umx_folder, tmp_path):
    root = dataset(tmp_path / "musdb" / "test")
    before = snapshot(root)
    attempts = [
        ((root,), root, f"{root}: is the input {root}; write the output somewhere else (-o)"),
        ((root / "A" / "mixture.wav",), root, f"{root}: contains the input {root / 'A' / 'mixture.wav'}; write the output somewhere else (-o)"),
        ((root / "A" / "mixture.wav",), root / "A", f"{root / 'A'}: contains the input {root / 'A' / 'mixture.wav'}; "
                                                    "write the output somewhere else (-o)"),
        ((root,), root / "A" / "sep", f"{root / 'A' / 'sep'}: lies inside the input {root}; write the output somewhere else (-o)"),
        ((root / "B",), root.parent, f"{root.parent}: contains the input {root / 'B'}; write the output somewhere else (-o)"),
    ]
    for inputs, out, message in attempts:
        r = run_cli("separate", *inputs, "--model", umx_folder, "-o", out, "--force", "--niter", "0")
        assert error_line(r) == f"umxtools: error: {message}"
        assert snapshot(root) == before, (inputs, out)
    # the list file and the model folder are inputs too
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "test.txt").write_text(f"{root / 'A'}\n")
    r = run_cli("separate", "--list", lists / "test.txt", "--model", umx_folder, "-o", lists, "--force")
    assert error_line(r) == (f"umxtools: error: {lists}: contains the input list {lists / 'test.txt'}; "
                             "write the output somewhere else (-o)")
    assert (lists / "test.txt").read_text() == f"{root / 'A'}\n"
    model_before = snapshot(umx_folder)
    r = run_cli("separate", root / "A", "--model", umx_folder, "-o", umx_folder / "sep", "--force")
    assert error_line(r) == (f"umxtools: error: {umx_folder / 'sep'}: lies inside the model folder {umx_folder}; "
                             "write the output somewhere else (-o)")
    assert snapshot(umx_folder) == model_before and snapshot(root) == before


def test_force_replaces_an_earlier_separation_never_another_folder(run_cli, umx_folder, song, tmp_path):
    out = tmp_path / "out"
    (out / "song").mkdir(parents=True)
    (out / "song" / "notes.txt").write_bytes(VICTIM)  # a folder of something else that has the name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "separation.json").write_text("{}")
    (out / "link").symlink_to(elsewhere)  # a link to someone's folder, even one with separation.json
    link_song = tmp_path / "link.wav"
    shutil.copy(song, link_song)
    for src, name in ((song, "song"), (link_song, "link")):
        r = run_cli("separate", src, "--model", umx_folder, "-o", out, "--force", "--niter", "0")
        assert error_line(r) == (f"umxtools: error: {out / name}: exists and was not made by umxtools separate (no separation.json "
                                 "in it); --force replaces only earlier separations: remove it yourself or choose another -o")
    assert (out / "song" / "notes.txt").read_bytes() == VICTIM and (elsewhere / "separation.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["link", "song"]  # no partial folder left
    # an earlier separation is replaced
    (out / "song" / "notes.txt").unlink()
    (out / "song").rmdir()
    assert run_cli("separate", song, "--model", umx_folder, "-o", out, "--niter", "0").code == 0
    first = json.loads((out / "song" / "separation.json").read_text())["created"]
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--niter", "0", "--force")
    assert r.code == 0, r.err
    assert json.loads((out / "song" / "separation.json").read_text())["created"] != first
    assert sorted(p.name for p in out.iterdir()) == ["link", "song"]


def test_an_input_whose_name_is_not_a_folder_name_cannot_target_the_output_itself(run_cli, umx_folder, song, tmp_path):
    odd = tmp_path / "in" / "..wav"  # its output folder would be OUT/. = OUT itself
    odd.parent.mkdir()
    shutil.copy(song, odd)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_bytes(VICTIM)
    r = run_cli("separate", odd, song, "--model", umx_folder, "-o", out, "--force", "--niter", "0")
    assert r.code == 1 and r.out.split() == [str(out / "song")]
    assert error_line(r) == f"umxtools: error: {odd}: output name '.' is not a file name; it must be a plain file name"
    assert (out / "keep.txt").read_bytes() == VICTIM and sorted(p.name for p in out.iterdir()) == ["keep.txt", "song"]


# --- names from model files and flags never leave -o ------------------------------------------------


def _joint_model_json(folder: Path, targets: list[str]) -> Path:
    """A model folder with no code in it: umxtools' own joint class, random weights, given target names."""
    from umxtools.models.joint import OpenUnmixJoint

    folder.mkdir(parents=True)
    joint = OpenUnmixJoint(targets, hidden_size=8, nb_layers=1, max_bin=1487)
    torch.save(joint.state_dict(), folder / "model.pth")
    (folder / "model.json").write_text(json.dumps({
        "format": "umxtools.model", "format_version": 1, "kind": "spectrogram", "class": "umxtools.models.joint:OpenUnmixJoint",
        "args": {"targets": targets, "hidden_size": 8, "nb_layers": 1, "max_bin": 1487}, "targets": targets,
        "weights": "model.pth", "sample_rate": 44100, "n_fft": 4096, "n_hop": 1024, "nb_channels": 2}))
    return folder


def test_model_json_target_names_cannot_write_outside_the_output(run_cli, song, tmp_path):
    victim = tmp_path / "evil.wav"  # where OUT/.song.partial/../../evil.wav lands
    victim.write_bytes(VICTIM)
    model = _joint_model_json(tmp_path / "models" / "crafted", ["vocals", "../../evil"])
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    r = run_cli("separate", song, "--model", model, "-o", out)
    assert error_line(r) == (f"umxtools: error: {model / 'model.json'}: target '../../evil' contains a path separator; "
                             "it must be a plain file name")
    assert snapshot(tmp_path) == before and not out.exists()
    # the weights file it names is a name in the folder too
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**meta, "targets": ["vocals", "drums"], "weights": "../../evil.wav"}))
    r = run_cli("separate", song, "--model", model, "-o", out)
    assert error_line(r) == (f"umxtools: error: {model / 'model.json'}: weights file '../../evil.wav' contains a path separator; "
                             "it must be a plain file name")
    assert victim.read_bytes() == VICTIM and not out.exists()


def test_separator_json_target_names_cannot_write_outside_the_output(run_cli, umx_folder, song, tmp_path):
    victim = tmp_path / "evil.wav"
    victim.write_bytes(VICTIM)
    model = tmp_path / "models" / "crafted"
    shutil.copytree(umx_folder, model)
    shutil.copy(model / "bass.pth", tmp_path / "evil.pth")  # weights where "../../evil.pth" finds them
    conf = json.loads((model / "separator.json").read_text())
    (model / "separator.json").write_text(json.dumps({**conf, "targets": ["vocals", "../../evil"]}))
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    r = run_cli("separate", song, "--model", model, "-o", out)
    assert error_line(r) == (f"umxtools: error: {model / 'separator.json'}: target '../../evil' contains a path separator; "
                             "it must be a plain file name")
    assert snapshot(tmp_path) == before and not out.exists()


def test_crafted_copy_of_the_open_unmix_fixture_is_refused(run_cli, song, tmp_path):
    model = tmp_path / "compat"
    shutil.copytree(need_shared(COMPAT / "model"), model)
    model.chmod(0o755)
    (model / "separator.json").chmod(0o644)
    conf = json.loads((model / "separator.json").read_text())
    (model / "separator.json").write_text(json.dumps({**conf, "targets": ["../../../evil", "vocals"]}))
    r = run_cli("separate", song, "--model", model, "-o", tmp_path / "out")
    assert error_line(r) == (f"umxtools: error: {model / 'separator.json'}: target '../../../evil' contains a path separator; "
                             "it must be a plain file name")
    assert not (tmp_path / "out").exists()


def test_flag_names_cannot_write_outside_the_output(run_cli, umx_folder, song, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "x.wav").write_bytes(VICTIM)
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--aggregate", "../x=vocals", "--aggregate", "rest=drums")
    assert error_line(r) == "umxtools: error: --aggregate: aggregate name '../x' contains a path separator; it must be a plain file name"
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--aggregate", "..=vocals")
    assert error_line(r) == "umxtools: error: --aggregate: aggregate name '..' is not a file name; it must be a plain file name"
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--targets", "vocals,../x")
    assert error_line(r) == "umxtools: error: --targets: target '../x' contains a path separator; it must be a plain file name"
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--aggregate", "=vocals")
    assert error_line(r) == "umxtools: error: aggregate '=vocals' is not NAME=TARGET+TARGET..."
    assert (tmp_path / "x.wav").read_bytes() == VICTIM and not out.exists()


# --- no code from data --------------------------------------------------------------------------------


def _code_model(folder: Path, marker: Path, spec: str = "payload.py:Half") -> Path:
    """A waveform model folder whose model.json names a Python file that leaves ``marker`` when imported."""
    folder.mkdir(parents=True)
    (folder / "payload.py").write_text(
        "import pathlib, torch\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "class Half(torch.nn.Module):\n"
        "    kind = 'waveform'\n"
        "    def forward(self, x):\n"
        "        return (x / 2)[:, None]\n")
    torch.save({}, folder / "model.pth")
    (folder / "model.json").write_text(json.dumps({"format": "umxtools.model", "kind": "waveform", "class": spec, "args": {},
                                                   "targets": ["vocals"], "weights": "model.pth", "sample_rate": 44100}))
    return folder


def test_model_folder_code_runs_only_when_trusted(run_cli, song, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    model = _code_model(tmp_path / "downloaded", marker)
    hint = "if you trust this model folder, pass --trust-code (or set UMXTOOLS_TRUST_CODE=1)"
    r = run_cli("separate", song, "--model", model, "-o", tmp_path / "out")
    assert error_line(r) == (f"umxtools: error: {model / 'model.json'}: its class 'payload.py:Half' is Python code from outside "
                             f"umxtools, which would run on load; {hint}")
    # a module outside umxtools is code too (an absolute path, a module on sys.path, a builtin)
    for spec in (f"{model / 'payload.py'}:Half", "payload:Half", "subprocess:Popen", "umxtools.models.joint.py:X"):
        meta = json.loads((model / "model.json").read_text())
        (model / "model.json").write_text(json.dumps({**meta, "class": spec}))
        r = run_cli("separate", song, "--model", model, "-o", tmp_path / "out")
        assert error_line(r) == (f"umxtools: error: {model / 'model.json'}: its class {spec!r} is Python code from outside "
                                 f"umxtools, which would run on load; {hint}")
    assert not marker.exists() and not (tmp_path / "out").exists()
    # opting in: the flag, or the environment variable the bin/ scripts pass through
    (model / "model.json").write_text(json.dumps({**meta, "class": "payload.py:Half"}))
    r = run_cli("separate", song, "--model", model, "-o", tmp_path / "flag", "--trust-code")
    assert r.code == 0, r.err
    assert marker.exists() and (tmp_path / "flag" / "song" / "vocals.wav").exists()
    monkeypatch.setenv("UMXTOOLS_TRUST_CODE", "1")
    r = run_cli("separate", song, "--model", model, "-o", tmp_path / "env")
    assert r.code == 0, r.err
    assert (tmp_path / "env" / "song" / "vocals.wav").exists()
    monkeypatch.setenv("UMXTOOLS_TRUST_CODE", "0")
    assert "--trust-code" in error_line(run_cli("separate", song, "--model", model, "-o", tmp_path / "env0"))


def test_a_failing_trusted_model_is_one_line_per_input(run_cli, song, tmp_path):
    model = tmp_path / "broken"
    model.mkdir()
    (model / "broken.py").write_text(
        "import torch\n"
        "class Broken(torch.nn.Module):\n"
        "    kind = 'waveform'\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError('boom\\nsecond line')\n")
    torch.save({}, model / "model.pth")
    (model / "model.json").write_text(json.dumps({"format": "umxtools.model", "kind": "waveform", "class": "broken.py:Broken",
                                                  "args": {}, "targets": ["vocals"], "weights": "model.pth", "sample_rate": 44100}))
    r = run_cli("separate", song, "--model", model, "-o", tmp_path / "out", "--trust-code")
    assert error_line(r) == f"umxtools: error: {song}: the model failed on this input (RuntimeError: boom); --debug shows the traceback"
    assert list((tmp_path / "out").iterdir()) == []  # no partial folder


def test_pickled_code_in_a_model_folder_never_runs(run_cli, umx_folder, song, tmp_path):
    marker = tmp_path / "code-ran"
    model = tmp_path / "model"
    shutil.copytree(umx_folder, model)
    torch.save({"fc1.weight": RunsCode(marker)}, model / "vocals.pth")  # torch's zip format
    r = run_cli("separate", song, "--model", model, "-o", tmp_path / "out")
    assert error_line(r) == (f"umxtools: error: {model / 'vocals.pth'}: not a plain weights file (it would run code on load, or it "
                             "is damaged); nothing in it was run: get it again from a source you trust, or save the weights as a "
                             "state dict (torch.save(model.state_dict(), PATH))")
    import pickle

    with open(model / "vocals.pth", "wb") as f:  # a plain (legacy) pickle
        pickle.dump({"fc1.weight": RunsCode(marker)}, f, protocol=2)
    r = run_cli("separate", song, "--model", model, "-o", tmp_path / "out")
    assert error_line(r).startswith(f"umxtools: error: {model / 'vocals.pth'}: not a plain weights file (it would run code on load")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pickled_code_in_the_hub_cache_never_runs(run_cli, song, tmp_path, monkeypatch):
    """The README tells offline users to copy published weights into torch.hub's cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "code-ran"
    cached = pretrained.hub_file(pretrained.PUBLISHED["umxse"].urls["speech"])
    cached.parent.mkdir(parents=True)
    torch.save({"fc1.weight": RunsCode(marker)}, cached)
    r = run_cli("separate", song, "--model", "umxse", "-o", tmp_path / "out", "--targets", "speech")
    assert error_line(r).startswith(f"umxtools: error: {cached}: not a plain weights file (it would run code on load")
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- read-only and full output locations ----------------------------------------------------------


def _unwritable(tmp_path: Path) -> Path:
    """A folder no file can be created in: read-only permissions, or (as root, who ignores them) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"
    probe = Path("/sys/umxtools-test-output")
    try:
        probe.mkdir()
    except OSError:
        return probe
    probe.rmdir()
    pytest.skip("running as root with a writable /sys: no folder here refuses writes")


def test_read_only_output_is_reported_before_any_separation(run_cli, umx_folder, song, tmp_path):
    out = _unwritable(tmp_path)
    r = run_cli("separate", song, "--model", umx_folder, "-o", out)
    assert error_line(r) == f"umxtools: error: {out}: permission denied"
    assert r.out == ""


def test_full_disk_during_a_separation_is_one_line_and_leaves_nothing_partial(umx_folder, song, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) fails libsndfile's writes as a full disk does."""
    out = tmp_path / "out"

    def limit():  # in the child: a stem of 0.5 s (176 kB) cannot be written, separation.json could
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-m", "umxtools", "separate", str(song), "--model", str(umx_folder), "-o", str(out),
                        "--niter", "0", "-q"], capture_output=True, text=True, env=env, preexec_fn=limit, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [f"umxtools: error: {out / 'song'}: file too large for this file system"]
    assert r.stdout == "" and list(out.iterdir()) == []  # the partial folder was removed
