"""`umxtools separate`: model folders and published names, inputs, outputs, bad input, processes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import COMPAT, REPO, error_line, need_shared
from tests.test_separate import TARGETS, music, random_umx, write_umx_folder
from umxtools import pretrained
from umxtools.models import ModelError
from umxtools.models.loading import load_model
from umxtools.separation import SeparationSettings, Separator


@pytest.fixture(scope="module")
def umx_folder(tmp_path_factory) -> Path:
    return write_umx_folder(tmp_path_factory.mktemp("model") / "umx", hidden=8)


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("songs") / "song.wav"
    sf.write(path, music(1.5).T, 44100, subtype="FLOAT")
    return path


def stems(folder: Path, names=TARGETS) -> dict[str, np.ndarray]:
    return {n: sf.read(folder / f"{n}.wav", dtype="float32", always_2d=True)[0].T for n in names}


# --- the command ---------------------------------------------------------------------------------


def test_separates_into_folders_with_a_record(run_cli, umx_folder, song, tmp_path):
    r = run_cli("separate", song, "--model", umx_folder, "-o", tmp_path / "out", "--device", "cpu")
    assert r.code == 0, r.err
    folder = tmp_path / "out" / "song"
    assert r.out.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(f"{t}.wav" for t in TARGETS), "separation.json"])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left
    audio, _ = sf.read(song, dtype="float32", always_2d=True)
    expected = Separator(load_model(umx_folder), SeparationSettings()).separate(audio.T)
    for name, x in stems(folder).items():
        assert sf.info(folder / f"{name}.wav").subtype == "FLOAT"
        np.testing.assert_array_equal(x, expected[name])
    record = json.loads((folder / "separation.json").read_text())
    assert record["format"] == "umxtools.separation"
    assert record["input"]["sha256"] == hashlib.sha256(song.read_bytes()).hexdigest()
    assert record["input"]["frames"] == audio.shape[0] and record["output"]["frames"] == audio.shape[0]
    assert record["settings"] == {"niter": 1, "softmask": False, "residual": False, "wiener_win_len": 300, "aggregate": None,
                                  "segment": None, "overlap": 0.25, "device": "cpu", "shifts": 0, "batch_size": None,
                                  "num_overlap": None, "seed": 0}
    assert record["model"]["format"] == "openunmix" and set(record["model"]["files"]) == {f"{t}.pth" for t in TARGETS}
    assert record["command"][:2] == ["umxtools", "separate"]


def test_settings_targets_aggregate_and_residual(run_cli, umx_folder, song, tmp_path):
    r = run_cli("separate", song, "--model", umx_folder, "-o", tmp_path, "--targets", "vocals,drums", "--residual", "--niter", "2",
                "--softmask", "--wiener-win-len", "0", "--aggregate", "vocals=vocals", "--aggregate", "rest=drums+residual")
    assert r.code == 0, r.err
    audio = sf.read(song, dtype="float32", always_2d=True)[0].T
    settings = SeparationSettings(niter=2, softmask=True, residual=True, wiener_win_len=None)
    ref = Separator(load_model(umx_folder, ["vocals", "drums"]), settings).separate(audio)
    out = stems(tmp_path / "song", ["vocals", "rest"])
    np.testing.assert_allclose(out["vocals"], ref["vocals"], atol=1e-7)
    np.testing.assert_allclose(out["rest"], ref["drums"] + ref["residual"], atol=1e-7)
    assert not (tmp_path / "song" / "drums.wav").exists()


def test_rates_channels_excerpts_and_formats(run_cli, umx_folder, tmp_path):
    mono48 = tmp_path / "in" / "mono48.flac"
    mono48.parent.mkdir()
    sf.write(mono48, music(1.2, rate=48000)[0], 48000, subtype="PCM_24")
    r = run_cli("separate", mono48, "--model", umx_folder, "-o", tmp_path / "a", "--format", "flac", "--bits", "16")
    assert r.code == 0, r.err
    assert "resampling from 48000 Hz to the model's 44100 Hz and back" in r.err
    info = sf.info(tmp_path / "a" / "mono48" / "vocals.flac")
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (48000, 2, round(1.2 * 48000), "PCM_16")
    r = run_cli("separate", mono48, "--model", umx_folder, "-o", tmp_path / "b", "--no-keep-rate", "--start", "0.2",
                "--duration", "0.5")
    assert r.code == 0, r.err
    info = sf.info(tmp_path / "b" / "mono48" / "vocals.wav")
    assert (info.samplerate, info.frames) == (44100, round(0.5 * 44100))
    record = json.loads((tmp_path / "b" / "mono48" / "separation.json").read_text())
    assert record["input"]["start_s"] == 0.2 and record["input"]["duration_s"] == 0.5


def test_integer_output_clips_with_a_warning_or_rescales(run_cli, umx_folder, tmp_path):
    loud = tmp_path / "loud.wav"
    sf.write(loud, (music(1.0, silence=None) * 12).T, 44100, subtype="FLOAT")  # estimates beyond full scale
    r = run_cli("separate", loud, "--model", umx_folder, "-o", tmp_path / "c", "--bits", "16", "--residual")
    assert r.code == 0, r.err
    assert "samples clipped at full scale" in r.err and "--clip rescale" in r.err
    float_out = run_cli("separate", loud, "--model", umx_folder, "-o", tmp_path / "f", "--residual")
    assert float_out.code == 0 and "clipped" not in float_out.err
    for name in ("vocals", "residual"):
        ints, _ = sf.read(tmp_path / "c" / "loud" / f"{name}.wav", dtype="int16")
        floats, _ = sf.read(tmp_path / "f" / "loud" / f"{name}.wav", dtype="float32")
        # no wrap-around: every sample has the sign of the float estimate and is at most full scale
        assert np.all((ints.astype(np.int32) * np.sign(floats) >= 0) | (np.abs(floats) < 1e-4))
        np.testing.assert_allclose(ints / 32768, np.clip(floats, -1, 32767 / 32768), atol=1 / 32768)
    r = run_cli("separate", loud, "--model", umx_folder, "-o", tmp_path / "r", "--bits", "24", "--clip", "rescale", "--residual")
    assert r.code == 0 and "clipped" not in r.err
    record = json.loads((tmp_path / "r" / "loud" / "separation.json").read_text())
    gain = record["output"]["gain"]
    assert 0 < gain < 1 and all(v == 0 for v in record["output"]["clipped_samples"].values())
    peak = max(np.abs(sf.read(tmp_path / "f" / "loud" / f"{n}.wav")[0]).max() for n in [*TARGETS, "residual"])
    for n in [*TARGETS, "residual"]:
        rescaled, _ = sf.read(tmp_path / "r" / "loud" / f"{n}.wav", dtype="float64")
        floats, _ = sf.read(tmp_path / "f" / "loud" / f"{n}.wav", dtype="float64")
        np.testing.assert_allclose(rescaled, floats * gain, atol=2 / 2**23)
    assert gain == pytest.approx((2**23 - 1) / 2**23 / peak, rel=1e-6)


def test_inputs_from_folders_and_lists(run_cli, umx_folder, song, tmp_path, monkeypatch):
    root = tmp_path / "musdb" / "test"
    for track in ("A", "B"):
        (root / track).mkdir(parents=True)
        sf.write(root / track / "mixture.wav", music(0.5, seed=ord(track)).T, 44100)
    r = run_cli("separate", root, root.parent / "test" / "A", "-o", tmp_path / "o", "--model", umx_folder, "--niter", "0")
    assert r.code == 1
    # a track folder holds mixture.wav: named after the folder; the second A collides with the first
    assert r.out.split() == [str(tmp_path / "o" / "A"), str(tmp_path / "o" / "B")]
    assert error_line(r) == f"umxtools: error: {root / 'A' / 'mixture.wav'}: has the same output name 'A' as {root / 'A' / 'mixture.wav'}"
    listing = tmp_path / "list.txt"
    listing.write_text(f"# songs\n{song}\n\n{root / 'B'}\n")
    r = run_cli("separate", "--list", listing, "-o", tmp_path / "l", "--model", umx_folder, "--niter", "0")
    assert r.code == 0 and r.out.split() == [str(tmp_path / "l" / "song"), str(tmp_path / "l" / "B")]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{song}\n"))
    r = run_cli("separate", "--list", "-", "-o", tmp_path / "s", "--model", umx_folder, "--niter", "0")
    assert r.code == 0 and r.out.split() == [str(tmp_path / "s" / "song")]


def test_a_rerun_skips_what_is_done_and_refuses_other_settings(run_cli, umx_folder, song, tmp_path):
    """A requeued task reruns the same command: it must succeed without redoing finished tracks,
    and never keep a folder made with other settings as if it were this run's."""
    other = tmp_path / "other.wav"
    sf.write(other, music(0.6, seed=3).T, 44100, subtype="FLOAT")
    r = run_cli("separate", song, "--model", umx_folder, "-o", tmp_path / "o", "--niter", "0")
    assert r.code == 0 and r.err.splitlines() == ["separated 1, skipped 0 already done"]
    record = (tmp_path / "o" / "song" / "separation.json").read_bytes()
    r = run_cli("separate", song, other, "--model", umx_folder, "-o", tmp_path / "o", "--niter", "0")
    assert r.code == 0, r.err
    assert r.out.split() == [str(tmp_path / "o" / "song"), str(tmp_path / "o" / "other")]  # what is done is still listed
    assert r.err.splitlines() == ["separated 1, skipped 1 already done"]
    assert (tmp_path / "o" / "song" / "separation.json").read_bytes() == record  # not redone
    song_folder = tmp_path / "o" / "song"
    for flags, difference in ((["--niter", "1"], "settings.niter 0 there, 1 now"),
                              (["--niter", "0", "--targets", "vocals"], 'outputs ["vocals", "drums", "bass", "other"] there, ["vocals"] now'),
                              (["--niter", "0", "--bits", "16"], 'output.bits "32f" there, "16" now'),
                              (["--niter", "0", "--start", "0.1"], "excerpt.start_s 0.0 there, 0.1 now")):
        r = run_cli("separate", song, "--model", umx_folder, "-o", tmp_path / "o", *flags)
        assert error_line(r) == (f"umxtools: error: {song_folder}: holds a separation made with other settings ({difference}); "
                                 "pass --force to replace it, or choose another -o"), flags
    other_model = write_umx_folder(tmp_path / "model2", seed=5, hidden=8)  # same shapes, other weights
    r = run_cli("separate", song, "--model", other_model, "-o", tmp_path / "o", "--niter", "0")
    assert error_line(r).startswith(f"umxtools: error: {song_folder}: holds a separation made with other settings "
                                    "(model.weights.vocals.pth ")
    changed = tmp_path / "in" / "song.wav"  # another file of the same name: the same output folder
    changed.parent.mkdir()
    sf.write(changed, music(1.5, seed=9).T, 44100, subtype="FLOAT")
    r = run_cli("separate", changed, "--model", umx_folder, "-o", tmp_path / "o", "--niter", "0")
    assert error_line(r) == (f"umxtools: error: {song_folder}: holds the separation of another content of {changed.resolve()} "
                             "(the input changed since); pass --force to replace it")
    assert (song_folder / "separation.json").read_bytes() == record
    r = run_cli("separate", song, "--model", umx_folder, "-o", tmp_path / "o", "--niter", "0", "--force", "--targets", "vocals")
    assert r.code == 0 and r.err.splitlines() == ["separated 1, skipped 0 already done"]
    assert sorted(p.name for p in song_folder.iterdir()) == ["separation.json", "vocals.wav"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["other", "song"]  # no lock, no temporary left


def test_a_folder_that_lost_a_stem_is_redone(run_cli, umx_folder, song, tmp_path):
    assert run_cli("separate", song, "--model", umx_folder, "-o", tmp_path, "--niter", "0").code == 0
    (tmp_path / "song" / "bass.wav").unlink()
    r = run_cli("separate", song, "--model", umx_folder, "-o", tmp_path, "--niter", "0")
    assert r.code == 0 and r.err.splitlines() == ["separated 1, skipped 0 already done"]
    assert (tmp_path / "song" / "bass.wav").exists()


def test_jobs_give_the_same_stems(run_cli, umx_folder, tmp_path):
    inputs = []
    for i in range(3):
        inputs.append(tmp_path / f"s{i}.wav")
        sf.write(inputs[-1], music(0.6, seed=i).T, 44100, subtype="FLOAT")
    assert run_cli("separate", *inputs, "--model", umx_folder, "-o", tmp_path / "one").code == 0
    r = run_cli("separate", *inputs, "--model", umx_folder, "-o", tmp_path / "two", "--jobs", "2")
    assert r.code == 0, r.err
    assert r.out.split() == [str(tmp_path / "two" / f"s{i}") for i in range(3)]
    for i in range(3):
        one, two = stems(tmp_path / "one" / f"s{i}"), stems(tmp_path / "two" / f"s{i}")
        for t in TARGETS:
            np.testing.assert_allclose(two[t], one[t], atol=1e-6)


def test_silence_gives_zeros(run_cli, umx_folder, tmp_path):
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, np.zeros((30000, 2), np.float32), 44100)
    r = run_cli("separate", quiet, "--model", umx_folder, "-o", tmp_path / "out", "--bits", "16")
    assert r.code == 0, r.err
    assert all(not x.any() for x in stems(tmp_path / "out" / "quiet").values())


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_each_and_the_rest_is_separated(run_cli, umx_folder, song, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.wav").write_text("not audio at all")
    (bad / "empty.wav").write_bytes(b"")
    nan = np.zeros((5000, 2), np.float32)
    nan[100] = np.nan
    sf.write(bad / "nan.wav", nan, 44100, subtype="FLOAT")
    sf.write(bad / "short.wav", np.zeros((4000, 2), np.float32), 44100)
    sf.write(bad / "surround.wav", np.zeros((5000, 6), np.float32), 44100)
    sf.write(bad / "nothing.wav", np.zeros((0, 2), np.float32), 44100)  # a header and no samples (was: "starts at 0 s, after its end")
    inputs = [bad / "text.wav", bad / "empty.wav", bad / "nan.wav", song, bad / "short.wav", bad / "surround.wav", bad / "none.wav",
              bad / "nothing.wav"]
    r = run_cli("separate", *inputs, "--model", umx_folder, "-o", tmp_path / "out")
    assert r.code == 1
    assert r.out.split() == [str(tmp_path / "out" / "song")]
    errors = [line for line in r.err.splitlines() if line.strip()]
    assert errors[0].startswith(f"umxtools: error: {bad / 'text.wav'}: not a readable audio file")
    assert errors[1:] == [
        f"umxtools: error: {bad / 'empty.wav'}: empty file",
        f"umxtools: error: {bad / 'nan.wav'}: contains NaN or infinite samples",
        f"umxtools: error: {bad / 'short.wav'}: is shorter than one STFT frame (4000 samples at 44100 Hz; the model needs 4096)",
        f"umxtools: error: {bad / 'surround.wav'}: has 6 channels; umxtools handles mono and stereo only",
        f"umxtools: error: {bad / 'none.wav'}: no such file",
        f"umxtools: error: {bad / 'nothing.wav'}: empty audio file (0 samples)",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["song"]  # nothing partial


def test_bad_models_and_flags(run_cli, umx_folder, song, tmp_path):
    out = tmp_path / "out"
    r = run_cli("separate", song, "--model", "umxfoo", "-o", out)
    assert error_line(r) == ("umxtools: error: umxfoo: no such model folder (made by: umxtools train CACHE -o PATH ...), and "
                              "not a published model (umxhq, umx, umxl, umxse)")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in umx_folder.iterdir():
        if f.name != "bass.pth":
            (partial / f.name).write_bytes(f.read_bytes())
    r = run_cli("separate", song, "--model", partial, "-o", out)
    assert error_line(r) == f"umxtools: error: {partial}: has no weights for target 'bass' (bass.pth)"
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--targets", "piano")
    assert error_line(r) == f"umxtools: error: {umx_folder}: has no target 'piano' (its targets: vocals, drums, bass, other)"
    (tmp_path / "file").write_text("")
    r = run_cli("separate", song, "--model", umx_folder, "-o", tmp_path / "file" / "out")
    assert error_line(r) == f"umxtools: error: {tmp_path / 'file' / 'out'}: a part of the path is a file, not a folder"
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--format", "flac", "--bits", "32f")
    assert error_line(r) == "umxtools: error: FLAC holds 16- or 24-bit integers, not float: --bits 16 or 24"
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--targets", "vocals")
    assert error_line(r) == ("umxtools: error: Wiener EM (--niter 1) needs two or more outputs and this separation has only "
                             "'vocals': add --residual (the mixture minus it, written as 'accompaniment') or pass --niter 0")
    r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--segment", "2")
    assert "UMX models are separated whole" in error_line(r)
    if not torch.cuda.is_available():
        r = run_cli("separate", song, "--model", umx_folder, "-o", out, "--device", "cuda")
        assert error_line(r) == "umxtools: error: device 'cuda': CUDA is not available on this machine"
    assert run_cli("separate", song, "--model", umx_folder, "-o", out, "--aggregate", "x").code == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name not in ("partial", "file")]


def test_messages_are_one_line_naming_the_file(run_cli, umx_folder, song, tmp_path):
    # a Slurm array with more tasks than inputs: the extra task used to exit 0 having done nothing
    r = run_cli("separate", song, "--model", umx_folder, "-o", tmp_path / "o", "--shard", "1/2")
    assert error_line(r) == "umxtools: error: shard 1/2 selects none of the 1 input(s): use at most 1 shard(s) (Slurm array tasks)"
    # a file where a folder is expected, a folder where a file is expected: not Click's 3-line usage error
    r = run_cli("separate", song, "--model", umx_folder, "-o", song)
    assert error_line(r) == f"umxtools: error: {song}: is a file; -o names the folder that receives one <input name>/ folder per input"
    r = run_cli("separate", "--list", tmp_path, "--model", umx_folder, "-o", tmp_path / "o")
    assert error_line(r) == (f"umxtools: error: {tmp_path}: is a folder; --list takes a file of input paths, one a line "
                             "(a folder itself can be an input)")
    assert not (tmp_path / "o").exists()


def test_stderr_off_a_terminal_holds_only_the_lines(umx_folder, song, tmp_path):
    """In a job's log file the progress bar used to leave an empty line before every message."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "umxtools", "separate", str(song), "--model", str(umx_folder), "-o", str(tmp_path / "o"), "--niter", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert (r.returncode, r.stderr) == (0, "separated 1, skipped 0 already done\n")
    r = subprocess.run([*cmd, "--niter", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("umxtools: error: ") and len(r.stderr.splitlines()) == 1, r.stderr


# --- model folders --------------------------------------------------------------------------------


def test_loads_openunmix_folders_as_open_unmix_does(openunmix, tmp_path):
    folder = need_shared(COMPAT / "model")
    model = load_model(folder)
    assert model.targets == ["vocals", "drums", "bass", "other"] and model.kind == "spectrogram"
    assert (model.sample_rate, model.n_fft, model.n_hop, model.nb_channels) == (44100, 4096, 1024, 2)
    ref = openunmix.utils.load_target_models(["drums"], str(folder))["drums"]
    for name, value in ref.state_dict().items():
        assert torch.equal(model.umx["drums"].state_dict()[name], value), name
    # torch.hub-style names (<target>-<hash>.pth), one LSTM layer, unidirectional: read off the weights
    hub = tmp_path / "hub"
    write_umx_folder(hub, targets=["vocals"], nb_layers=1, unidirectional=True)
    (hub / "vocals.pth").rename(hub / "vocals-0123abcd.pth")
    m = load_model(hub).umx["vocals"]
    assert (m.lstm.num_layers, m.lstm.bidirectional, m.hidden_size) == (1, False, 8)


def test_model_json_folders(tmp_path):
    """umxtools' own format: a joint model runs per target (bounded memory), any other whole."""
    OpenUnmixJoint = pytest.importorskip("umxtools.models.joint").OpenUnmixJoint

    joint = OpenUnmixJoint(["vocals", "bass"], hidden_size=8, nb_layers=1, max_bin=1487).eval()
    folder = tmp_path / "joint"
    folder.mkdir()
    torch.save(joint.state_dict(), folder / "model.pth")
    meta = {"format": "umxtools.model", "format_version": 1, "kind": "spectrogram", "class": "umxtools.models.joint:OpenUnmixJoint",
            "args": {"targets": ["vocals", "bass"], "hidden_size": 8, "nb_layers": 1, "max_bin": 1487}, "targets": ["vocals", "bass"],
            "weights": "model.pth", "sample_rate": 44100, "n_fft": 4096, "n_hop": 1024, "nb_channels": 2}
    (folder / "model.json").write_text(json.dumps(meta))
    model = load_model(folder, ["bass"])
    assert model.umx is not None and list(model.umx) == ["bass"] and model.module is None
    # a time-domain model from a file beside model.json
    wave = tmp_path / "wave"
    wave.mkdir()
    (wave / "gains.py").write_text(
        "import torch\n"
        "class Gains(torch.nn.Module):\n"
        "    kind = 'waveform'\n"
        "    def __init__(self, n=2):\n"
        "        super().__init__()\n"
        "        self.g = torch.nn.Parameter(torch.arange(1.0, n + 1) / 10)\n"
        "    def forward(self, x):\n"
        "        return x[:, None] * self.g[None, :, None, None]\n")
    torch.save({"g": torch.tensor([0.1, 0.2])}, wave / "model.pth")
    (wave / "model.json").write_text(json.dumps({"format": "umxtools.model", "kind": "waveform", "class": "gains.py:Gains",
                                                 "args": {"n": 2}, "targets": ["a", "b"], "weights": "model.pth", "sample_rate": 8000}))
    model = load_model(wave, trust_code=True)
    assert model.kind == "waveform" and model.umx is None and model.chunkable
    out = Separator(model, SeparationSettings(residual=True)).separate(np.ones((2, 100), np.float32))
    np.testing.assert_allclose(out["a"], 0.1)
    np.testing.assert_allclose(out["residual"], 0.7, rtol=1e-6)
    (wave / "model.json").write_text(json.dumps({**json.loads((wave / "model.json").read_text()), "kind": "spectrogram",
                                                 "n_fft": 512, "n_hop": 128}))
    with pytest.raises(ModelError, match="says kind 'spectrogram' but gains.py:Gains is a waveform model"):
        load_model(wave, trust_code=True)


def test_waveform_model_through_the_command(run_cli, tmp_path):
    folder = tmp_path / "wave"
    folder.mkdir()
    (folder / "half.py").write_text(
        "import torch\n"
        "class Half(torch.nn.Module):\n"
        "    kind = 'waveform'\n"
        "    def forward(self, x):\n"
        "        return (x / 2)[:, None]\n")
    torch.save({}, folder / "model.pth")
    (folder / "model.json").write_text(json.dumps({"format": "umxtools.model", "kind": "waveform", "class": "half.py:Half",
                                                   "args": {}, "targets": ["vocals"], "weights": "model.pth", "sample_rate": 44100}))
    mix = tmp_path / "m.wav"
    audio = music(1.0)
    sf.write(mix, audio.T, 44100, subtype="FLOAT")
    r = run_cli("separate", mix, "--model", folder, "-o", tmp_path / "o", "--residual", "--segment", "0.3", "--overlap", "0.5",
                "--trust-code")
    assert r.code == 0, r.err
    # a vocals-only separation's residual is the accompaniment (the name eval scores)
    out = stems(tmp_path / "o" / "m", ["vocals", "accompaniment"])
    np.testing.assert_allclose(out["vocals"], audio / 2, atol=1e-7)
    np.testing.assert_allclose(out["accompaniment"], audio - out["vocals"], atol=1e-7)
    assert json.loads((tmp_path / "o" / "m" / "separation.json").read_text())["residual_output"] == "accompaniment"


# --- published models ------------------------------------------------------------------------------


def test_published_urls_are_open_unmix_s(openunmix, monkeypatch):
    import openunmix.model

    class Stub:  # no 30-million-parameter models: only the URLs are wanted
        def __init__(self, **kwargs):
            pass

        def load_state_dict(self, *a, **k):
            pass

        def eval(self):
            return self

        def to(self, *a):
            return self

    asked = []
    monkeypatch.setattr(openunmix.model, "OpenUnmix", Stub)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: asked.append(url) or {})
    for name, pub in pretrained.PUBLISHED.items():
        asked.clear()
        getattr(openunmix, f"{name}_spec")(pretrained=True)
        assert asked == list(pub.urls.values()), name
        assert list(pub.urls) == list(getattr(openunmix, f"{name}_spec")(pretrained=False)), name


def _umxse_weights(folder: Path) -> dict[str, Path]:
    """Random weights shaped like umxse's (16 kHz, n_fft 1024, mono, hidden 256), under the URL's names."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, (target, url) in enumerate(pretrained.PUBLISHED["umxse"].urls.items()):
        files[target] = folder / Path(url).name
        torch.save(random_umx(i, hidden=256, nb_bins=513, nb_channels=1, max_bin=None, nb_layers=3).state_dict(), files[target])
    return files


def test_published_model_from_the_hub_cache(openunmix, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _umxse_weights(tmp_path / "torch" / "hub" / "checkpoints")
    speech = tmp_path / "speech.wav"
    sf.write(speech, music(0.6).T, 44100, subtype="FLOAT")
    at_16k = music(0.6, rate=16000, seed=1)
    sf.write(tmp_path / "native.wav", at_16k.T, 16000, subtype="FLOAT")
    r = run_cli("separate", speech, tmp_path / "native.wav", "--model", "umxse", "-o", tmp_path / "o")
    assert r.code == 0, r.err
    for t in ("speech", "noise"):
        info = sf.info(tmp_path / "o" / "speech" / f"{t}.wav")
        assert (info.samplerate, info.frames, info.channels) == (44100, round(0.6 * 44100), 2)
    # at the model's rate (no resampling), the stems are open-unmix's own umxse() separator's,
    # which torch.hub loads from the same cache
    with torch.no_grad():
        expected = openunmix.umxse(device="cpu")(torch.from_numpy(at_16k)[None])[0].numpy()  # (targets, channels, samples)
    got = stems(tmp_path / "o" / "native", ["speech", "noise"])
    np.testing.assert_array_equal(np.stack([got["speech"], got["noise"]]), expected)  # measured: no difference
    record = json.loads((tmp_path / "o" / "speech" / "separation.json").read_text())
    assert record["model"]["source"] == "umxse" and record["model_sample_rate"] == 16000
    assert record["model"]["urls"] == pretrained.PUBLISHED["umxse"].urls


def test_published_model_download(tmp_path, monkeypatch):
    files = _umxse_weights(tmp_path / "server")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    local = {t: p.as_uri() for t, p in files.items()}
    monkeypatch.setitem(pretrained.PUBLISHED, "umxse", pretrained.Published(local, 16000, 1024, 512, 1, "test"))
    with pytest.warns(UserWarning, match=r"umxse: downloaded file://.*noise_04a6fc2d.pth to .*checkpoints"):
        model = load_model("umxse", ["noise"])
    assert model.targets == ["noise"] and (tmp_path / "torch" / "hub" / "checkpoints" / files["noise"].name).exists()
    broken = {"speech": (tmp_path / "server" / "missing_0000.pth").as_uri()}
    monkeypatch.setitem(pretrained.PUBLISHED, "umxse", pretrained.Published(broken, 16000, 1024, 512, 1, "test"))
    with pytest.raises(ModelError, match=r"umxse: cannot download file://.*missing_0000.pth .*put this file in .*checkpoints: "
                                         r"file://.*missing_0000.pth$"):
        load_model("umxse")


def test_published_download_failure_names_every_missing_file(tmp_path, monkeypatch):
    """Offline, the error used to name only the first of umxl's four files: fetching it by hand
    and retrying then failed on the next one, four times."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    files = _umxse_weights(tmp_path / "server")
    urls = {"speech": files["speech"].as_uri(), "noise": (tmp_path / "server" / "gone_1234.pth").as_uri()}
    monkeypatch.setitem(pretrained.PUBLISHED, "umxse", pretrained.Published(urls, 16000, 1024, 512, 1, "test"))
    with pytest.raises(ModelError) as info, pytest.warns(UserWarning, match="downloaded"):
        load_model("umxse")
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert str(info.value).endswith(f"without network, put this file in {hub}: {urls['noise']}")
    (hub / files["speech"].name).unlink()
    urls = {"speech": (tmp_path / "server" / "gone_0000.pth").as_uri(), "noise": urls["noise"]}
    monkeypatch.setitem(pretrained.PUBLISHED, "umxse", pretrained.Published(urls, 16000, 1024, 512, 1, "test"))
    with pytest.raises(ModelError) as info:
        load_model("umxse")
    assert str(info.value).endswith(f"without network, put these files in {hub}: {urls['speech']}, {urls['noise']}")


def test_without_model_the_default_is_used_only_from_the_hub_cache(run_cli, song, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained, "DEFAULT", "umxse")  # umxse-shaped random weights are small
    def no_download(*args):
        raise AssertionError("no download without --model")
    monkeypatch.setattr(pretrained, "download", no_download)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    # a missing input is named first: with nothing to separate, no model is looked for
    r = run_cli("separate", tmp_path / "nope.wav", "-o", tmp_path / "o")
    assert error_line(r) == f"umxtools: error: {tmp_path / 'nope.wav'}: no such file"
    r = run_cli("separate", song, "-o", tmp_path / "o")
    urls = list(pretrained.PUBLISHED["umxse"].urls.values())
    assert error_line(r) == (f"umxtools: error: umxse: no --model given, and the default model umxse is not in torch.hub's "
                             f"cache; put these files in {hub}: {', '.join(urls)} (or pass --model umxse to download them, "
                             "or --model MODEL_FOLDER)")
    assert not (tmp_path / "o").exists()
    _umxse_weights(hub)
    r = run_cli("separate", song, "-o", tmp_path / "o", "--duration", "0.5")
    assert r.code == 0, r.err
    record = json.loads((tmp_path / "o" / "song" / "separation.json").read_text())
    assert record["model"]["source"] == "umxse"
    # --device auto by default, as train: a CUDA machine separates on its GPU
    assert record["settings"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
