"""The studio's web app: a small JSON API (`/api/...`, documented at `/docs` by FastAPI's OpenAPI) and one plain
HTML/JS/CSS page that sits on it (`generation/studio/static`, no build step).

Long work (generating, listening, harmonizing) is a job in the one bounded queue (`jobs.JobQueue`): the API answers
at once with the job's id, the page polls `/api/jobs/{id}` for progress and fetches the files by job id. A full
queue answers 429. When a token is set (required when the server listens beyond the loopback), every API call
must carry it (`Authorization: Bearer TOKEN`, or the `studio_token` cookie the page sets from `?token=`).
"""

import hmac
import math
import re
import time
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from core.config import Section
from core.errors import UserError
from generation.studio.jobs import JobNotFound, JobQueue, QueueFull
from generation.studio.services import Services, StudioError, check_audio, check_score

STATIC = Path(__file__).parent / "static"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".opus", ".aif", ".aiff"}
SCORE_SUFFIXES = {".mid", ".midi", ".xml", ".musicxml", ".mxl", ".abc", ".krn"}


class StudioParams(Section):
    """params.yaml `studio` (every default is here)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(2, ge=1)
    max_waiting: int = Field(8, ge=0)  # jobs waiting for a worker before new ones get 429
    job_time_limit_s: float = Field(600.0, gt=0)
    max_upload_mb: float = Field(20.0, gt=0)
    max_duration_s: float = Field(30.0, gt=0)  # longest take the page may ask for
    results_dir: str = ".studio"  # one folder per job, under the project
    clips: str = "data/clips"
    scores: str = "data/scores"
    detector: str = "metrics/drum_detector.json"
    traits: list[str] = Field(default_factory=lambda: ["drums"])  # the sliders the page shows


def _bar_count(bars: str) -> int:
    """How many bars to compose: a count ("8") or a span whose length is meant ("3-4": 2)."""
    first, dash, last = bars.strip().partition("-")
    try:
        n = int(last) - int(first) + 1 if dash else int(first)
    except ValueError:
        raise StudioError(f"bars to compose must be a count such as 8 (or a span such as 1-8), got {bars!r}") from None
    if not 1 <= n <= 64:
        raise StudioError("compose writes 1 to 64 bars")
    return n


def create_app(
    params: StudioParams | None = None,
    params_path: str = "params.yaml",
    tracking_uri: str | None = None,
    token: str | None = None,
    services: Services | None = None,
):
    p = params or StudioParams()
    _share_cores(p.workers)
    svc = services or Services(
        params_path, tracking_uri, clips=p.clips, scores=p.scores, detector=p.detector, max_seconds=p.max_duration_s
    )
    jobs = JobQueue(Path(p.results_dir), workers=p.workers, max_waiting=p.max_waiting, time_limit_s=p.job_time_limit_s)
    app = FastAPI(
        title="smitin studio",
        version="1",
        description="Hear, steer and compare music from the registry's models; harmonize with Coconet.",
    )
    app.state.jobs, app.state.services, app.state.params = jobs, svc, p

    def authorized(request: Request) -> None:
        if not token:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or request.cookies.get(
            "studio_token", ""
        )
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid studio token is needed (Authorization: Bearer TOKEN)")

    @app.exception_handler(QueueFull)
    async def queue_full(_request, exc: QueueFull):
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "5"})

    @app.exception_handler(UserError)
    async def user_error(_request, exc: UserError):
        return JSONResponse({"detail": " ".join(str(exc).split())[:400]}, status_code=400)

    @app.exception_handler(Exception)
    async def any_error(_request, exc: Exception):
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {text}"}, status_code=500)

    async def save_upload(upload: UploadFile, dest: Path, allowed: set[str], what: str) -> None:
        suffix = Path(upload.filename or "").suffix.lower()
        if suffix not in allowed:
            kinds = ", ".join(sorted(allowed))
            raise StudioError(f"the {what} upload must be one of {kinds}, not {suffix or 'no suffix'}")
        limit = int(p.max_upload_mb * 1024 * 1024)
        size = 0
        with open(dest, "wb") as f:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise StudioError(f"the {what} upload is larger than {p.max_upload_mb:g} MB")
                f.write(chunk)
        if size == 0:
            raise StudioError(f"the {what} upload is empty")

    # ------------------------------------------------------------------ health, page
    @app.get("/api/health", summary="liveness and queue state (no token needed)")
    def health():
        return {"status": "ok", "jobs": jobs.counts(), "time": time.time()}

    @app.get("/api/config", dependencies=[Depends(authorized)], summary="what the page needs to draw its controls")
    def config():
        return {
            "traits": p.traits,
            "max_duration_s": p.max_duration_s,
            "max_upload_mb": p.max_upload_mb,
            "modes": ["smitin", "iti", "none"],
            "samplers": ["gibbs", "ancestral"],
        }

    # ------------------------------------------------------------------ steer
    @app.post("/api/steer", dependencies=[Depends(authorized)], summary="generate (and compare) steered takes: a job")
    async def steer(
        caption: str = Form(""),
        steer: str = Form("{}"),
        mode: str = Form("smitin"),
        duration: float = Form(6.0),
        seed: int = Form(0),
        compare: bool = Form(True),
        generator: str = Form(""),
        alias: str = Form("champion"),
        prompt: UploadFile | None = File(None),
    ):
        import json

        try:
            strengths = json.loads(steer or "{}")
        except ValueError:
            raise StudioError('steer must be a JSON object of trait strengths, e.g. {"drums": 10}') from None
        if not isinstance(strengths, dict):
            raise StudioError("steer must be a JSON object of trait strengths")
        for trait, value in strengths.items():
            if trait not in p.traits:
                raise StudioError(f"unknown trait {trait!r} (this studio steers {', '.join(p.traits)})")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise StudioError(f"strength of {trait!r} must be a finite number")
            if abs(value) > 100:
                raise StudioError(f"strength of {trait!r} must lie within +-100")
        if mode not in ("smitin", "iti", "none"):
            raise StudioError(f"mode must be smitin, iti or none, not {mode!r}")
        if not (math.isfinite(duration) and 0.5 <= duration <= p.max_duration_s):
            raise StudioError(f"duration must be 0.5 to {p.max_duration_s:g} seconds")
        if not 0 <= seed < 2**63:
            raise StudioError("seed must be 0 .. 2^63-1")
        params = {
            "caption": caption[:500],
            "steer": strengths,
            "mode": mode,
            "duration": duration,
            "seed": seed,
            "compare": compare,
            "generator": generator or None,
            "alias": alias or "champion",
        }
        staged = []
        if prompt is not None and (prompt.filename or ""):
            tmp = Path(p.results_dir) / f".upload-{time.time_ns()}"
            Path(p.results_dir).mkdir(parents=True, exist_ok=True)
            try:
                await save_upload(prompt, tmp, AUDIO_SUFFIXES, "audio prompt")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            name = "input_audio" + Path(prompt.filename).suffix.lower()
            staged.append((name, tmp))
            params["prompt_file"] = name
        return (await run_in_threadpool(_submit_with, jobs, "steer", svc.steer, params, staged, p)).public()

    # ------------------------------------------------------------------ listen
    @app.post("/api/listen", dependencies=[Depends(authorized)], summary="probe readings of an uploaded clip: a job")
    async def listen(clip: UploadFile = File(...), generator: str = Form(""), alias: str = Form("champion")):
        tmp = Path(p.results_dir) / f".upload-{time.time_ns()}"
        Path(p.results_dir).mkdir(parents=True, exist_ok=True)
        try:
            await save_upload(clip, tmp, AUDIO_SUFFIXES, "clip")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        name = "input_audio" + Path(clip.filename or "x.wav").suffix.lower()
        params = {"clip_file": name, "traits": p.traits, "generator": generator or None, "alias": alias}
        return (await run_in_threadpool(_submit_with, jobs, "listen", svc.listen, params, [(name, tmp)], p)).public()

    # ------------------------------------------------------------------ harmonize
    @app.post("/api/harmonize", dependencies=[Depends(authorized)], summary="Coconet harmonize, infill, compose: a job")
    async def harmonize(
        task: str = Form("harmonize"),
        voices: str = Form(""),
        bars: str = Form("1-2"),
        chorale: int = Form(0),
        steps: int = Form(0),
        temperature: float | None = Form(None),
        sampler: str = Form("gibbs"),
        seed: int = Form(0),
        abc: str = Form(""),
        score: UploadFile | None = File(None),
    ):
        if task not in ("harmonize", "infill", "compose"):
            raise StudioError("task must be harmonize, infill or compose")
        if sampler not in ("gibbs", "ancestral"):
            raise StudioError("sampler must be gibbs or ancestral")
        if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 10):
            raise StudioError("temperature must be 0 to 10")
        if not 0 <= steps <= 5000:
            raise StudioError("steps must be 0 (the default schedule) to 5000")
        if not 0 <= seed < 2**63:
            raise StudioError("seed must be 0 .. 2^63-1")
        if task == "compose":
            bars = str(_bar_count(bars))
        params = {
            "task": task,
            "voices": voices,
            "bars": bars,
            "chorale": chorale,
            "steps": steps or None,
            "temperature": temperature,
            "sampler": sampler,
            "seed": seed,
        }
        staged = []
        Path(p.results_dir).mkdir(parents=True, exist_ok=True)
        if score is not None and (score.filename or ""):
            tmp = Path(p.results_dir) / f".upload-{time.time_ns()}"
            try:
                await save_upload(score, tmp, SCORE_SUFFIXES, "score")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            name = "input_score" + Path(score.filename).suffix.lower()
            staged.append((name, tmp))
        elif abc.strip():
            if len(abc) > 20000:
                raise StudioError("the ABC text is longer than 20000 characters")
            tmp = Path(p.results_dir) / f".upload-{time.time_ns()}"
            tmp.write_text(abc if "X:" in abc else f"X:1\nT:melody\nM:4/4\nL:1/4\nK:C\n{abc}\n")
            name = "input_score.abc"
            staged.append((name, tmp))
        if staged:
            params["melody_file" if task == "harmonize" else "score_file"] = staged[0][0]
        return (await run_in_threadpool(_submit_with, jobs, "harmonize", svc.harmonize, params, staged, p)).public()

    # ------------------------------------------------------------------ jobs
    @app.get("/api/jobs/{job_id}", dependencies=[Depends(authorized)], summary="a job's state, progress and result")
    def job_state(job_id: str):
        return _job(jobs, job_id).public()

    @app.delete("/api/jobs/{job_id}", dependencies=[Depends(authorized)], summary="cancel a job")
    def job_cancel(job_id: str):
        _job(jobs, job_id)
        return jobs.cancel(job_id).public()

    @app.get("/api/jobs/{job_id}/files/{name}", dependencies=[Depends(authorized)], summary="a file a job wrote")
    def job_file(job_id: str, name: str):
        job = _job(jobs, job_id)
        if not SAFE_NAME.match(name) or name.startswith("input"):
            raise HTTPException(404, "no such file")
        path = (job.dir / name).resolve()
        if path.parent != job.dir.resolve() or not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path)

    # ------------------------------------------------------------------ data
    @app.get("/api/clips", dependencies=[Depends(authorized)], summary="browse the clips table")
    def clips(
        split: str | None = None,
        q: str | None = None,
        trait: str | None = None,
        min_bpm: float | None = None,
        max_bpm: float | None = None,
        key: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ):
        if split not in (None, "", "train", "valid", "test"):
            raise StudioError("split must be train, valid or test")
        return svc.clips_page(
            split or None, q, trait or None, min_bpm, max_bpm, key or None, max(0, offset), max(1, min(limit, 200))
        )

    @app.get("/api/clips/{clip_id}/audio", dependencies=[Depends(authorized)], summary="a clip's audio (FLAC)")
    def clip_audio(clip_id: str):
        if not SAFE_NAME.match(clip_id):
            raise HTTPException(404, "no such clip")
        try:
            return Response(svc.clip_audio(clip_id), media_type="audio/flac")
        except KeyError:
            raise HTTPException(404, "no such clip") from None

    # ------------------------------------------------------------------ registry
    @app.get("/api/registry", dependencies=[Depends(authorized)], summary="models, versions, aliases, key metrics")
    def registry():
        return svc.registry_overview()

    @app.post(
        "/api/registry/promote",
        dependencies=[Depends(authorized)],
        summary="the gates for a version (confirm=false) or the promotion itself (confirm=true)",
    )
    def promote(model: str = Form(...), version: str = Form(""), confirm: bool = Form(False)):
        return svc.promote(model, version or None, confirm)

    app.mount("/", StaticFiles(directory=str(STATIC), html=True), name="page")
    return app


def _share_cores(workers: int) -> None:
    """Each worker generates on its own thread: give each its share of the cores rather than every worker all of
    them (oversubscribed OpenMP threads spin and slow every job down)."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _job(jobs: JobQueue, job_id: str):
    if not re.fullmatch(r"[0-9a-f]{32}", job_id or ""):
        raise HTTPException(404, "no such job")
    try:
        return jobs.get(job_id)
    except JobNotFound:
        raise HTTPException(404, "no such job") from None


def _submit_with(jobs: JobQueue, kind: str, work, params: dict, staged: list[tuple[str, Path]], p: StudioParams):
    """Queue a job whose uploads (already written to temporary names) move into its folder and are checked by
    decoding before it is queued; a refused job leaves nothing behind. Called in a worker thread: decoding an
    upload must not hold up the event loop that answers every other request."""

    def prepare(folder: Path) -> None:
        for name, tmp in staged:
            tmp.rename(folder / name)
        for name, _ in staged:
            if name.startswith("input_audio"):
                check_audio(folder / name, p.max_duration_s * 4)
            elif name.startswith("input_score"):
                check_score(folder / name)

    try:
        return jobs.submit(kind, work, params, prepare=prepare)
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)
