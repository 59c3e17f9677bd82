"""The command line: entry points, one-line errors, --debug, toy data, cache info, one flag vocabulary."""

from __future__ import annotations

import subprocess
import sys

import soundfile as sf
from click.testing import CliRunner

from tests.conftest import error_line
from umxtools import cli


def test_module_and_console_entry_points():
    for cmd in ([sys.executable, "-m", "umxtools", "--version"], ["umxtools", "--version"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("umxtools, version "), r


def test_error_is_one_line_and_debug_shows_traceback(tmp_path):
    cmd = [sys.executable, "-m", "umxtools", "cache", "info", str(tmp_path / "missing.h5")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"umxtools: error: {tmp_path / 'missing.h5'}: no such cache file (made by: umxtools cache musdb|folder|module SOURCE -o PATH)\n"
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "CacheError" in r.stderr


def test_wrong_flag_is_a_usage_error(run_cli, tmp_path):
    r = run_cli("cache", "musdb", tmp_path, "--no-such-flag", "-o", tmp_path / "x.h5")
    assert r.code == 2 and "No such option '--no-such-flag'" in r.err
    r = run_cli("cache", "musdb", tmp_path, "--dtype", "int8", "-o", tmp_path / "x.h5")
    assert r.code == 2 and "'int8' is not one of 'float16', 'float32'" in r.err
    # one line, like every other error (Click's own form is a usage block, a blank line, the error)
    assert r.err.splitlines() == ["umxtools: error: Invalid value for '--dtype': 'int8' is not one of 'float16', 'float32'. "
                                  "(see 'umxtools cache musdb --help')"]


def test_toy_command_writes_the_layout(run_cli, tmp_path):
    r = run_cli("toy", tmp_path / "t", "--tracks", "2", "--test-tracks", "1", "--seconds", "1.5", "--seed", "3")
    assert r.code == 0 and r.out.strip() == str(tmp_path / "t")
    names = sorted(p.relative_to(tmp_path / "t").as_posix() for p in (tmp_path / "t").glob("*/*"))
    assert names == ["test/toy_002", "train/toy_000", "train/toy_001"]
    assert sf.info(tmp_path / "t" / "train" / "toy_000" / "mixture.wav").frames == 66150


def test_cache_info_table(run_cli, toy_cache):
    r = run_cli("cache", "info", toy_cache)
    assert r.code == 0
    for text in ("tracks", "vocals, drums, bass, other", "n_fft 4096, hop 1024, center False", "GB per hour of audio"):
        assert text in r.out


def test_missing_dataset_root(run_cli, tmp_path):
    r = run_cli("cache", "folder", tmp_path / "none", "--layout", "trackfolder", "-o", tmp_path / "x.h5")
    assert error_line(r) == f"umxtools: error: {tmp_path / 'none'}: no such dataset folder"


# --- one vocabulary across commands ----------------------------------------------------------------


def _commands(group=None, path=()):
    """Every command of the CLI as ``(name path, click.Command)``."""
    import click

    group = group or cli.cli
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _visible(command) -> dict[str, tuple[list[str], str]]:
    """``{parameter name: (the flags --help shows, the help text)}`` of one command."""
    import click

    ctx = click.Context(command)
    shown = {}
    for param in command.params:
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record:
            flags = [f.split(" ")[0] for f in record[0].split(", ")]
            shown[param.name] = (flags, param.help)
    return shown


def test_one_flag_name_per_idea_in_every_commands_help():
    """`cache musdb --subsets` against `eval --subset`, `oracle --folder` against `eval --references`,
    `--target` against `--targets`, and two defaults of --device: one name and help each, now."""

    expected = {"subset": ["--subset"], "subsets": ["--subset"], "targets": ["--targets"], "shard": ["--shard"],
                "jobs": ["-j", "--jobs"], "quiet": ["-q", "--quiet"], "device": ["--device"], "references_dir": ["--references"]}
    helps: dict[str, set[str]] = {}
    seen = set()
    for path, command in _commands():
        shown = _visible(command)
        flags = [f for names, _ in shown.values() for f in names]
        for hidden in ("--subsets", "--folder", "--target"):
            assert hidden not in flags, (path, hidden)
        result = CliRunner().invoke(cli.cli, [*path, "--help"])
        assert result.exit_code == 0, result.output
        for hidden in ("--subsets", "--folder", "--target "):
            assert hidden not in result.output, (path, hidden)
        for name, (names, text) in shown.items():
            if name in expected:
                assert names == expected[name], (path, name, names)
                seen.add(name)
                if name not in ("subset", "subsets", "targets", "shard"):  # those name their command's default or items
                    helps.setdefault(name, set()).add(text)
        device = next((p for p in command.params if p.name == "device"), None)
        if device is not None:
            assert device.default == "auto", path
    assert seen == set(expected)  # every idea is somewhere
    assert {name: len(texts) for name, texts in helps.items()} == {name: 1 for name in helps}  # one help text each


def _parse(path: tuple[str, ...], args: list[str]) -> dict:
    """The parameters a command gets for ``args``, without running it."""
    command = cli.cli
    for name in path:
        command = command.commands[name]
    return command.make_context(path[-1], args).params


def test_the_old_names_still_parse():
    assert _parse(("cache", "musdb"), ["root", "--subsets", "test", "-o", "x.h5"])["subsets"] == "test"
    assert _parse(("cache", "musdb"), ["root", "--subset", "train,test", "-o", "x.h5"])["subsets"] == ["train", "test"]
    assert _parse(("cache", "musdb"), ["root", "--subset", "train", "--subset", "test", "-o", "x.h5"])["subsets"] == ["train", "test"]
    assert _parse(("eval",), ["est", "-o", "s", "--target", "vocals", "--targets", "drums,bass"])["targets"] == "vocals,drums,bass"
    assert _parse(("separate",), ["a.wav", "--target", "vocals"])["targets"] == "vocals"
    assert _parse(("separate",), ["a.wav"])["device"] == "auto"
    params = _parse(("train",), ["c.h5", "--valid", "v.h5", "-o", "m", "--target", "drums+bass"])
    assert (params["target"], params["targets"], params["device"]) == ("drums+bass", None, "auto")
    assert _parse(("oracle",), ["root", "--folder", "--method", "mix", "-o", "e"])["folder"] is True


def test_eval_and_oracle_take_one_subset_and_say_so(run_cli, tmp_path):
    for command in (["eval", tmp_path / "est", "--musdb", tmp_path], ["oracle", "--musdb", tmp_path, "--method", "mix"]):
        result = run_cli(*command, "-o", tmp_path / "out", "--subset", "train,test")
        assert result.code == 2
        assert "one subset per run (got train, test): run the command once per subset" in result.err
        assert not (tmp_path / "out").exists()
    result = run_cli("eval", tmp_path / "est", "--musdb", tmp_path, "-o", tmp_path / "out", "--subset", "valid")
    assert result.code == 2 and "'valid' is not a MUSDB18 subset (train, test)" in result.err
    result = run_cli("separate", tmp_path / "a.wav", "--device", "gpu0")
    assert result.code == 2 and "'gpu0' is not auto, cpu, cuda, cuda:N or mps" in result.err
