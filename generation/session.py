"""Generate (steered) music from registered models: resolve the generator and each trait's probe set by alias
(`champion` unless told otherwise), refuse probe sets trained on another generator, generate a batch of prompts,
write WAVs plus the steering report (JSON + PNG).

    from generation import generate
    generate("an upbeat chorale with drums", duration=8, steer={"drums": +5}, out="out.wav")

`GenerationSession` loads once and generates many times; `generate()` keeps the last session for reuse.

The generator is the registry's (builtin) one, or Hugging Face MusicGen from a local folder: `generator=` a MusicGen
folder, `backend="musicgen"`, or params `generator.backend: musicgen` + `generator.path`. MusicGen weights are never
registered or downloaded; its probe sets are registered as `smitin-probes-musicgen-TRAIT` and carry the MusicGen
fingerprint, checked against the weights once they are loaded (backend and shape are checked before loading).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.config import load_section
from core.errors import UserError
from models.generation_params import GenerateParams, GeneratorParams

log = logging.getLogger(__name__)


class GenerationError(UserError):
    """A generation request that cannot be served (bad prompt audio, duration, output path, ...)."""


def read_defaults(params_path: str | Path | None = "params.yaml") -> GenerateParams:
    """params.yaml `generate` (with the top-level seed); no file: the defaults."""
    if params_path and Path(params_path).exists():
        return load_section(GenerateParams, params_path, "generate")
    return GenerateParams()


@dataclass
class _Request:
    """One `generate` call's inputs, checked, with params `generate` filling in what was not given."""

    prompts: list[str]
    strengths: dict[str, float]
    mode: str
    n_frames: int
    fps: float
    seed: int
    sampling: dict  # temperature, top_k, top_p of the sampler
    cfg_scale: float
    prompt_guidance: object  # builtin generator: one scale per codebook; MusicGen: as given (checked to be off)
    plausibility: float
    out: Path
    continue_from: str | Path | None
    bpm: float | None
    key: str | None


@dataclass
class GenerationResult:
    wavs: list[Path]
    report_json: Path | None
    report_pngs: list[Path]
    info: dict = field(default_factory=dict)


class GenerationSession:
    """A loaded generator (+ codec) and the probe sets asked for so far. Creating it resolves and loads the
    generator; each trait's probe set is resolved and loaded on first use and kept."""

    def __init__(
        self,
        generator: str | Path | None = None,
        *,
        registry=None,
        params: str | Path | None = "params.yaml",
        probes: Mapping[str, str] | None = None,
        alias: str | None = None,
        tracking_uri: str | None = None,
        backend: str | None = None,
        musicgen: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        allow_pickle_weights: bool = False,
    ):
        self.defaults = read_defaults(params)
        self.alias = alias or self.defaults.alias
        self._registry = registry
        self._params_path, self._tracking_uri = params, tracking_uri
        self.probe_uris = dict(probes or {})
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        from models.backends import choose_backend, read_generator_params
        from registry.loading import fetch

        self.generator_section = choose_backend(
            read_generator_params(params),
            generator=generator,
            generator_decides=True,  # no default generator here: one given was asked for
            backend=backend,
            musicgen=musicgen,
            device=device,
            dtype=dtype,
            allow_pickle_weights=allow_pickle_weights,
        )
        self.backend = self.generator_section.backend
        if self.backend == "musicgen":
            self.generator_ref = _musicgen_ref(self.generator_section)
        else:
            uri = str(generator) if generator else f"models:/{self.registry.settings.generator_name}@champion"
            self.generator_ref = fetch(self._registry_for(uri), uri)
            if self.generator_ref.kind != "generator":
                raise GenerationError(f"{uri} is a {self.generator_ref.kind.replace('_', ' ')}, not a generator")
        self.timings["resolve_generator_s"] = time.perf_counter() - t0
        self.probe_sets: dict = {}
        self.probe_refs: dict = {}
        self._generator = self._codec = None

    def _load(self) -> None:
        if self._generator is not None:
            return
        from models.backends import load_backend

        t0 = time.perf_counter()
        musicgen = self.backend == "musicgen"
        generator, codec = load_backend(self.generator_section, None if musicgen else self.generator_ref.path)
        if musicgen:
            from registry.loading import check_compatible

            self.generator_ref.fingerprint = generator.fingerprint()
            for ref in self.probe_refs.values():  # now the fingerprint is known: the full check
                check_compatible(ref, self.generator_ref)
        self.timings["load_generator_s"] = time.perf_counter() - t0
        self._generator, self._codec = generator, codec

    @property
    def generator(self):
        """The loaded generator (loaded on first use, once)."""
        self._load()
        return self._generator

    @property
    def codec(self):
        self._load()
        return self._codec

    # ------------------------------------------------------------------ registry
    @property
    def registry(self):
        if self._registry is None:
            from registry.store import Registry, Settings

            self._registry = Registry(Settings.load(self._params_path, tracking_uri=self._tracking_uri))
        return self._registry

    def _registry_for(self, uri: str):
        return self.registry if uri.startswith("models:/") else None

    def probe_ref(self, trait: str):
        """Resolve `trait`'s probe set (alias, or the URI / folder given for it) into the local cache and check it
        was trained on this generator — before anything heavy is loaded."""
        if trait in self.probe_refs:
            return self.probe_refs[trait]
        from registry.errors import ModelNotFound
        from registry.loading import check_compatible, fetch

        t0 = time.perf_counter()
        reg_name = None if trait in self.probe_uris else self.registry.model_name("probe_set", trait, self.backend)
        uri = self.probe_uris.get(trait) or f"models:/{reg_name}@{self.alias}"
        try:
            ref = fetch(self._registry_for(uri), uri)
        except ModelNotFound as e:
            if trait in self.probe_uris or "no registered model" not in str(e):
                raise
            prefix = reg_name[: len(reg_name) - len(trait)]  # smitin-probes- or smitin-probes-musicgen-
            have = sorted(
                m.name[len(prefix) :]
                for m in self.registry.client.search_registered_models(max_results=1000)
                if m.name.startswith(prefix) and self.registry.probe_set_backend(m.name) == self.backend
            )
            on = " for MusicGen" if self.backend == "musicgen" else ""
            raise GenerationError(
                f"no probe set{on} for trait '{trait}' in {self.registry.uri} ({reg_name} is not "
                f"registered; traits with probe sets{on}: {', '.join(have) or 'none'})"
            ) from None
        if ref.kind != "probe_set":
            raise GenerationError(f"{uri} is not a probe set")
        if ref.trait and ref.trait != trait:
            raise GenerationError(f"{uri} is a probe set for '{ref.trait}', not '{trait}'")
        check_compatible(ref, self.generator_ref)
        self.probe_refs[trait] = ref
        self.timings[f"resolve_probes_{trait}_s"] = time.perf_counter() - t0
        return ref

    def probe_set(self, trait: str):
        """The loaded probe set for `trait` (see `probe_ref`)."""
        if trait not in self.probe_sets:
            from models.probes import ProbeSet

            self.probe_sets[trait] = ProbeSet.load(self.probe_ref(trait).path)
        return self.probe_sets[trait]

    # ------------------------------------------------------------------ generation
    def _prompt_codes(self, continue_from: str | Path | None):
        if not continue_from:
            return None
        import numpy as np

        from core.audio import stream_mono

        path = Path(continue_from)
        if not path.exists():
            raise GenerationError(f"--continue: {path} does not exist")
        try:
            _, blocks = stream_mono(str(path), self.codec.sample_rate)
            wave = np.concatenate(list(blocks) or [np.zeros(0, np.float32)])
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is the user's file
            raise GenerationError(f"--continue: cannot read {path} as audio ({str(e).splitlines()[0][:120]})") from None
        if len(wave) < self.codec.sample_rate / self.codec.frame_rate:
            raise GenerationError(f"--continue: {path} is shorter than one codec frame")
        return self.codec.encode(wave.astype(np.float32), self.codec.sample_rate)  # [K, T]

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        duration: float | None = None,
        continue_from=None,
        steer: str | Mapping[str, float] | None = None,
        mode: str = "smitin",
        out: str | Path = "out.wav",
        seed: int | None = None,
        cfg_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        bpm: float | None = None,
        key: str | None = None,
        prompt_guidance=None,
        prompt_plausibility: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Generate one clip per prompt (one batch). `steer`: {"drums": +5, "piano": -3} or "drums=+5,piano=-3".
        Writes OUT.wav (OUT_1.wav, ... for several prompts), OUT.steering.json (all rows) and OUT[_i].steering.png
        (one per clip) when steering. The WAVs hold the new audio only (not the --continue prompt).
        `prompt_guidance` > 1, one scale or one per codebook (builtin generator, with --continue or past the first
        window): amplify what the audio context implies (see Generator.generate); it also amplifies a steering push,
        and works against steering a trait out of a prompt that has it. `prompt_plausibility` (with guidance): never
        sample a token the prompted model finds less than that share as likely as its top token."""
        from models.long_generation import generate_long

        request = self._request(
            prompts,
            duration=duration,
            continue_from=continue_from,
            steer=steer,
            mode=mode,
            out=out,
            seed=seed,
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            bpm=bpm,
            key=key,
            prompt_guidance=prompt_guidance,
            prompt_plausibility=prompt_plausibility,
        )
        plan = self._steering_plan(request.strengths, mode)
        cond, attrs = self._conditioning(request)
        guidance = request.cfg_scale if cond is not None else 1.0
        prompt = self._prompt_codes(continue_from)
        t0 = time.perf_counter()
        result = generate_long(
            self.generator,
            request.n_frames,
            batch_size=len(request.prompts),
            prompt=prompt,
            condition=cond,
            cfg_scale=guidance,
            seed=request.seed,
            plan=plan,
            progress=progress,
            **self._generator_options(request, attrs),
        )
        seconds = time.perf_counter() - t0
        wavs = self._write_wavs(result.codes, request.out)
        info = self._describe(request, plan, guidance, result.windows, wavs, seconds)
        report_json, pngs = (
            self._write_report(plan, result.steps, info, request.out, wavs) if plan is not None else (None, [])
        )
        return GenerationResult(wavs, report_json, pngs, info)

    def _request(
        self,
        prompts,
        *,
        duration,
        continue_from,
        steer,
        mode,
        out,
        seed,
        cfg_scale,
        temperature,
        top_k,
        top_p,
        bpm,
        key,
        prompt_guidance,
        prompt_plausibility,
    ) -> _Request:
        """`generate`'s inputs checked, params `generate` filling in what was not given. Each steered trait's probe
        set is resolved (and checked against the generator) first, so a refusal comes before anything heavy loads;
        the generator is loaded last, for the frame rate."""
        import numpy as np

        from models.generator import guidance_scales, plausibility_cut, sampling_temperature
        from models.steering import parse_strengths

        d = self.defaults
        strengths = parse_strengths(steer) if steer else {}
        for trait in strengths:
            self.probe_ref(trait)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise GenerationError("no prompt given")
        duration = _finite("--duration", d.duration if duration is None else duration)
        if not 0 < duration <= d.max_duration:
            raise GenerationError(
                f"--duration {duration:g} s: give more than 0 and at most {d.max_duration:g} s "
                f"(params generate.max_duration)"
            )
        seed = _seed(d.seed if seed is None else seed)
        sampling = dict(
            temperature=sampling_temperature(d.temperature if temperature is None else temperature),
            top_k=int(d.top_k if top_k is None else top_k),
            top_p=float(d.top_p if top_p is None else top_p),
        )
        cfg_scale = float(d.cfg_scale if cfg_scale is None else cfg_scale)
        prompt_guidance = d.prompt_guidance if prompt_guidance is None else prompt_guidance
        if self.backend == "musicgen":
            if set(np.atleast_1d(guidance_scales(prompt_guidance))) != {1.0}:
                raise GenerationError("--prompt-guidance is a feature of the builtin generator, not of MusicGen")
        else:
            prompt_guidance = guidance_scales(prompt_guidance, self.generator.cfg.n_codebooks)
        plausibility = plausibility_cut(d.prompt_plausibility if prompt_plausibility is None else prompt_plausibility)
        out = Path(out)
        if out.suffix.lower() != ".wav":
            raise GenerationError(f"--out must be a .wav path, got {out}")
        from core.files import check_output_path

        check_output_path(out, "--out")  # a bad path fails before minutes of generation, not after
        fps = float(self.codec.frame_rate)
        n_frames = int(round(duration * fps))
        if n_frames < 1:
            raise GenerationError(f"--duration {duration} s is shorter than one frame ({1 / fps:.3f} s)")
        return _Request(
            prompts=prompts,
            strengths=strengths,
            n_frames=n_frames,
            fps=fps,
            seed=seed,
            sampling=sampling,
            cfg_scale=cfg_scale,
            prompt_guidance=prompt_guidance,
            plausibility=plausibility,
            out=out,
            mode=mode,
            continue_from=continue_from,
            bpm=bpm,
            key=key,
        )

    def _steering_plan(self, strengths: dict[str, float], mode: str):
        """The steering plan of the steered traits (params generate.steering), or None without any."""
        if not strengths:
            if mode not in ("smitin", "iti", "none"):
                raise GenerationError(f"unknown steering mode {mode!r} (choose smitin, iti, none)")
            return None
        from models.steering import SteeringPlan

        sp = self.defaults.steering
        extra = {"every": sp.every, "decay": sp.decay, "monitor_heads": sp.monitor_heads}
        if mode == "smitin":
            extra.update(
                add_every=sp.add_every,
                smooth_steps=sp.smooth_steps,
                hold_steps=sp.hold_steps,
                hold_floor=sp.hold_floor,
                remove_floor=sp.remove_floor,
                add_gain=sp.add_gain,
                prompt_relative=sp.prompt_relative,
            )
        if sp.tau is not None:
            extra["tau"] = sp.tau
        if mode == "iti":
            extra["top_k"] = sp.iti_top_k
        return SteeringPlan.build({t: self.probe_set(t) for t in strengths}, strengths, mode=mode, **extra)

    def _conditioning(self, request: _Request):
        """(caption condition, attribute ids) of the batch, each None when not used: MusicGen takes the captions
        as text (its own T5 encoder), the builtin generator their sentence embeddings and --bpm / --key ids."""
        import torch

        from models.generator import attribute_ids

        prompts, bpm, key = request.prompts, request.bpm, request.key
        captioned = any(p.strip() for p in prompts)
        if self.backend == "musicgen":
            if bpm is not None or key is not None:
                raise GenerationError(
                    "--bpm / --key are attributes of the builtin generator; MusicGen reads tempo "
                    "and key from the prompt text (e.g. '... at 120 bpm in F# minor')"
                )
            return (list(prompts) if captioned else None), None
        gen = self.generator
        cond = attrs = None
        if captioned:
            from models.conditioning import embed_captions

            cond = embed_captions(prompts)
            if cond.shape[1] != gen.cfg.cond_dim:
                raise GenerationError(
                    f"caption embeddings have {cond.shape[1]} dims, the generator expects {gen.cfg.cond_dim}"
                )
        if gen.cfg.use_attributes and (bpm is not None or key is not None):
            tonic, _, scale = (key or "").partition(" ")
            attrs = torch.tensor([attribute_ids(bpm, tonic or None, scale or None)] * len(prompts), dtype=torch.long)
        return cond, attrs

    def _generator_options(self, request: _Request, attrs) -> dict:
        """The generator's sampling settings, and the builtin generator's --bpm / --key ids and prompt guidance."""
        if self.backend == "musicgen":
            return dict(request.sampling)
        return {
            "attributes": attrs,
            "prompt_guidance": request.prompt_guidance,
            "plausibility": request.plausibility,
            **request.sampling,
        }

    def _write_wavs(self, codes, out: Path) -> list[Path]:
        """Decode each clip to OUT.wav (OUT_1.wav, OUT_2.wav, ... for a batch), peaks held under 0.99."""
        import numpy as np

        from core.audio import write_wav

        codec = self.codec
        wavs = [out] if len(codes) == 1 else [out.with_name(f"{out.stem}_{i + 1}.wav") for i in range(len(codes))]
        for i, path in enumerate(wavs):
            wave = np.asarray(codec.decode(codes[i]), dtype=np.float32)
            peak = float(np.max(np.abs(wave))) if wave.size else 0.0
            if peak > 0.99:
                wave = wave * (0.99 / peak)
            write_wav(path, wave, codec.sample_rate)
        return wavs

    def _describe(self, request: _Request, plan, guidance: float, windows: int, wavs: list[Path], seconds: float):
        """The `generation` record of a result (and of the steering report)."""
        return {
            "prompts": request.prompts,
            "duration_s": request.n_frames / request.fps,
            "frames": request.n_frames,
            "windows": windows,
            "seed": request.seed,
            "cfg_scale": guidance,
            "prompt_guidance": request.prompt_guidance,
            "prompt_plausibility": request.plausibility,
            **request.sampling,
            "mode": request.mode if plan else "none",
            "continue_from": str(request.continue_from) if request.continue_from else None,
            "bpm": request.bpm,
            "key": request.key,
            "generator": _ref_info(self.generator_ref),
            "probe_sets": {t: _ref_info(self.probe_refs[t]) for t in request.strengths},
            "outputs": [str(p) for p in wavs],
            "generate_s": round(seconds, 3),
        }

    def _write_report(self, plan, steps: list[dict], info: dict, out: Path, wavs: list[Path]):
        """OUT.steering.json (every clip's rows, the summary, `info`) and one OUT[_i].steering.png per clip."""
        from core.files import atomic_path
        from models.steering import SteeringReport

        report = SteeringReport({"plan": plan.describe(), "steps": steps})
        report_json = out.with_suffix(".steering.json")
        with atomic_path(report_json) as tmp:
            tmp.write_text(
                json.dumps({**report.data, "summary": report.summary(), "generation": info}, indent=1) + "\n"
            )
        pngs = []
        for i, path in enumerate(wavs):
            png = path.with_suffix(".steering.png")
            report.plot(png, row=i)
            pngs.append(png)
        return report_json, pngs


def _finite(name: str, value) -> float:
    import math

    try:
        x = float(value)
    except (TypeError, ValueError):
        raise GenerationError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise GenerationError(f"{name} {value!r} is not a finite number")
    return x


def _seed(value) -> int:
    try:
        seed = int(value)
    except (TypeError, ValueError):
        raise GenerationError(f"--seed {value!r} is not a whole number") from None
    if not 0 <= seed < 2**63:
        raise GenerationError(f"--seed {seed} is outside 0..2^63-1")
    return seed


def _ref_info(ref) -> dict:
    return {
        "uri": ref.uri,
        "name": ref.name,
        "version": ref.version,
        "path": str(ref.path),
        "fingerprint": ref.fingerprint or ref.generator_fingerprint,
        "backend": ref.backend,
    }


def _musicgen_ref(section: GeneratorParams):
    """A LocalModel for local MusicGen weights, before loading them: backend and shape known (from config.json), the
    fingerprint filled in by `GenerationSession._load`."""
    from models.backends import musicgen_folder
    from models.musicgen import musicgen_shape
    from registry.loading import LocalModel

    folder = musicgen_folder(section)
    shape = musicgen_shape(folder)
    return LocalModel(
        path=folder,
        kind="generator",
        uri=str(section.path),
        backend="musicgen",
        shape=(shape["n_layers"], shape["n_heads"], shape["head_dim"]),
    )


_LAST: dict = {}


def generate(
    prompts: str | Sequence[str],
    *,
    generator: str | None = None,
    probes: Mapping[str, str] | None = None,
    alias: str | None = None,
    registry=None,
    params: str | Path | None = "params.yaml",
    tracking_uri: str | None = None,
    **kwargs,
) -> GenerationResult:
    """One call: resolve + load (reusing the previous call's session when it asked for the same models), then
    `GenerationSession.generate(prompts, **kwargs)`."""
    backend = {k: kwargs.pop(k) for k in ("backend", "musicgen", "device", "dtype") if k in kwargs}
    key = (
        str(generator),
        tuple(sorted((probes or {}).items())),
        alias,
        id(registry),
        str(params),
        tracking_uri,
        tuple(sorted(backend.items())),
    )
    session = _LAST.get(key)
    if session is not None and generator is None and session.backend == "builtin":
        # the champion may have moved since: re-resolve (one query) and reload only if it did
        from registry.loading import resolve

        name = session.registry.settings.generator_name
        mv = resolve(session.registry, f"models:/{name}@champion")
        if str(mv.version) != session.generator_ref.version:
            session = None
    if session is not None:
        session.probe_sets.clear()  # probe-set aliases may have moved too: re-resolve (cache hits, no download)
        session.probe_refs.clear()
    if session is None:
        session = GenerationSession(
            generator,
            registry=registry,
            params=params,
            probes=probes,
            alias=alias,
            tracking_uri=tracking_uri,
            **backend,
        )
        _LAST.clear()
        _LAST[key] = session
    return session.generate(prompts, **kwargs)
