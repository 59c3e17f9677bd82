"""The Makefile's pipeline on a MUSDB18-HQ-shaped corpus: wall time and peak memory per stage.

For each corpus size (``--tracks``, default 50 and 150; two thirds train, musdb's 14 validation
tracks among them, one third test; tests/musdb_corpus.py writes it) the stages run one by one as
``make <file target>`` with every output in a temporary folder, and ``/usr/bin/time`` gives the
wall time and the peak resident set size. The peak is that of the largest single process of the
stage (Linux reports the largest descendant, not the sum: with ``JOBS=2`` two workers may hold
that much each). Stages:

- ``cache-train``, ``cache-valid``: ``umxtools cache musdb`` of musdb's train and valid splits;
- ``merge``: ``umxtools cache merge`` of the train split built as 2 shards (what bin/pipeline does);
- ``train``: ``umxtools train``, one epoch of a tiny UMX per target (validating the 14 tracks);
- ``validation``: one epoch that validates on the whole train cache, so that validation's
  memory is seen against a growing number of tracks (musdb's valid split stays 14 tracks);
- ``separate``, ``oracle`` (mix), ``eval`` (the UMX estimates), ``eval-oracle`` (the mix
  estimates), ``report``.

Memory must not grow with the number of tracks; the closing table shows both sizes side by side.

    python bench/bench_make.py --out results/bench_make.json                 # about 30 min on 2 busy cores
    python bench/bench_make.py --tracks 20 --seconds 1 --out /tmp/b.json     # a quick check
"""

from __future__ import annotations

from results_io import write_json  # noqa: E402  (bench/ is on sys.path when run as a script)

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.musdb_corpus import write_musdb_corpus  # noqa: E402

TINY = "--hidden-size 16 --seq-dur 1 --samples-per-track 1"


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time: ``{"seconds", "peak_rss_mb"}``; raises when it fails."""
    stats = log.with_suffix(".time")
    with open(log, "w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *cmd], env=env, stdout=out, stderr=out)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-2000:]}")
    seconds, kb = stats.read_text().split()[-2:]
    return {"seconds": float(seconds), "peak_rss_mb": round(int(kb) / 1024, 1)}


def run_size(tracks: int, seconds: float, work: Path) -> dict:
    train = max(14 + 1, round(tracks * 2 / 3))
    root = work / "musdb18hq"
    write_musdb_corpus(root, train=train, test=tracks - train, seconds=seconds)
    out = {"CACHE_DIR": work / "cache", "MODELS_DIR": work / "models", "EVAL_DIR": work / "eval"}
    variables = [f"{k}={v}" for k, v in {"PYTHON": sys.executable, "DATA": root, "EPOCHS": 1,
                                         "TRAIN_FLAGS": TINY, "ORACLES": "mix", **out}.items()]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    umx = [sys.executable, "-m", "umxtools"]
    cache, run = out["CACHE_DIR"], out["EVAL_DIR"] / "musdb18hq"
    logs = work / "logs"
    logs.mkdir()

    def make(target: str) -> list[str]:
        return ["make", "--no-print-directory", "-C", str(REPO), target, *variables]

    stages = {
        "cache-train": make(str(cache / "musdb18hq-train.h5")),
        "cache-valid": make(str(cache / "musdb18hq-valid.h5")),
    }
    shards = [work / "shards" / f"train-{k}.h5" for k in range(2)]
    setup = [[*umx, "cache", "musdb", str(root), "--is-wav", "--split", "train", "--shard", f"{k}/2", "-q", "-o", str(p)]
             for k, p in enumerate(shards)]
    stages["merge"] = [*umx, "cache", "merge", str(work / "shards" / "merged.h5"), *map(str, shards)]
    stages["train"] = make(str(out["MODELS_DIR"] / "musdb18hq-umx" / "separator.json"))
    stages["validation"] = [*umx, "train", str(cache / "musdb18hq-train.h5"), "--valid", str(cache / "musdb18hq-train.h5"),
                            "--target", "vocals", "-o", str(work / "validation-probe"), "--epochs", "1", *TINY.split(), "-q"]
    stages["separate"] = make(str(run / "estimates" / "umx" / ".complete"))
    stages["oracle"] = make(str(run / "estimates" / "mix" / ".complete"))
    stages["eval"] = make(str(run / "scores" / "umx" / ".complete"))
    stages["eval-oracle"] = make(str(run / "scores" / "mix" / ".complete"))
    stages["report"] = make(str(run / "report" / "report.md"))

    result = {"tracks": tracks, "train_tracks": train, "valid_tracks": 14, "test_tracks": tracks - train,
              "seconds_per_track": seconds, "stages": {}}
    for name, cmd in stages.items():
        if name == "merge":
            for i, c in enumerate(setup):
                timed(c, env, logs / f"shard-{i}.log")
        result["stages"][name] = timed(cmd, env, logs / f"{name}.log")
        print(f"{tracks} tracks  {name:12s} {result['stages'][name]}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, nargs="+", default=[50, 150], help="Corpus sizes (train + test tracks).")
    parser.add_argument("--seconds", type=float, default=2.0, help="Length of every track.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = []
    for tracks in args.tracks:
        with tempfile.TemporaryDirectory(prefix="bench_make_") as tmp:
            runs.append(run_size(tracks, args.seconds, Path(tmp)))
    result = {"benchmark": "make", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
              "runs": runs}
    write_json(args.out, result)
    names = list(runs[0]["stages"])
    print("| stage | " + " | ".join(f"{r['tracks']} tracks: s, peak RSS MB" for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in names:
        cells = [f"{r['stages'][name]['seconds']:.1f} s, {r['stages'][name]['peak_rss_mb']:.0f} MB" for r in runs]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
