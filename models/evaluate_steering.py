"""Evaluation of steering: success judged by an independent detector, quality by a Frechet distance and by
continuation similarity, for every mode, task and strength, plus the random-direction control and the n-pairs
ablation.

- Success: the drum detector of `models.detectors` (logistic regression on audio descriptors: HPSS percussive
  ratio, flatness, onset and band-flux statistics, onset periodicity), fitted on codec-decoded clips of the train
  split with known `drums` traits and scored on the held-out split's decoded clips (its accuracy is reported). It
  never sees the generator or the probes. Adding a trait is judged on prompts / captions without it (success =
  share of clips judged to have it); removing on prompts / captions with it (share still judged to have it, and
  the relative cut versus unsteered).
- Quality: Frechet distance between embeddings of generated and reference audio. Embedding: per-clip mean and
  standard deviation of 64 log-mel bands (128-d), projected by PCA (fitted on the reference) to 16 dims so the
  covariances of a few dozen clips are estimable. Reference: the codec-decoded real continuations of the same
  prompts (both classes), so codec artefacts do not count against the generator. It is a FAD stand-in, not FAD
  (no VGGish / CLAP weights ship offline); compare rows with each other, not with published FADs.
  Spread: a row's total variance across takes in that space over the reference's (1: as varied as real music);
  a push that makes every take alike lowers it and raises the distance's covariance term.
- Continuation similarity: cosine similarity of the (reference-standardised) embeddings of prompt and
  continuation, averaged.

Generators: the builtin one (`generator_dir`), or Hugging Face MusicGen (`generator_section` with backend musicgen).
MusicGen has its own codec (EnCodec), so its prompts and the detector's data are the clips table's audio encoded
with that codec (a seeded subset of at most `detector_max_segments` clips per split, in memory), and its text task
passes the test clips' captions to its T5 encoder (no tempo / key attributes).

Tasks: `continuation` (an audio prompt, unconditioned) and `text` (the test clip's caption, classifier-free
guidance, no audio prompt). Modes per task and direction: none, iti, smitin, smitin at a higher strength, the
random-direction control (smitin schedule, random unit directions), and smitin with probes trained on 10 and 50
pairs (the ablation; "all" is the main smitin row).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field

from core.config import Section
from core.errors import UserError
from models.drum_strength import StrengthScale
from models.generation_params import GeneratorParams
from models.generator import sampling_temperature
from models.probes import (
    ProbeSet,
    ProbesParams,
    capture_head_outputs,
    encode_clips,
    load_trait_clips,
    probe_params,
    train_probe_set,
)
from models.steering import SteeringParams, SteeringPlan, steer

log = logging.getLogger(__name__)

DETECTABLE = ("drums",)  # traits with an independent detector in models.detectors


class EvaluateSteeringParams(Section):
    """params.yaml `evaluate_steering` (every default is here)."""

    traits: list[str] = Field(default_factory=lambda: ["drums"])  # those without a detector are skipped
    tasks: list[Literal["continuation", "text"]] = Field(default_factory=lambda: ["continuation", "text"])
    split: Literal["train", "valid", "test"] = "test"  # prompts, captions and the detector's held-out clips
    prompt_seconds: float = Field(2.0, gt=0)
    continuation_seconds: float = Field(3.0, gt=0)
    prompts_per_class: int = Field(32, ge=1)  # prompts with and without the trait
    # takes generated from each prompt (each its own draw): more takes steady the Frechet distance and the rates
    # where a split has few prompts
    takes_per_prompt: int = Field(3, ge=1)
    alpha: float = Field(15.0, gt=0)  # smitin strength, continuation
    alpha_high: float = Field(30.0, gt=0)  # second smitin strength, continuation
    alpha_text: float = Field(10.0, gt=0)  # smitin strength, text-to-music
    alpha_high_text: float = Field(20.0, gt=0)  # second smitin strength, text-to-music
    iti_alpha: float = Field(10.0, gt=0)  # iti strength, both tasks
    iti_top_k: int = Field(16, ge=1)  # iti: heads pushed
    every: int = Field(1, ge=1)  # smitin: push every s-th step
    add_every: int | None = Field(12, ge=1)  # smitin rows: push interval while adding (null: `every`)
    decay: float = Field(1.0, ge=0)  # push factor (1 - C / tau) ** decay below tau
    # the sustained-presence monitor of the smitin rows (models.steering.SustainedMonitor); the `smitin_paper` row
    # runs the paper's monitor (one reading a step, the push stops at the first one at tau) beside it
    smooth_steps: int = Field(1, ge=1)
    hold_steps: int = Field(60, ge=0)
    hold_floor: float = Field(0.25, ge=0, le=1)
    remove_floor: float | None = Field(0.125, ge=0, le=1)  # the floor while removing (null: hold_floor)
    push_reference_rows: bool = False  # under guidance, push the reference rows too (models/steering.py)
    # after an audio prompt, the smitin rows' monitor (and the unsteered rows' watching one) reads the generated
    # audio's share of the heads' mix (models/steering.py; chosen on valid, docs/steering.md)
    prompt_relative: bool = True
    add_gain: float = Field(2.0, gt=0)  # smitin rows, adding a trait: the push is this many times the strength
    tau: float | None = Field(None, gt=0, le=1)  # monitor threshold (null: median(acc) - std(acc) of the probe set)
    monitor_heads: int = Field(16, ge=1)  # heads whose median probe probability is the monitor
    n_pairs: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)  # ablation probe sets (e.g. [10, 50])
    temperature: float | list[float] = 1.0  # one, or one per codebook (coarse first); 0: greedy
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(0.0, ge=0, le=1)  # 0: off
    cfg_scale: float = Field(3.0, ge=0)  # classifier-free guidance of the text task
    embedding_dims: int = Field(16, ge=1)  # PCA dims of the Frechet distance's embedding
    detector_max_segments: int = Field(400, ge=1)  # clips per split the detector is fitted / scored on
    detector_token_noise: float = Field(0.06, ge=0, le=1)  # share of tokens randomised in extra detector data
    strength_threshold: float = Field(0.5, ge=0)  # an added trait counts once this strong (models.drum_strength)
    # last steps whose mean monitored probability is the monitor's verdict on a take: the judges hear the whole take,
    # but the first steps' readings still see the prompt
    monitor_window: int = Field(60, ge=1)
    modes: list[str] | None = None  # rows to run (null: all); the unsteered `none` always runs
    threads: int = Field(1, ge=1)  # torch intra-op threads
    seed: int = 0


def audio_embedding(wave: np.ndarray, sr: int, n_mels: int = 64) -> np.ndarray:
    """Mean and std over time of log-mel bands: a 2 * n_mels vector."""
    import librosa

    wave = np.asarray(wave, np.float32)
    if len(wave) < 2048:
        wave = np.pad(wave, (0, 2048 - len(wave)))
    mel = librosa.feature.melspectrogram(y=wave, sr=sr, n_fft=1024, hop_length=256, n_mels=n_mels)
    logmel = np.log(mel + 1e-6)
    return np.concatenate([logmel.mean(1), logmel.std(1)])


class EmbeddingSpace:
    """Standardise + PCA fitted on reference embeddings."""

    def __init__(self, reference: np.ndarray, dims: int = 16):
        self.mean = reference.mean(0)
        self.scale = reference.std(0) + 1e-6
        z = (reference - self.mean) / self.scale
        _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
        self.basis = vt[: min(dims, len(reference) - 1, vt.shape[0])]
        self.reference = self.project(reference)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(x) - self.mean) / self.scale

    def project(self, x: np.ndarray) -> np.ndarray:
        return self.standardise(x) @ self.basis.T

    def frechet(self, x: np.ndarray) -> float:
        return frechet_distance(self.project(x), self.reference)

    def spread(self, x: np.ndarray) -> float:
        """How varied clips are next to the reference: `takes_spread` of their projections."""
        return takes_spread(self.project(x), self.reference)

    def frechet_sd(self, x: np.ndarray, resamples: int = 100, seed: int = 0) -> float:
        """Bootstrap standard deviation of `frechet(x)` over resamples of the generated clips (the reference
        fixed): with 16 clips in 16 dims the distance moves by tens of percent from sampling alone, and a rise has
        to be read against this spread."""
        z = self.project(x)
        if len(z) < 3 or resamples < 2:
            return float("nan")
        rng = np.random.default_rng(seed)
        return float(
            np.std([frechet_distance(z[rng.integers(0, len(z), len(z))], self.reference) for _ in range(resamples)])
        )

    def frechet_rise_interval(
        self, x: np.ndarray, base: np.ndarray, level: float = 0.9, prompts: int | None = None
    ) -> tuple[float, float]:
        """Paired jackknife interval of the rise `frechet(x) / frechet(base) - 1`, where row i of `x` and of `base`
        come from the same prompt and seed (a steered clip and its unsteered twin): leave one prompt out of both,
        rise +- z * jackknife se. With several takes a prompt (row i from prompt i mod `prompts`) a prompt's takes
        leave together: they share the prompt, so leaving out one take at a time would count them as independent and
        narrow the interval. Leaving out (not resampling with duplicates, which biases a Frechet distance and put a
        bootstrap interval beside its own estimate) keeps it honest: for two 32-clip draws of one distribution the
        90% interval held the true zero rise in 92% of 200 simulated cases. (nan, nan) under 3 prompts."""
        from scipy.stats import norm

        zx, zb = self.project(x), self.project(base)
        if len(zx) != len(zb):
            raise ValueError(f"paired interval needs as many steered as unsteered clips ({len(zx)} vs {len(zb)})")
        n = len(zx)
        groups = np.arange(n) % (prompts or n)
        g = int(groups.max()) + 1 if n else 0
        if g < 3:
            return float("nan"), float("nan")

        def rise(keep: np.ndarray) -> float:
            fb = frechet_distance(zb[keep], self.reference)
            return frechet_distance(zx[keep], self.reference) / fb - 1 if fb > 0 else float("nan")

        full = rise(np.arange(n))
        leave_one_out = np.array([rise(np.flatnonzero(groups != k)) for k in range(g)])
        se = float(np.sqrt((g - 1) / g * np.sum((leave_one_out - leave_one_out.mean()) ** 2)))
        z = float(norm.ppf(0.5 + level / 2))
        return full - z * se, full + z * se


def takes_spread(z: np.ndarray, reference: np.ndarray) -> float:
    """Total variance of projected embeddings over the reference's (1: as varied as real music). A push that makes
    every take alike lowers it, and the Frechet distance's covariance term rises with it (docs/steering.md, "Takes
    made alike")."""
    return float(np.atleast_2d(z).var(0).sum() / reference.var(0).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 (Ca Cb)^1/2) (the FID / FAD formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = 1e-6 * np.eye(len(ca))
    covmean = linalg.sqrtm((ca + eps) @ (cb + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-9)


def ablation_probe_sets(
    trait: str, generator, codec, clips_table: str, probes_section: ProbesParams, n_pairs: list[int]
) -> dict[int, ProbeSet]:
    """Probe sets trained on only n training pairs (valid / tune kept whole), from one activation capture."""
    params, source = probe_params(probes_section, trait)
    seed = params.seed
    clips = load_trait_clips(trait, source, clips_table, params.split_fractions, seed, max_clips=params.max_clips)
    window = int(round(params.window_seconds * float(codec.frame_rate))) if params.window_seconds else None
    acts = capture_head_outputs(generator, encode_clips(codec, clips, window), params.position, params.batch_size)
    labels = np.array([c.label for c in clips])
    splits = np.array([c.split for c in clips])
    train_keys = sorted({c.key for c in clips if c.split == "train"})
    out = {}
    for n in n_pairs:
        keep = set(np.random.default_rng(seed).permutation(train_keys)[:n].tolist())
        mask = np.array([c.split != "train" or c.key in keep for c in clips])
        ps = train_probe_set(
            acts[mask],
            labels[mask],
            splits[mask],
            trait,
            generator.fingerprint(),
            params.with_overrides({"max_train_pairs": n}, "evaluate_steering.n_pairs"),
            record={"source": source.model_dump()},
        )
        out[n] = ps
        log.info("ablation %s n=%d pairs: best acc %.3f", trait, n, ps.metrics["best_acc"])
    return out


class EncodedClips:
    """A split of the clips table encoded with a codec in memory: the part of `models.train.TokenSet`'s interface that
    the evaluation and the detector use (`len`, `clip(i)`, `meta["traits"]`, `meta["caption"]`)."""

    def __init__(
        self,
        clips_table: str,
        codec,
        split: str,
        max_clips: int | None = None,
        seed: int = 0,
        need_trait: str | None = None,
    ):
        from core.audio import decode_flac
        from core.clips_table import traits_dict
        from models.train import read_clips

        rows = read_clips(clips_table, split, ["clip_id", "audio", "traits", "caption"]).to_pylist()
        if need_trait:
            rows = [r for r in rows if traits_dict(r["traits"]).get(need_trait) is not None]
        if max_clips is not None and len(rows) > max_clips:
            keep = sorted(np.random.default_rng(seed).permutation(len(rows))[:max_clips].tolist())
            rows = [rows[i] for i in keep]
        if not rows:
            raise UserError(
                f"split {split!r} of the clips table at {clips_table} has no clips"
                + (f" that name the trait {need_trait!r}" if need_trait else "")
            )
        self.codes = []
        for r in rows:
            wave, sr = decode_flac(r["audio"]["bytes"])
            self.codes.append(codec.encode(wave, sr))
        self.meta = {
            "clip_id": [r["clip_id"] for r in rows],
            "traits": [traits_dict(r["traits"]) for r in rows],
            "caption": [r["caption"] or "" for r in rows],
        }

    def __len__(self) -> int:
        return len(self.codes)

    def clip(self, i: int) -> torch.Tensor:
        return self.codes[i]


def _pick_prompts(tokens, trait: str, per_class: int, min_frames: int, seed: int) -> dict[bool, list[int]]:
    gen = np.random.default_rng(seed)
    picked: dict[bool, list[int]] = {True: [], False: []}
    for i in gen.permutation(len(tokens)):
        lab = tokens.meta["traits"][int(i)].get(trait)
        if lab is None or tokens.clip(int(i)).shape[1] < min_frames or len(picked[bool(lab)]) >= per_class:
            continue
        picked[bool(lab)].append(int(i))
    return picked


def evaluate_steering(
    generator_dir: str,
    probes_dir: str,
    tokens_dir: str,
    clips_table: str | None,
    params: EvaluateSteeringParams,
    probes_section: ProbesParams | None = None,
    out_json: str | None = None,
    table_path: str | None = None,
    report_dir: str | None = None,
    progress: Callable[[str], None] | None = None,
    generator_section: GeneratorParams | None = None,
) -> dict:
    """Run the whole evaluation; returns {"metrics": nested numbers (DVC / MLflow), "rows": [...], ...}.
    `generator_section`: the params `generator` section (see `models.backends.choose_backend`); None or backend
    builtin evaluates the builtin generator in `generator_dir`."""
    from models.backends import load_backend

    say = progress or (lambda msg: log.info(msg))
    torch.manual_seed(params.seed)
    # One intra-op thread by default: many small ops (decoding, KV-cached steps) gain nothing from
    # more, and on a shared CPU oversubscribed threads made decoding 10-50x slower in wall time.
    torch.set_num_threads(params.threads)
    musicgen = generator_section is not None and generator_section.backend == "musicgen"
    generator, codec = load_backend(generator_section or GeneratorParams(), generator_dir)
    if musicgen and not clips_table:
        raise UserError("evaluating MusicGen needs the clips table (--clips): its prompts are encoded with its codec")
    fingerprint = generator.fingerprint()
    fps = float(codec.frame_rate)
    prompt_n = int(round(params.prompt_seconds * fps))
    new_n = int(round(params.continuation_seconds * fps))
    sampling = dict(temperature=sampling_temperature(params.temperature), top_k=params.top_k, top_p=params.top_p)

    traits = _detectable_traits(params.traits, say)
    mains = {t: ProbeSet.load(Path(probes_dir) / t) for t in traits}
    SteeringPlan(mains, {t: 1.0 for t in mains}).check_generator(generator, fingerprint)  # refuse early
    detector, tokens = _fit_detector(params, codec, musicgen, new_n / fps, tokens_dir, clips_table, say)
    run = _Run(params, generator, codec, fingerprint, musicgen, tokens, detector, prompt_n, new_n, sampling)

    rows: list[dict] = []
    embeddings: list[tuple[np.ndarray, EmbeddingSpace]] = []  # per row, for the paired interval of the FD rise
    metrics: dict = {"detector": {k: v for k, v in detector.info.items() if isinstance(v, (int, float))}}
    reports: dict = {}
    trait_prompts: dict[str, _TraitPrompts] = {}
    tagging_clips: dict[str, list] = {}  # per trait, the probes-as-taggers readings of each clip (report folder)
    for trait in traits:
        main = mains[trait]
        ablation = _trait_ablation(run, trait, clips_table, probes_section, say)
        prompts = trait_prompts[trait] = _trait_prompts(run, trait)
        metrics.setdefault(trait, {}).update(_trait_metrics(main, ablation, prompts))
        metrics[trait]["tagging"] = _tagging(run, main, tagging_clips.setdefault(trait, []), say)
        for task in params.tasks:
            modes = _modes(params, task, main, ablation)
            for direction in ("add", "remove"):
                for mode in modes:
                    row, emb, report = _run_cell(run, trait, task, direction, prompts, mode)
                    embeddings.append((emb, prompts.space))
                    rows.append(row)
                    reports[f"{trait}/{task}/{direction}/{mode.name}"] = report
                    say(
                        f"{trait} {task} {direction} {mode.name}: present {row['judged_present']:.2f}, "
                        f"FD {row['frechet']:.2f}, probe p {row['mean_probe_p']:.2f} ({row['seconds']}s)"
                    )

    for trait in traits:
        _judge_strength(rows, trait, trait_prompts[trait], run.detector.threshold, params, metrics)
    _compare_with_unsteered(rows, embeddings, metrics)
    result = {
        "metrics": metrics,
        "rows": rows,
        "generator_fingerprint": fingerprint,
        "generator": generator.describe() if hasattr(generator, "describe") else {"backend": "builtin"},
        "embedding": "mean+std of 64 log-mel bands, standardised, PCA to "
        f"{params.embedding_dims} dims fitted on decoded real continuations",
        "detector": detector.info,
        "params": params.model_dump(),
        "tagging_clips": tagging_clips,
    }
    _write_outputs(result, reports, detector, out_json, table_path, report_dir)
    return result


@dataclass(frozen=True)
class _Run:
    """What every (trait, task, direction, mode) cell of an evaluation shares."""

    params: EvaluateSteeringParams
    generator: Any
    codec: Any
    fingerprint: str
    musicgen: bool
    tokens: Any  # the prompts' split: a models.train.TokenSet, or EncodedClips for MusicGen
    detector: Any  # models.detectors' drum detector
    prompt_n: int  # prompt frames
    new_n: int  # generated frames
    sampling: dict  # Generator.generate keyword arguments: temperature, top_k, top_p


class _Mode(NamedTuple):
    """One row of a task's modes: a name, its probe set, `SteeringPlan.build` settings and strength."""

    name: str
    probes: ProbeSet
    settings: dict
    strength: float


@dataclass(frozen=True)
class _TraitPrompts:
    """One trait's prompts and what their real continuations give: the embedding space of the Frechet distance
    and the share the detector judges to have the trait."""

    picked: dict[bool, list[int]]  # token-set indices of prompts with (True) / without (False) the trait
    space: EmbeddingSpace
    prompt_embeddings: dict[bool, np.ndarray]
    real_judged: dict[bool, float]
    real_descriptors: dict[bool, np.ndarray]  # models.drum_strength descriptors of the real continuations


def _detectable_traits(traits: list[str], say: Callable[[str], None]) -> list[str]:
    for t in traits:
        if t not in DETECTABLE:
            say(f"{t}: no independent detector yet; skipped")
    return [t for t in traits if t in DETECTABLE]


def _fit_detector(
    params: EvaluateSteeringParams,
    codec,
    musicgen: bool,
    clip_seconds: float,
    tokens_dir: str,
    clips_table: str | None,
    say: Callable[[str], None],
) -> tuple[Any, Any]:
    """(drum detector fitted on the train split, the prompts' split). MusicGen's prompts and detector data are the
    clips table encoded with its codec: the token files hold the builtin codec's codes."""
    from models.detectors import fit_drum_detector
    from models.train import TokenSet

    t0 = time.time()
    split = params.split
    max_segments = params.detector_max_segments
    if musicgen:
        encoded = {
            s: EncodedClips(clips_table, codec, s, max_segments, params.seed, need_trait="drums")
            for s in dict.fromkeys(("train", "test", split))
        }
        say(
            f"encoded {', '.join(f'{len(v)} {k}' for k, v in encoded.items())} clips with MusicGen's codec "
            f"({time.time() - t0:.0f}s)"
        )
        detector_data, tokens = {"train": encoded["train"], "test": encoded["test"]}, encoded[split]
    else:
        detector_data, tokens = tokens_dir, None
    detector = fit_drum_detector(
        detector_data,
        codec,
        clip_seconds,
        seed=params.seed,
        max_clips=max_segments,
        token_noise=params.detector_token_noise,
        # the trait-carrying stage reports how a detector fitted alike takes noisy tokens; here only the clean
        # held-out accuracy is reported (a fifth of the fitting time saved, the detector unchanged)
        noisy_test=False,
    )
    say(f"detector (independent of the probes): {detector.info} ({time.time() - t0:.0f}s)")
    return detector, tokens if tokens is not None else TokenSet(tokens_dir, split)


def _trait_ablation(
    run: _Run, trait: str, clips_table: str | None, probes_section: ProbesParams | None, say: Callable[[str], None]
) -> dict[int, ProbeSet]:
    """The n-pairs ablation's probe sets (none without the clips table or the probes section)."""
    n_pairs = list(run.params.n_pairs)
    if not (n_pairs and clips_table and probes_section):
        return {}
    ablation = ablation_probe_sets(trait, run.generator, run.codec, clips_table, probes_section, n_pairs)
    for n, ps in ablation.items():
        say(
            f"{trait}: probes on {n} training pairs: best head acc {ps.metrics['best_acc']:.3f}, "
            f"top-16 {ps.metrics['top16_acc']:.3f}"
        )
    return ablation


def _trait_prompts(run: _Run, trait: str) -> _TraitPrompts:
    """Pick the prompts; the reference is the decoded real continuations of the same prompts (both classes)."""
    params, tokens, codec, sr = run.params, run.tokens, run.codec, run.codec.sample_rate
    prompt_n, new_n = run.prompt_n, run.new_n
    picked = _pick_prompts(tokens, trait, params.prompts_per_class, prompt_n + new_n, params.seed)
    if not picked[True] or not picked[False]:
        raise UserError(f"{trait}: the {params.split} tokens need clips with and without it")
    judged = {
        lab: _judge_takes(codec, run.detector, [tokens.clip(i)[:, prompt_n : prompt_n + new_n] for i in idx])
        for lab, idx in picked.items()
    }
    reference = np.concatenate([judged[lab][2] for lab in (True, False)])
    space = EmbeddingSpace(reference, params.embedding_dims)
    prompt_embeddings = {
        lab: np.stack([audio_embedding(codec.decode(tokens.clip(i)[:, :prompt_n]), sr) for i in idx])
        for lab, idx in picked.items()
    }
    real_judged = {lab: float(np.mean(j[0] >= run.detector.threshold)) for lab, j in judged.items()}
    real_descriptors = {lab: j[1] for lab, j in judged.items()}
    return _TraitPrompts(picked, space, prompt_embeddings, real_judged, real_descriptors)


def _tagging(run: _Run, main: ProbeSet, per_clip: list, say: Callable[[str], None]) -> dict:
    """The probes read as taggers of the split's real clips (models.probe_tagging), over the window they were
    trained on, against ground truth and the detector."""
    from models.probe_tagging import probe_tagging

    t0 = time.time()
    window = int(main.params.get("window_frames") or run.prompt_n + run.new_n)
    window = min(window, int(getattr(run.generator, "context_frames", window)))
    out = probe_tagging(
        run.generator,
        run.codec,
        main,
        run.tokens,
        run.detector,
        window,
        run.params.monitor_heads,
        max_clips=run.params.detector_max_segments,
        seed=run.params.seed,
        per_clip=per_clip,
    )
    auc = {k: out.get(f"auc_{k}", float("nan")) for k in ("truth_median", "truth_detector", "detector_median")}
    say(
        f"{main.trait}: probes as taggers of {out['n']} {run.params.split} clips: AUC against the truth "
        f"{auc['truth_median']:.3f} (the detector's {auc['truth_detector']:.3f}), against the detector "
        f"{auc['detector_median']:.3f} ({time.time() - t0:.0f}s)"
    )
    return out


def _trait_metrics(main: ProbeSet, ablation: dict[int, ProbeSet], prompts: _TraitPrompts) -> dict:
    out = {
        "real_continuation_judged_present": {
            "with_trait": prompts.real_judged[True],
            "without_trait": prompts.real_judged[False],
        },
        "probe_best_acc": main.metrics.get("best_acc"),
        "probe_top16_acc": main.metrics.get("top16_acc"),
    }
    for n, ps in ablation.items():
        out[f"probe_best_acc_{n}pairs"] = ps.metrics["best_acc"]
        out[f"probe_top16_acc_{n}pairs"] = ps.metrics["top16_acc"]
    return out


def _modes(params: EvaluateSteeringParams, task: str, main: ProbeSet, ablation: dict[int, ProbeSet]) -> list[_Mode]:
    """The modes of a task: none, iti, smitin at two strengths, the random-direction control, the ablation."""
    alpha = params.alpha_text if task == "text" else params.alpha
    alpha_high = params.alpha_high_text if task == "text" else params.alpha_high
    paper = dict(every=params.every, decay=params.decay, monitor_heads=params.monitor_heads)
    if params.tau is not None:
        paper["tau"] = params.tau
    steering = dict(
        paper,
        add_every=params.add_every,
        add_gain=params.add_gain,
        smooth_steps=params.smooth_steps,
        hold_steps=params.hold_steps,
        hold_floor=params.hold_floor,
        remove_floor=params.remove_floor,
        push_reference_rows=params.push_reference_rows,
        prompt_relative=params.prompt_relative,
    )
    sustained = SteeringParams(**{k: steering[k] for k in ("smooth_steps", "hold_steps", "hold_floor")}).sustained
    modes = [
        # the unsteered rows' monitor watches as the smitin rows' does (the report keeps the probes' own reading too)
        _Mode("none", main, dict(mode="none", prompt_relative=params.prompt_relative), 1.0),
        _Mode("iti", main, dict(mode="iti", top_k=params.iti_top_k), params.iti_alpha),
        _Mode("smitin", main, dict(mode="smitin", **steering), alpha),
        *([_Mode("smitin_paper", main, dict(mode="smitin", **paper), alpha)] if sustained else []),
        _Mode(f"smitin_x{alpha_high / alpha:g}", main, dict(mode="smitin", **steering), alpha_high),
        _Mode("random_control", main, dict(mode="smitin", direction="random", **steering), alpha),
    ]
    modes += [_Mode(f"smitin_{n}pairs", ps, dict(mode="smitin", **steering), alpha) for n, ps in ablation.items()]
    if params.modes is not None:
        unknown = set(params.modes) - {m.name for m in modes}
        if unknown:
            raise UserError(f"evaluate_steering modes: unknown {sorted(unknown)} (have {[m.name for m in modes]})")
        modes = [m for m in modes if m.name == "none" or m.name in params.modes]
    return modes


def _task_inputs(run: _Run, task: str, idx: list[int]) -> dict:
    """Generator.generate keyword arguments of a task's prompts `idx`."""
    tokens = run.tokens
    if task == "continuation":
        return dict(prompt=torch.stack([tokens.clip(i)[:, : run.prompt_n] for i in idx]))
    if run.musicgen:  # captions through MusicGen's own T5 encoder
        return dict(condition=[tokens.meta["caption"][i] for i in idx], cfg_scale=run.params.cfg_scale)
    sel = torch.tensor(idx)
    return dict(condition=tokens.condition[sel], attributes=tokens.attributes[sel], cfg_scale=run.params.cfg_scale)


def _run_cell(
    run: _Run, trait: str, task: str, direction: str, prompts: _TraitPrompts, mode: _Mode
) -> tuple[dict, np.ndarray, Any]:
    """Generate one cell's clips and measure them: (row, audio embeddings of the clips, steering report). Adding
    a trait starts from prompts without it, removing from prompts with it."""
    t1 = time.time()
    lab = direction == "remove"
    idx = prompts.picked[lab] * run.params.takes_per_prompt  # take j comes from prompt j mod n
    sign = 1.0 if direction == "add" else -1.0
    plan = SteeringPlan.build({trait: mode.probes}, {trait: sign * mode.strength}, **mode.settings)
    kwargs = _task_inputs(run, task, idx)
    with steer(run.generator, plan, run.fingerprint) as session:
        out = run.generator.generate(run.new_n, seed=run.params.seed, **kwargs, **run.sampling)
    report = session.report()
    detector, space = run.detector, prompts.space
    start = run.prompt_n if task == "continuation" else 0
    judged, strength_descriptors, emb = _judge_takes(
        run.codec, detector, [out[j, :, start : start + run.new_n] for j in range(len(idx))]
    )
    # per take: what the monitor said (its verdict on the take) and what the judges say
    clips = {
        "detector_p": judged.tolist(),
        "descriptors": strength_descriptors.tolist(),
        "monitor_end": monitor_verdict(report.steps, trait, run.params.monitor_window).tolist(),
        # the same from the probes' own reading, where the monitor was prompt-relative (for the paper's monitor's
        # agreement, which pools the unsteered takes)
        **(
            {"reading_end": monitor_verdict(report.steps, trait, run.params.monitor_window, "reading").tolist()}
            if report.steps and "reading" in report.steps[0]["traits"][trait]
            else {}
        ),
        "push_steps": report.summary()[trait]["push_steps"],
    }
    row = {
        "trait": trait,
        "task": task,
        "direction": direction,
        "mode": mode.name,
        "strength": sign * mode.strength if mode.name != "none" else 0.0,
        "n": len(idx),
        "prompts": len(prompts.picked[lab]),
        # smitin's push interval (the one this row's trait ran at: `add_every` while adding) goes with its numbers
        # (the registry gates compare like with like)
        # and so does its monitor (the paper's: hold_steps 0, hold_floor 0, smooth_steps 1; the floor this row's
        # trait ran at: `remove_floor` while removing)
        **(
            {
                **{k: getattr(plan.params, k) for k in ("decay", "smooth_steps", "hold_steps")},
                "hold_floor": plan.params.floor(removing=direction == "remove"),
                "every": plan.params.interval(removing=direction == "remove"),
                "gain": plan.params.gain(removing=direction == "remove"),
                "prompt_relative": float(plan.params.prompt_relative),
            }
            if plan.params.mode == "smitin"
            else {}
        ),
        "judged_present": float(np.mean(judged >= detector.threshold)),
        "mean_detector_p": float(judged.mean()),
        "frechet": space.frechet(emb),
        "frechet_sd": space.frechet_sd(emb, seed=run.params.seed),
        "spread": space.spread(emb),
        "mean_probe_p": float(np.mean([s["traits"][trait]["probability"] for s in report.steps])),
        "push_steps": float(np.mean(report.summary()[trait]["push_steps"])),
        "steps": len(report.steps),
        "tau": float(plan.taus()[0]),
        "seconds": round(time.time() - t1, 1),
        "clips": clips,
    }
    if task == "continuation":
        prompt_emb = np.tile(prompts.prompt_embeddings[lab], (run.params.takes_per_prompt, 1))
        sims = _cosine(space.standardise(prompt_emb), space.standardise(emb))
        row["continuation_similarity"] = float(sims.mean())
    return row, emb, report


def monitor_verdict(steps: list[dict], trait: str, window: int, key: str = "probability") -> np.ndarray:
    """Per take, the mean monitored probability of `trait` over the last `window` steps of a steering report (all
    of them when there are fewer): what is compared with tau as the monitor's verdict on the take. key "reading":
    the same from the probes' own reading (reports of a prompt-relative monitor keep it)."""
    monitored = np.array([s["traits"][trait][key] for s in steps])  # [steps, takes]
    return monitored[-window:].mean(0)


def _judge_takes(codec, detector, codes: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode each take and judge it: (detector probability [n], strength descriptors [n, 3], Frechet embedding
    [n, d]). The detector and the strength judge share one harmonic/percussive separation per take; takes run in two
    threads (the decoder's torch ops, the FFTs and HPSS's median filters release the GIL)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from models.detectors import drum_descriptors, spectral_parts
    from models.drum_strength import DESCRIPTORS, percussive_descriptors

    sr = codec.sample_rate

    def judge(c: torch.Tensor) -> tuple[float, list[float], np.ndarray]:
        wave = codec.decode(c)
        parts = spectral_parts(wave)
        p = float(detector.probability_of(drum_descriptors(wave, sr, parts))[0])
        strength = percussive_descriptors(wave, sr, parts)
        return p, [strength[k] for k in DESCRIPTORS], audio_embedding(wave, sr)

    with ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        done = list(pool.map(judge, codes))
    return (
        np.array([d[0] for d in done]),
        np.array([d[1] for d in done]).reshape(len(done), len(DESCRIPTORS)),
        np.stack([d[2] for d in done]),
    )


# how success is judged, recorded beside it: the registry gates compare success only between versions judged alike
# (1, unrecorded: the detector alone; 2: the detector and the strength judge for an added trait)
JUDGE = 2

# a mode's numbers in the metrics; strength and push interval go with them: the registry gates compare success
# only at equal settings
_METRIC_KEYS = (
    "success",
    "judged_present",
    "present_strong",
    "strength_own",
    "strength_real",
    "strength_left",
    "monitor_agreement",
    "frechet",
    "frechet_sd",
    "frechet_rise",
    "frechet_rise_lo",
    "frechet_rise_hi",
    "spread",
    "continuation_similarity",
    "removal_cut",
    "mean_probe_p",
    "strength",
    "every",
    "decay",
    "smooth_steps",
    "hold_steps",
    "hold_floor",
    "gain",
    "prompt_relative",
)


def _judge_strength(
    rows: list[dict],
    trait: str,
    prompts: _TraitPrompts,
    threshold: float,
    params: EvaluateSteeringParams,
    metrics: dict,
) -> None:
    """Add to every row of `trait` the strength judge's numbers (models.drum_strength) and the monitor's agreement
    with the judges. Per task, the scale of the generator's own takes: its unsteered takes from prompts without the
    trait that the detector judges trait-free (0), and from prompts with the trait that it judges trait-bearing (1);
    the scale of real music: the decoded real continuations without and with the trait (ground-truth labels). A take
    has the trait for the judges when the detector says so and it is at least `strength_threshold` strong on the
    generator's scale; the monitor is right about a take when its verdict (the monitored probability over the last
    `monitor_window` steps against tau) is the judges'."""
    real = StrengthScale.from_takes(prompts.real_descriptors[False], prompts.real_descriptors[True])
    node = metrics.setdefault(trait, {})
    node["strength_scale_real"] = real.describe()
    for task in dict.fromkeys(r["task"] for r in rows if r["trait"] == trait):
        cells = {(r["direction"], r["mode"]): r for r in rows if r["trait"] == trait and r["task"] == task}
        own = _own_scale(cells[("add", "none")]["clips"], cells[("remove", "none")]["clips"], threshold)
        node.setdefault(task, {})["strength_scale_own"] = own.describe()
        for r in cells.values():
            c = r["clips"]
            X, present = np.array(c["descriptors"]), np.array(c["detector_p"]) >= threshold
            s_own, s_real = own.strength(X), real.strength(X)
            c["strength_own"], c["strength_real"] = s_own.tolist(), s_real.tolist()
            has = present & (s_own >= params.strength_threshold)
            c["judged_has"] = has.tolist()
            r["strength_own"] = float(np.median(s_own))
            r["strength_real"] = float(np.median(s_real))
            r["present_strong"] = float(has.mean())
            said = np.array(c["monitor_end"]) >= r["tau"]
            c["monitor_right"] = (said == has).tolist()
            r["monitor_agreement"] = float((said == has).mean())
        ref = float(np.mean(cells[("remove", "none")]["clips"]["strength_own"]))
        for (direction, _), r in cells.items():
            if direction == "remove":  # strength left, against the unsteered takes of the same prompts
                r["strength_left"] = float(np.mean(r["clips"]["strength_own"])) / ref if ref > 0 else None
    # per monitor: its steered takes of both tasks and directions pooled with the unsteered ones (whose monitor only
    # watches; read the way this monitor reads: prompt-relative or not), the share where its verdict is the judges'
    mine = [r for r in rows if r["trait"] == trait]
    agreement = node.setdefault("monitor_agreement", {})
    for mode in dict.fromkeys(r["mode"] for r in mine):
        relative = (
            params.prompt_relative
            if mode == "none"
            else any(r.get("prompt_relative") for r in mine if r["mode"] == mode)
        )
        pooled = []
        for r in mine:
            if r["mode"] not in ("none", mode):
                continue
            c = r["clips"]
            end = c["reading_end"] if r["mode"] == "none" and not relative and "reading_end" in c else c["monitor_end"]
            pooled += list((np.array(end) >= r["tau"]) == np.array(c["judged_has"]))
        agreement[mode] = float(np.mean(pooled))


def _own_scale(without: dict, with_: dict, threshold: float) -> StrengthScale:
    """The generator's own scale from the clips of its unsteered rows (see `_judge_strength`); where fewer than 3
    takes pass the detector's verdict, all takes of that row are the anchor."""

    def pick(clips: dict, present: bool) -> np.ndarray:
        X = np.array(clips["descriptors"])
        keep = (np.array(clips["detector_p"]) >= threshold) == present
        return X[keep] if keep.sum() >= 3 else X

    return StrengthScale.from_takes(pick(without, False), pick(with_, True))


def _compare_with_unsteered(
    rows: list[dict], embeddings: list[tuple[np.ndarray, EmbeddingSpace]], metrics: dict
) -> None:
    """Add to every row its numbers relative to the unsteered row of the same (trait, task, direction) (FD rise
    with its paired interval, success, removal cut), and its numbers to `metrics`."""
    base = {(r["trait"], r["task"], r["direction"]): i for i, r in enumerate(rows) if r["mode"] == "none"}
    for i, r in enumerate(rows):
        j = base[(r["trait"], r["task"], r["direction"])]
        b = rows[j]
        r["frechet_rise"] = r["frechet"] / b["frechet"] - 1 if b["frechet"] > 0 else float("nan")
        if i != j:  # every row shares its prompts and seed with the unsteered one: a paired interval
            (emb, space), (base_emb, _) = embeddings[i], embeddings[j]
            r["frechet_rise_lo"], r["frechet_rise_hi"] = space.frechet_rise_interval(
                emb, base_emb, prompts=r.get("prompts")
            )
        if r["direction"] == "add":  # judged present and at least strength_threshold strong
            r["success"] = r["present_strong"]
        else:
            r["success"] = 1.0 - r["judged_present"]  # share judged trait-free
            r["removal_cut"] = (1 - r["judged_present"] / b["judged_present"]) if b["judged_present"] > 0 else None
        node = metrics.setdefault(r["trait"], {}).setdefault(r["task"], {}).setdefault(r["direction"], {})
        node[r["mode"]] = {
            k: r[k] for k in _METRIC_KEYS if r.get(k) is not None and np.isfinite(r[k])
        }  # e.g. no FD spread under 3 clips
        node[r["mode"]]["judge"] = JUDGE


def _write_outputs(
    result: dict,
    reports: dict,
    detector,
    out_json: str | None,
    table_path: str | None,
    report_dir: str | None,
) -> None:
    """The metrics JSON, the markdown table, and the report folder (rows, detector, smitin / iti step reports)."""
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result["metrics"], indent=1, sort_keys=True) + "\n")
    if table_path:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(format_table(result["rows"]))
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "rows.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        detector.save(Path(report_dir) / "drum_detector.json")
        for key, report in reports.items():
            if key.endswith(("/smitin", "/iti")):
                name = key.replace("/", "_")
                report.save(Path(report_dir) / f"{name}.json", Path(report_dir) / f"{name}.png")


def format_table(rows: list[dict]) -> str:
    """Markdown table of the evaluation rows."""
    head = (
        "| trait | task | direction | mode | strength | n | success | judged present | strength (own) "
        "| strength (real) | strength left | monitor agrees | FD (± bootstrap sd) | FD rise (paired 90% interval) "
        "| spread | cont. sim | mean probe p | push steps |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sim = r.get("continuation_similarity")
        sd = f" ± {r['frechet_sd']:.1f}" if np.isfinite(r.get("frechet_sd", float("nan"))) else ""
        lo, hi = r.get("frechet_rise_lo", float("nan")), r.get("frechet_rise_hi", float("nan"))
        interval = f" ({lo:+.0%} to {hi:+.0%})" if np.isfinite(lo) and np.isfinite(hi) else ""
        left = r.get("strength_left")
        lines.append(
            f"| {r['trait']} | {r['task']} | {r['direction']} | {r['mode']} | {r['strength']:+g} | {r['n']} "
            f"| {r.get('success', float('nan')):.2f} | {r['judged_present']:.2f} "
            f"| {_num(r.get('strength_own'))} | {_num(r.get('strength_real'))} "
            f"| {'' if left is None else f'{left:.0%}'} | {_num(r.get('monitor_agreement'))} "
            f"| {r['frechet']:.2f}{sd} "
            f"| {r.get('frechet_rise', float('nan')):+.0%}{interval} | {_num(r.get('spread'))} "
            f"| {'' if sim is None else f'{sim:.3f}'} "
            f"| {r['mean_probe_p']:.2f} | {r['push_steps']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "" if x is None or not np.isfinite(x) else f"{x:.2f}"
