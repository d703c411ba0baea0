"""The studio's JSON API on real debug-sized models from a real registry: every endpoint, and each bad request a
user or a script can send (one sentence, the right status, nothing left behind)."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf
from starlette.testclient import TestClient

from tests.studio_fixtures import build_env, make_app


@pytest.fixture(scope="module")
def env(tmp_path_factory, mlflow_template_db):
    return build_env(tmp_path_factory.mktemp("studio"), mlflow_template_db)


@pytest.fixture(scope="module")
def client(env):
    app = make_app(env)
    with TestClient(app) as c:
        yield c
    app.state.jobs.shutdown()


def wait(client, job: dict, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/jobs/{job['id']}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job['id']} still {job['status']}")


def test_health_config_and_page(client):
    assert client.get("/api/health").json()["status"] == "ok"
    assert client.get("/api/config").json()["traits"] == ["drums"]
    page = client.get("/")
    assert page.status_code == 200 and "smitin studio" in page.text and "app.js" in page.text
    assert client.get("/openapi.json").json()["paths"]["/api/steer"]["post"]


def test_steer_compare_gives_two_takes_a_trace_and_a_heatmap(client):
    job = client.post(
        "/api/steer",
        data={
            "caption": "a chorale with drums",
            "steer": json.dumps({"drums": 10}),
            "duration": "1",
            "seed": "3",
            "compare": "true",
        },
    ).json()
    job = wait(client, job)
    assert job["status"] == "done", job
    takes = {t["name"]: t for t in job["result"]["takes"]}
    assert set(takes) == {"unsteered", "steered"}
    for take in takes.values():
        wav = client.get(f"/api/jobs/{job['id']}/files/{take['wav']}")
        audio, sr = sf.read(io.BytesIO(wav.content))
        assert wav.status_code == 200 and abs(len(audio) / sr - 1.0) < 0.1
        assert client.get(f"/api/jobs/{job['id']}/files/{take['spectrogram']}").headers["content-type"] == "image/png"
    trace = takes["steered"]["trace"]["drums"]
    assert len(trace["probability"]) == len(trace["push"]) > 10 and 0 < trace["tau"] < 1
    report = client.get(f"/api/jobs/{job['id']}/files/{takes['steered']['report']}").json()
    assert report["plan"]["strengths"] == {"drums": 10.0}
    heat = job["result"]["probe_sets"]["drums"]["accuracy"]
    assert np.asarray(heat).ndim == 2
    # the unsteered take is plain generation with the same seed: a different file from the steered one
    a = client.get(f"/api/jobs/{job['id']}/files/unsteered.wav").content
    b = client.get(f"/api/jobs/{job['id']}/files/steered.wav").content
    assert a != b


def test_steer_continues_an_uploaded_clip(client, env):
    with open(env.clip_wav, "rb") as f:
        job = client.post(
            "/api/steer",
            data={"steer": "{}", "duration": "0.5", "compare": "false"},
            files={"prompt": ("clip.wav", f, "audio/wav")},
        ).json()
    job = wait(client, job)
    assert job["status"] == "done" and [t["name"] for t in job["result"]["takes"]] == ["unsteered"]
    assert "input_audio.wav" not in job["files"]  # uploads are not served back


def test_listen_reads_the_probes_and_the_detector(client, env):
    with open(env.clip_wav, "rb") as f:
        job = wait(client, client.post("/api/listen", files={"clip": ("clip.wav", f, "audio/wav")}).json())
    assert job["status"] == "done", job
    r = job["result"]
    assert 0 <= r["readings"]["drums"]["probability"] <= 1 and isinstance(r["readings"]["drums"]["present"], bool)
    assert 0 <= r["detector"]["probability"] <= 1


def test_harmonize_a_jsb_chorale_and_typed_abc(client):
    job = wait(client, client.post("/api/harmonize", data={"task": "harmonize", "chorale": "2", "steps": "8"}).json())
    assert job["status"] == "done", job
    r = job["result"]
    roll, given = np.asarray(r["roll"]), np.asarray(r["given"])
    assert roll.shape == (4, 128) and given[0].all() and not given[1:].any()
    assert sorted(r["files"]) == ["midi", "musicxml", "png", "wav"]
    for name in r["files"].values():
        assert client.get(f"/api/jobs/{job['id']}/files/{name}").status_code == 200
    typed = wait(
        client, client.post("/api/harmonize", data={"abc": "c d e f | g2 g2 | a a a a | g4 |", "steps": "4"}).json()
    )
    assert typed["status"] == "done", typed
    assert np.asarray(typed["result"]["roll"])[0, 0] == 72  # ABC c = C5 = MIDI 72, kept


def test_infill_bars_of_a_chorale(client):
    job = wait(
        client,
        client.post(
            "/api/harmonize", data={"task": "infill", "chorale": "1", "bars": "2-3", "voices": "AT", "steps": "4"}
        ).json(),
    )
    given = np.asarray(job["result"]["given"])
    assert job["status"] == "done" and not given[1:3, 16:48].any() and given[:, :16].all()


def test_compose_takes_the_page_span_as_a_bar_count(client):
    job = wait(client, client.post("/api/harmonize", data={"task": "compose", "bars": "3-4", "steps": "4"}).json())
    assert job["status"] == "done", job
    assert np.asarray(job["result"]["roll"]).shape == (4, 32)  # 2 bars of 16 sixteenths


def test_data_browse_filter_and_play(client):
    page = client.get("/api/clips", params={"split": "train", "trait": "drums"}).json()
    assert page["total"] == 2 and all(r["split"] == "train" and r["traits"]["drums"] for r in page["rows"])
    assert client.get("/api/clips", params={"q": "WITH DRUMS"}).json()["total"] == 4
    audio = client.get(f"/api/clips/{page['rows'][0]['clip_id']}/audio")
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/flac"
    assert sf.read(io.BytesIO(audio.content))[0].size > 0
    assert client.get("/api/clips/nope-nope/audio").status_code == 404


def test_registry_overview_and_gated_promotion(client):
    reg = client.get("/api/registry").json()
    names = {m["name"]: m for m in reg["models"]}
    assert {"smitin-generator", "smitin-probes-drums", "smitin-coconet"} <= set(names)
    assert names["smitin-coconet"]["aliases"]["champion"] == "1"
    dry = client.post("/api/registry/promote", data={"model": "coconet", "version": "1"}).json()
    assert dry["gates"][0]["name"] == "noop"
    refused = client.post("/api/registry/promote", data={"model": "drums", "version": "9", "confirm": "true"})
    assert refused.status_code == 400 and "has no version 9" in refused.json()["detail"]


BAD = [
    ("unknown trait", "/api/steer", {"steer": '{"bass": 5}'}, None, 400, "unknown trait"),
    ("strength NaN", "/api/steer", {"steer": '{"drums": NaN}'}, None, 400, "finite number"),
    ("duration 0", "/api/steer", {"steer": "{}", "duration": "0"}, None, 400, "duration must be"),
    ("duration 1e6", "/api/steer", {"steer": "{}", "duration": "1000000"}, None, 400, "duration must be"),
    ("steer not JSON", "/api/steer", {"steer": "drums=5"}, None, 400, "JSON object"),
    ("non-audio upload", "/api/listen", {}, ("clip", "x.wav", b"not audio at all" * 10), 400, "not audio"),
    ("wrong type by name", "/api/listen", {}, ("clip", "x.exe", b"MZ"), 400, "must be one of"),
    ("empty upload", "/api/listen", {}, ("clip", "x.wav", b""), 400, "empty"),
    ("oversize upload", "/api/listen", {}, ("clip", "x.wav", b"0" * (21 * 1024 * 1024)), 400, "larger than 20 MB"),
    ("not a score", "/api/harmonize", {}, ("score", "x.mid", b"MThd junk"), 400, "cannot be read as a score"),
    ("bad task", "/api/harmonize", {"task": "remix"}, None, 400, "task must be"),
    ("compose bars", "/api/harmonize", {"task": "compose", "bars": "three"}, None, 400, "bars to compose"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_are_one_sentence(client, env, case):
    _, path, data, upload, status, text = case
    files = {upload[0]: (upload[1], io.BytesIO(upload[2]))} if upload else None
    before = set((env.root / "jobs").iterdir())
    r = client.post(path, data=data, files=files)
    assert r.status_code == status and text in r.json()["detail"], r.text
    assert "\n" not in r.json()["detail"] and "Traceback" not in r.text
    leftovers = {p for p in set((env.root / "jobs").iterdir()) - before}
    assert not leftovers, leftovers  # a refused job leaves no folder or upload behind


def test_unknown_jobs_and_paths_are_404(client):
    assert client.get("/api/jobs/" + "0" * 32).status_code == 404
    assert client.get("/api/jobs/not-a-job").status_code == 404
    job = wait(client, client.post("/api/harmonize", data={"task": "compose", "bars": "1", "steps": "2"}).json())
    for name in ("../params.yaml", "..%2Fparams.yaml", ".hidden", "input_score.abc", "nope.wav"):
        assert client.get(f"/api/jobs/{job['id']}/files/{name}").status_code == 404, name


def test_a_running_job_can_be_cancelled(client):
    job = client.post("/api/harmonize", data={"task": "compose", "bars": "64", "sampler": "ancestral"}).json()
    time.sleep(0.3)
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 200
    job = wait(client, job)
    assert job["status"] == "cancelled" and job["files"] == []


def test_a_full_queue_answers_429_and_loses_nothing(env):
    app = make_app(env, workers=1, max_waiting=1)
    gate = threading.Event()

    def blocked(ctx):
        while not gate.is_set():
            ctx.progress(0, 1)
            time.sleep(0.02)
        return {"ok": True}

    with TestClient(app) as c:
        first = app.state.jobs.submit("test", blocked)  # the only worker, busy
        while app.state.jobs.get(first.id).status != "running":
            time.sleep(0.01)
        second = app.state.jobs.submit("test", blocked)  # the only waiting place, taken
        r = c.post("/api/harmonize", data={"task": "compose", "bars": "1", "steps": "2"})
        assert r.status_code == 429 and "busy" in r.json()["detail"] and r.headers["retry-after"]
        gate.set()
        for job in (first, second):
            assert wait(c, {"id": job.id})["status"] == "done"
        again = wait(c, c.post("/api/harmonize", data={"task": "compose", "bars": "1", "steps": "2"}).json())
        assert again["status"] == "done"
    app.state.jobs.shutdown()


def test_a_token_guards_every_call_but_health(env):
    app = make_app(env, token="s3cret")
    with TestClient(app) as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/config").status_code == 401
        assert c.get("/api/config", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/config", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # every other API route, whatever its method, refuses a call without the token before doing anything
        guarded = [
            (method, route.path.replace("{job_id}", "0" * 32).replace("{clip_id}", "x").replace("{name}", "x"))
            for route in app.routes
            if route.path.startswith("/api/") and route.path != "/api/health"
            for method in getattr(route, "methods", ()) - {"HEAD"}
        ]
        assert len(guarded) >= 10
        for method, path in guarded:
            assert c.request(method, path).status_code == 401, (method, path)
        c.cookies.set("studio_token", "s3cret")
        assert c.get("/api/registry").status_code == 200
    app.state.jobs.shutdown()


def test_studio_refuses_to_open_beyond_the_loopback_without_a_token(env, capsys, monkeypatch):
    from generation.cli import main

    monkeypatch.delenv("SMITIN_STUDIO_TOKEN", raising=False)
    for host in ("0.0.0.0", ""):  # an empty host is every interface too
        rc = main(["studio", "--host", host, "--params", str(env.params_path)])
        err = capsys.readouterr().err
        assert rc == 2 and "give --token" in err and err.count("\n") == 1
