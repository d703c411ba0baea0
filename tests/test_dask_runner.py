"""The Beam pipelines on a real cluster engine: a dask.distributed scheduler and two workers, each its own process
on 127.0.0.1, driven through Beam's Dask runner. The tables must be byte-identical to the local runner's on the
same input, bad files (and their error rows) included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from pipelines.dataset import build_dataset
from pipelines.scores import build_scores
from tests.dask_cluster import local_cluster
from tests.test_faults import SR, _folder, _wave, params
from tests.test_scores import SATB, _params, _write_score

TIMING_KEYS = {"build_seconds"}


@pytest.fixture(scope="module")
def dask_cluster():
    """tcp address of a scheduler with two single-threaded workers (separate processes, loopback only)."""
    with local_cluster(workers=2) as address:
        yield address


def _files(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.iterdir()):
        if f.name == "_stats.json":
            stats = json.loads(f.read_text())
            out[f.name] = json.dumps({k: v for k, v in stats.items() if k not in TIMING_KEYS}, sort_keys=True).encode()
        elif f.is_file() and not f.name.startswith("."):
            out[f.name] = f.read_bytes()
    return out


def _dask(address: str) -> dict:
    return {"runner": "DaskRunner", "beam_args": [f"--dask_client_address={address}"]}


def test_dataset_build_on_dask_matches_the_local_runner_byte_for_byte(tmp_path, dask_cluster):
    src = _folder(tmp_path / "in", n=3)
    (src / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")  # an error row on both runners
    sf.write(src / "short.wav", _wave(1.0, 5), SR)  # too short for a clip: a source with no clips
    local = build_dataset(str(src), str(tmp_path / "local"), params())
    dask = build_dataset(str(src), str(tmp_path / "dask"), params(), **_dask(dask_cluster))
    assert local.stats["clips"] == dask.stats["clips"] == 6
    assert _files(tmp_path / "local") == _files(tmp_path / "dask")
    # a refresh on the cluster carries the unchanged files' rows over, as the local runner does
    sf.write(src / "piece9.wav", _wave(8.5, 9), SR)
    local = build_dataset(str(src), str(tmp_path / "local"), params())
    dask = build_dataset(str(src), str(tmp_path / "dask"), params(), **_dask(dask_cluster))
    assert dask.stats["files_unchanged"] == local.stats["files_unchanged"] >= 3
    assert dask.stats["clips"] == local.stats["clips"] == 8
    assert _files(tmp_path / "local") == _files(tmp_path / "dask")


def test_scores_build_on_dask_matches_the_local_runner_byte_for_byte(tmp_path, dask_cluster):
    src = tmp_path / "in"
    src.mkdir()
    _write_score(src / "good.musicxml", SATB)
    _write_score(src / "three.musicxml", SATB[:3])
    (src / "garbage.mid").write_bytes(b"not a midi file")
    (src / "notes.txt").write_text("not a score")
    local = build_scores([str(src)], str(tmp_path / "local"), _params())
    dask = build_scores([str(src)], str(tmp_path / "dask"), _params(), **_dask(dask_cluster))
    assert local.stats["sources"] == dask.stats["sources"] == {"ok": 1, "partial": 0, "error": 2, "skipped": 1}
    assert _files(tmp_path / "local") == _files(tmp_path / "dask")
