"""Per-head trait probes (SMITIN / ITI): data, activation capture, training, and the saved `ProbeSet`.

A trait's data is a set of clips labelled with / without the trait, grouped so that related clips (the two
renderings of one mixture, the clips of one file) never straddle the train / valid / tune splits. Each clip's
codec tokens are teacher-forced through the generator, unconditioned, and every head's output before the output
projection is recorded at the last position (or averaged over time). One logistic regression per (layer, head)
gives a validation accuracy; the steering direction is the mass-mean difference (ITI found it steers better) or
the probe weight, unit norm; sigma is the spread of the tuning split along it.

On disk a probe set is a directory with `probe_set.json` and `probes.safetensors` (plain float32 arrays, never
pickles), so the registry and other tools read it without this module.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from models.probe_params import (  # noqa: F401  (re-exported: the probes section's types)
    FoldersSource,
    PredicateSource,
    ProbesParams,
    ProbeTrainingParams,
    ProbeTrait,
    SplitFractions,
    StemsSource,
    TraitSource,
)

log = logging.getLogger(__name__)

PROBE_SET_JSON = "probe_set.json"
PROBE_ARRAYS = "probes.safetensors"
ARRAY_NAMES = ("coef", "intercept", "direction", "sigma", "accuracy", "weight", "random_direction", "random_sigma")
SPLITS = ("train", "valid", "tune")


class ProbeError(UserError):
    """Bad trait data or probe parameters: printed by the CLI as one line."""


# ----------------------------------------------------------------------------------------------------------
# Trait data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TraitClip:
    """One labelled clip: mono audio, its label (1 = trait present), and the group that must stay in one split."""

    audio: np.ndarray
    sample_rate: int
    label: int
    group: str
    key: str  # identifies the clip (and, for stem pairs, the pair it belongs to)
    split: str = ""


def group_split(group: str, fractions: SplitFractions, seed: int) -> str:
    """Deterministic split of a group by hashing (seeded), so a group's clips land together."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    total = sum(getattr(fractions, s) for s in SPLITS)
    acc = 0.0
    for name in SPLITS:
        acc += getattr(fractions, name) / total
        if u < acc:
            return name
    return SPLITS[-1]


# --- predicate over the clips table: a tiny safe interpreter, never eval --------------------------------

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_PREDICATE_COLUMNS = (
    "mode",
    "key",
    "tempo_bpm",
    "tempo_confidence",
    "key_strength",
    "loudness_lufs",
    "time_signature",
    "duration_s",
    "is_silent",
    "caption",
    "source_path",
    "split",
)


class _Missing(Exception):
    """A referenced value is null for this row: the row is neither positive nor negative."""


def parse_predicate(expr: str) -> Callable[[dict], bool]:
    """Compile a predicate such as `mode == "minor"` or `tempo_bpm > 140 and not drums` into a function of a
    row dict. Allowed: column names (clips-table columns above, or a trait name from the `traits` column),
    literals, comparisons (== != < <= > >= in, not in), and / or / not, unary minus. Nothing else is accepted:
    no calls, attributes or subscripts, so user text never runs as code."""
    if not isinstance(expr, str) or not expr.strip():
        raise ProbeError("predicate is empty")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ProbeError(f"predicate {expr!r} is not a valid expression: {e.msg}") from None

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.Expression):
            check(node.body)
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
            for v in node.values:
                check(v)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            check(node.operand)
        elif isinstance(node, ast.Compare):
            if not all(type(op) in _COMPARE for op in node.ops):
                raise ProbeError(f"predicate {expr!r}: unsupported comparison")
            for v in [node.left, *node.comparators]:
                check(v)
        elif isinstance(node, ast.Name):
            pass
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
            pass
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            for v in node.elts:
                if not (isinstance(v, ast.Constant) or (isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub))):
                    raise ProbeError(f"predicate {expr!r}: lists may hold only literals")
                check(v)
        else:
            raise ProbeError(
                f"predicate {expr!r}: {type(node).__name__} is not allowed "
                "(use column names, literals, comparisons, and/or/not)"
            )

    check(tree)

    def evaluate(node: ast.AST, row: dict) -> Any:
        if isinstance(node, ast.Expression):
            return evaluate(node.body, row)
        if isinstance(node, ast.BoolOp):
            vals = (evaluate(v, row) for v in node.values)
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, ast.UnaryOp):
            v = evaluate(node.operand, row)
            return (not v) if isinstance(node.op, ast.Not) else -v
        if isinstance(node, ast.Compare):
            left = evaluate(node.left, row)
            for op, right_node in zip(node.ops, node.comparators):
                right = evaluate(right_node, row)
                try:
                    if not _COMPARE[type(op)](left, right):
                        return False
                except TypeError:
                    raise ProbeError(f"predicate {expr!r}: cannot compare {left!r} with {right!r}") from None
                left = right
            return True
        if isinstance(node, ast.Name):
            if node.id in ("True", "False"):
                return node.id == "True"
            if node.id not in row:
                raise ProbeError(
                    f"predicate {expr!r}: unknown name {node.id!r} (columns: "
                    f"{', '.join(_PREDICATE_COLUMNS)}, or a trait name)"
                )
            value = row[node.id]
            if value is None or (isinstance(value, float) and np.isnan(value)):
                raise _Missing(node.id)
            return value
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return [evaluate(v, row) for v in node.elts]
        raise AssertionError(node)  # excluded by check()

    def predicate(row: dict) -> bool | None:
        """True / False, or None when a referenced value is missing for this row."""
        try:
            return bool(evaluate(tree, row))
        except _Missing:
            return None

    return predicate


def _table_rows(clips_table: str, columns: list[str]) -> list[dict]:
    from core.clips_table import ClipsTableError, read_clips_table

    try:
        table = read_clips_table(clips_table, columns=columns)
    except ClipsTableError as e:
        raise ProbeError(str(e)) from None
    return table.to_pylist()


def _decode_row_audio(row: dict) -> tuple[np.ndarray, int]:
    from core.audio import decode_flac

    audio = row["audio"] or {}
    if not audio.get("bytes"):
        raise ProbeError(f"clip {row.get('clip_id')} has no embedded audio")
    return decode_flac(audio["bytes"])


def load_trait_clips(
    trait: str,
    source: TraitSource,
    clips_table: str | None,
    fractions: SplitFractions,
    seed: int,
    max_train_pairs: int | None = None,
    max_clips: int | None = None,
) -> list[TraitClip]:
    """The labelled clips of `trait` from the source its params name:
    - `StemsSource`: rows of the clips table whose `traits` name the trait; with `pairs_only` (default)
      only (mix_id, clip_index) keys that have both a with- and a without-rendering are kept;
    - `FoldersSource(path=DIR)`: audio files under DIR/with/ and DIR/without/;
    - `PredicateSource(expr='mode == "minor"')`: every clips-table row, labelled by the predicate.
    `max_train_pairs` keeps that many training pairs / groups (the n-pairs ablation); valid and tune stay whole."""
    if isinstance(source, StemsSource):
        clips = _stem_clips(trait, source, clips_table)
    elif isinstance(source, PredicateSource):
        clips = _predicate_clips(trait, source, clips_table)
    else:
        clips = _folder_clips(trait, source)
    for c in clips:
        c.split = group_split(c.group, fractions, seed)
    if max_train_pairs is not None:
        clips = _limit_train_pairs(clips, int(max_train_pairs), seed)
    if max_clips is not None and len(clips) > max_clips:
        rng = np.random.default_rng(seed)
        keys = sorted({c.key for c in clips})
        keep = set(rng.permutation(keys)[: max(1, max_clips // 2)].tolist())
        clips = [c for c in clips if c.key in keep]
    check_labels(trait, [c.label for c in clips], "all data")
    return clips


def _limit_train_pairs(clips: list[TraitClip], n: int, seed: int) -> list[TraitClip]:
    keys = sorted({c.key for c in clips if c.split == "train"})
    keep = set(np.random.default_rng(seed).permutation(keys)[:n].tolist())
    return [c for c in clips if c.split != "train" or c.key in keep]


def _stem_clips(trait: str, source: StemsSource, clips_table: str | None) -> list[TraitClip]:
    from core.clips_table import traits_dict

    if not clips_table:
        raise ProbeError(f"trait {trait!r}: the stems source needs a clips table")
    rows = _table_rows(
        clips_table, ["clip_id", "mix_id", "clip_index", "source_sha256", "traits", "audio", "is_silent"]
    )
    labelled = []
    known: set[str] = set()
    for row in rows:
        traits = traits_dict(row["traits"])
        known.update(traits)
        if trait in traits and not row.get("is_silent"):
            labelled.append((row, int(traits[trait])))
    if not labelled:
        names = ", ".join(sorted(known)) or "none"
        raise ProbeError(f"unknown trait {trait!r}: no clip in {clips_table} names it (traits there: {names})")
    pairs_only = source.pairs_only
    by_key: dict[str, set[int]] = {}
    for row, label in labelled:
        by_key.setdefault(f"{row['mix_id'] or row['source_sha256']}#{row['clip_index']}", set()).add(label)
    out = []
    for row, label in labelled:
        group = row["mix_id"] or row["source_sha256"]
        key = f"{group}#{row['clip_index']}"
        if pairs_only and by_key[key] != {0, 1}:
            continue
        wave, sr = _decode_row_audio(row)
        out.append(TraitClip(wave, sr, label, group, key))
    if not out:
        raise ProbeError(
            f"trait {trait!r}: no complete with/without pairs (same mix_id and clip_index) in "
            f"{clips_table}; set pairs_only: false to use unpaired clips"
        )
    return out


def _predicate_clips(trait: str, source: PredicateSource, clips_table: str | None) -> list[TraitClip]:
    from core.clips_table import traits_dict

    if not clips_table:
        raise ProbeError(f"trait {trait!r}: the predicate source needs a clips table")
    predicate = parse_predicate(source.expr)
    rows = _table_rows(clips_table, ["clip_id", "source_sha256", "traits", "audio", *_PREDICATE_COLUMNS])
    out = []
    for row in rows:
        values = {c: row.get(c) for c in _PREDICATE_COLUMNS}
        values.update(traits_dict(row.get("traits")))
        label = predicate(values)
        if label is None or row.get("is_silent"):
            continue
        wave, sr = _decode_row_audio(row)
        out.append(TraitClip(wave, sr, int(label), row["source_sha256"], row["clip_id"]))
    return out


def _folder_clips(trait: str, source: FoldersSource) -> list[TraitClip]:
    from core.audio import AUDIO_EXTENSIONS, decode_audio

    root = Path(source.path)
    rate = source.sample_rate
    out = []
    for sub, label in (("with", 1), ("without", 0)):
        folder = root / sub
        if not folder.is_dir():
            raise ProbeError(
                f"trait {trait!r}: folder source needs {folder}/ (and {root}/{'without' if label else 'with'}/)"
            )
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS):
            try:
                wave = decode_audio(str(path), rate, max_seconds=source.max_seconds)
            except Exception as e:  # noqa: BLE001 - a bad file is the user's to fix, name it
                raise ProbeError(f"trait {trait!r}: cannot decode {path}: {e}") from None
            # a file and its counterpart with the same name in the other folder form one group (a pair)
            out.append(TraitClip(wave, rate, label, path.stem, path.stem))
    return out


def check_labels(trait: str, labels: Sequence[int], where: str) -> None:
    labels = list(labels)
    if not labels:
        raise ProbeError(f"trait {trait!r}: no clips in {where}")
    n_pos = int(sum(labels))
    if n_pos == 0 or n_pos == len(labels):
        have = "with" if n_pos else "without"
        raise ProbeError(
            f"trait {trait!r}: {where} has only clips {have} the trait ({len(labels)}); a probe needs both"
        )


def data_hash(clips: Iterable[TraitClip]) -> str:
    """Content hash of the labelled data (audio bytes, labels, splits), order-independent."""
    parts = []
    for c in clips:
        h = hashlib.sha256(np.ascontiguousarray(c.audio, dtype=np.float32).tobytes())
        parts.append(f"{c.key}|{c.label}|{c.split}|{c.sample_rate}|{h.hexdigest()}")
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------------------


def encode_clips(codec, clips: Sequence[TraitClip], window_frames: int | None) -> list[torch.Tensor]:
    """Codec tokens `LongTensor[K, T]` of each clip, cropped to the first `window_frames` frames."""
    out = []
    for c in clips:
        with torch.no_grad():
            codes = codec.encode(c.audio, c.sample_rate)
        codes = torch.as_tensor(codes).long()
        if codes.dim() == 3:  # a codec that returns [1, K, T]
            codes = codes[0]
        out.append(codes[:, :window_frames] if window_frames else codes)
    return out


@torch.no_grad()
def capture_head_outputs(
    generator,
    codes: Sequence[torch.Tensor],
    position: str = "last",
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Teacher-force each `LongTensor[K, T]` through the generator, unconditioned, and return every head's
    output before the output projection: `float32[N, L, H, Dh]`, at the last position or (position="mean")
    averaged over time. Clips of equal length are batched together."""
    if position not in ("last", "mean"):
        raise ProbeError(f"capture position must be 'last' or 'mean', not {position!r}")
    sites = generator.head_sites()
    n_layers = len(sites)
    result: list[np.ndarray | None] = [None] * len(codes)
    current: list[torch.Tensor | None] = [None] * n_layers

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            # output: (B, T, H, Dh)
            current[layer] = output[:, -1] if position == "last" else output.mean(dim=1)

        return hook

    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(codes):
        by_length.setdefault(int(c.shape[-1]), []).append(i)
    handles = [site.register_forward_hook(make_hook(layer)) for layer, site in enumerate(sites)]
    was_training = generator.training
    generator.eval()
    done = 0
    try:
        for _length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = torch.stack([codes[i] for i in chunk])
                generator(batch, condition=None)
                acts = torch.stack([current[layer] for layer in range(n_layers)], dim=1)  # (B, L, H, Dh)
                for j, i in enumerate(chunk):
                    result[i] = acts[j].float().cpu().numpy()
                done += len(chunk)
                if progress:
                    progress(done)
    finally:
        for h in handles:
            h.remove()
        generator.train(was_training)
    return np.stack(result) if result else np.zeros((0, n_layers, 0, 0), np.float32)


# ----------------------------------------------------------------------------------------------------------
# The probe set
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ProbeSet:
    """One trait's per-head probes. Arrays are float32 numpy: coef/direction/random_direction [L, H, Dh];
    intercept/sigma/accuracy/weight/random_sigma [L, H]. `coef`/`intercept` act on raw head outputs (the
    standardisation used in training is folded in), so p = sigmoid(coef . z + intercept)."""

    trait: str
    generator_fingerprint: str
    coef: np.ndarray
    intercept: np.ndarray
    direction: np.ndarray
    sigma: np.ndarray
    accuracy: np.ndarray
    weight: np.ndarray
    random_direction: np.ndarray
    random_sigma: np.ndarray
    data_hash: str = ""
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created_at: str = ""
    # the generator it was trained on beyond its fingerprint, for backends whose weights live outside the project
    # (MusicGen: {"backend": "musicgen", "path": local folder, "fingerprint", shape}); empty for the builtin one
    generator: dict = field(default_factory=dict)

    @property
    def generator_backend(self) -> str:
        return str(self.generator.get("backend") or "builtin")

    @property
    def n_layers(self) -> int:
        return int(self.coef.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.coef.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.coef.shape[2])

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        """The k (layer, head) pairs of highest validation accuracy (ties broken by position, stable)."""
        flat = np.argsort(-self.accuracy.reshape(-1), kind="stable")[:k]
        return [(int(i) // self.n_heads, int(i) % self.n_heads) for i in flat]

    def tau(self) -> float:
        """SMITIN's default monitor threshold: median(acc) - std(acc)."""
        return float(np.median(self.accuracy) - np.std(self.accuracy))

    def probability(self, acts: np.ndarray) -> np.ndarray:
        """Per-head probe probability of the trait for activations `[..., L, H, Dh]`."""
        logits = np.einsum("...lhd,lhd->...lh", acts, self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {name: np.ascontiguousarray(getattr(self, name), dtype=np.float32) for name in ARRAY_NAMES}
        save_file(arrays, str(directory / PROBE_ARRAYS))
        meta = {
            "arrays_sha256": _sha256(directory / PROBE_ARRAYS),
            "trait": self.trait,
            "generator_fingerprint": self.generator_fingerprint,
            "data_hash": self.data_hash,
            "params": self.params,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "head_dim": self.head_dim,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "format": "smitin-probe-set/1",
        }
        if self.generator:
            meta["generator"] = self.generator
        (directory / PROBE_SET_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ProbeSet:
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta_path, arrays_path = directory / PROBE_SET_JSON, directory / PROBE_ARRAYS
        if not meta_path.exists() or not arrays_path.exists():
            raise ProbeError(f"{directory} is not a probe set (needs {PROBE_SET_JSON} and {PROBE_ARRAYS})")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise ProbeError(f"{meta_path} is not valid JSON ({e})") from None
        recorded = meta.get("arrays_sha256")
        if recorded and _sha256(arrays_path) != recorded:
            raise ProbeError(
                f"{arrays_path} does not match the hash recorded in {PROBE_SET_JSON} when the probe set "
                f"was trained: the file was corrupted or replaced; retrain or fetch it again"
            )
        try:
            arrays = load_file(str(arrays_path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise ProbeError(
                f"{arrays_path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            ) from None
        missing = [n for n in ARRAY_NAMES if n not in arrays]
        if missing:
            raise ProbeError(f"{arrays_path} lacks array(s) {', '.join(missing)}")
        bad = [n for n in ARRAY_NAMES if not np.isfinite(arrays[n]).all()]
        if bad:
            raise ProbeError(f"{arrays_path} holds non-finite values in {', '.join(bad)}: the probe set is damaged")
        shape = (meta["n_layers"], meta["n_heads"], meta["head_dim"])
        if tuple(arrays["coef"].shape) != shape:
            raise ProbeError(f"{arrays_path}: coef shape {tuple(arrays['coef'].shape)} != {shape} in {PROBE_SET_JSON}")
        return cls(
            trait=meta["trait"],
            generator_fingerprint=meta["generator_fingerprint"],
            data_hash=meta.get("data_hash", ""),
            params=meta.get("params", {}),
            metrics=meta.get("metrics", {}),
            created_at=meta.get("created_at", ""),
            generator=meta.get("generator") or {},
            **{n: arrays[n] for n in ARRAY_NAMES},
        )


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def soft_weights(accuracy: np.ndarray, power: float) -> np.ndarray:
    """SMITIN's head weights ((acc - min) / (max - min)) ** p; all ones when every head is equally accurate."""
    lo, hi = float(accuracy.min()), float(accuracy.max())
    if hi - lo < 1e-12:
        return np.ones_like(accuracy, dtype=np.float32)
    return (((accuracy - lo) / (hi - lo)) ** power).astype(np.float32)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    # mean of per-class recall: equals plain accuracy on balanced pairs, honest on skewed predicate data
    return float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1) if np.any(y == c)]))


def train_probe_set(
    acts: np.ndarray,
    labels: np.ndarray,
    splits: Sequence[str],
    trait: str,
    generator_fingerprint: str,
    params: ProbeTrainingParams,
    data_hash_: str = "",
    record: dict | None = None,
) -> ProbeSet:
    """Fit one logistic regression per (layer, head) on the train split of `acts` `[N, L, H, Dh]`; accuracy on
    valid (balanced accuracy: plain accuracy for paired data); direction (mass-mean or probe weight) and sigma
    along it on tune. Uses params direction, C, weight_power, seed, max_iter; the probe set records all of
    `params` and `record` (e.g. its data source and window)."""
    from sklearn.linear_model import LogisticRegression

    acts = np.asarray(acts, dtype=np.float32)
    labels = np.asarray(labels).astype(int)
    splits = np.asarray(list(splits))
    if acts.ndim != 4 or len(acts) != len(labels) or len(labels) != len(splits):
        raise ProbeError(f"activations {acts.shape}, labels {labels.shape} and splits {splits.shape} disagree")
    direction_kind = params.direction
    tr, va, tu = (splits == s for s in SPLITS)
    for name, mask in (("the train split", tr), ("the valid split", va)):
        check_labels(trait, labels[mask], name)
    if not tu.any():  # tiny data: sigma from train + valid rather than refusing
        log.warning("trait %s: empty tune split; sigma is computed on train+valid", trait)
        tu = tr | va
    n, L, H, D = acts.shape
    coef = np.zeros((L, H, D), np.float32)
    intercept = np.zeros((L, H), np.float32)
    direction = np.zeros((L, H, D), np.float32)
    sigma = np.zeros((L, H), np.float32)
    accuracy = np.zeros((L, H), np.float32)
    rng = np.random.default_rng(params.seed)
    random_direction = rng.standard_normal((L, H, D)).astype(np.float32)
    random_direction /= np.linalg.norm(random_direction, axis=-1, keepdims=True) + 1e-12
    random_sigma = np.zeros((L, H), np.float32)
    y_tr, y_va = labels[tr], labels[va]
    for layer in range(L):
        for head in range(H):
            x = acts[:, layer, head, :].astype(np.float64)
            mean = x[tr].mean(axis=0)
            scale = x[tr].std(axis=0)
            scale[scale < 1e-8] = 1.0
            clf = LogisticRegression(C=params.C, max_iter=params.max_iter)
            clf.fit((x[tr] - mean) / scale, y_tr)
            w = clf.coef_[0] / scale  # fold the standardisation into the raw-activation probe
            b = clf.intercept_[0] - float(np.dot(clf.coef_[0], mean / scale))
            coef[layer, head], intercept[layer, head] = w, b
            pred = (x[va] @ w + b > 0).astype(int)
            accuracy[layer, head] = _balanced_accuracy(y_va, pred)
            if direction_kind == "mass_mean":
                d = x[tr][y_tr == 1].mean(axis=0) - x[tr][y_tr == 0].mean(axis=0)
            else:
                d = w.copy()
            norm = np.linalg.norm(d)
            d = d / norm if norm > 1e-12 else random_direction[layer, head].astype(np.float64)
            direction[layer, head] = d
            sigma[layer, head] = float(np.std(x[tu] @ d))
            random_sigma[layer, head] = float(np.std(x[tu] @ random_direction[layer, head]))
    weight = soft_weights(accuracy, params.weight_power)
    flat = np.sort(accuracy.reshape(-1))[::-1]
    metrics = {
        "best_acc": float(flat[0]),
        "mean_acc": float(flat.mean()),
        "median_acc": float(np.median(flat)),
        "std_acc": float(flat.std()),
        "top16_acc": float(flat[:16].mean()),
        "tau": float(np.median(flat) - flat.std()),
        "n_train": int(tr.sum()),
        "n_valid": int(va.sum()),
        "n_tune": int((splits == "tune").sum()),
        "n_positive": int(labels.sum()),
        "n_negative": int((labels == 0).sum()),
    }
    return ProbeSet(
        trait=trait,
        generator_fingerprint=generator_fingerprint,
        coef=coef,
        intercept=intercept,
        direction=direction,
        sigma=sigma,
        accuracy=accuracy,
        weight=weight,
        random_direction=random_direction,
        random_sigma=random_sigma,
        data_hash=data_hash_,
        params={**params.model_dump(), **(record or {})},
        metrics=metrics,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def write_probe_plots(probe_set: ProbeSet, out_dir: str | Path) -> dict[str, Path]:
    """Layer x head accuracy heatmap (PNG) and DVC plot data: `heads.csv` (layer, head, accuracy, weight, sigma)
    and `accuracy_by_rank.csv` (rank, accuracy: the sorted curve, a line plot across revisions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acc = probe_set.accuracy
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * probe_set.n_heads, 1.0 + 0.4 * probe_set.n_layers))
    im = ax.imshow(acc, cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto", origin="lower")
    for (layer, head), value in np.ndenumerate(acc):
        ax.text(
            head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value < 0.8 else "black"
        )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{probe_set.trait}: probe validation accuracy")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths = {
        "heatmap": out_dir / "accuracy_heatmap.png",
        "heads": out_dir / "heads.csv",
        "rank": out_dir / "accuracy_by_rank.csv",
    }
    fig.savefig(paths["heatmap"], dpi=120)
    plt.close(fig)
    with open(paths["heads"], "w") as f:
        f.write("layer,head,accuracy,weight,sigma\n")
        for (layer, head), value in np.ndenumerate(acc):
            f.write(
                f"{layer},{head},{value:.6f},{probe_set.weight[layer, head]:.6f},{probe_set.sigma[layer, head]:.6f}\n"
            )
    with open(paths["rank"], "w") as f:
        f.write("rank,accuracy\n")
        for rank, value in enumerate(np.sort(acc.reshape(-1))[::-1]):
            f.write(f"{rank},{value:.6f}\n")
    return paths


# ----------------------------------------------------------------------------------------------------------
# The whole stage, as a function
# ----------------------------------------------------------------------------------------------------------


def probe_params(section: ProbesParams, trait: str) -> tuple[ProbeTrainingParams, TraitSource]:
    """(training params, data source) of `trait` from the `probes` params section; unknown trait -> one line."""
    if trait not in section.traits:
        names = ", ".join(sorted(section.traits)) or "none"
        raise ProbeError(f"unknown trait {trait!r}: params probes.traits has {names}")
    spec = section.traits[trait]
    base = section.model_dump(exclude={"traits"})
    params = ProbeTrainingParams.parse({**base, **spec.overrides()}, f"probes.traits.{trait}")
    return params, spec.source


def train_trait(
    trait: str,
    generator,
    codec,
    clips_table: str | None,
    section: ProbesParams,
    progress: Callable[[str, int, int], None] | None = None,
) -> ProbeSet:
    """Data -> codec tokens -> head activations -> probes, for one trait."""
    params, source = probe_params(section, trait)
    clips = load_trait_clips(
        trait,
        source,
        clips_table,
        params.split_fractions,
        params.seed,
        params.max_train_pairs,
        params.max_clips,
    )
    frame_rate = float(codec.frame_rate)
    window = int(round(params.window_seconds * frame_rate)) if params.window_seconds else None
    max_len = getattr(generator, "max_positions", None) or getattr(
        getattr(generator, "config", None), "max_positions", None
    )
    if max_len and (window is None or window > max_len):
        window = int(max_len)
    codes = encode_clips(codec, clips, window)
    total = len(codes)
    acts = capture_head_outputs(
        generator,
        codes,
        params.position,
        params.batch_size,
        (lambda d: progress("capture", d, total)) if progress else None,
    )
    probe_set = train_probe_set(
        acts,
        np.array([c.label for c in clips]),
        [c.split for c in clips],
        trait,
        generator.fingerprint(),
        params,
        data_hash(clips),
        record={"source": source.model_dump(), "window_frames": window},
    )
    describe = getattr(generator, "describe", None)  # backends other than the builtin one say what they are
    probe_set.generator = dict(describe()) if callable(describe) else {}
    return probe_set
