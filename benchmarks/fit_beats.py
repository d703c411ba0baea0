"""Train the learned beat / downbeat activation (`pipelines/beat_network.py`) and export it as arrays.

    python benchmarks/beat_fit_set.py --out data/beat_fit                      # the tonal training set
    python benchmarks/fit_beats.py --render-corpus data/beat_fit_corpus        # + the default corpus (dev range)
    python benchmarks/fit_beats.py --sets data/beat_fit data/beat_fit_corpus --out pipelines/beat_model.npz

Training data: the sets' labelled audio (`labels.parquet`: file, beats_s, downbeats_s; audio/ beside it). The
default corpus part is rendered from the tuning range of the default corpora (`--render-corpus`: pieces 40-79 of
each corpus' seeded order, the range `benchmarks/feature_accuracy.py --offset 40` uses as its dev set), so the
held-out feature benchmark (pieces 100+) and the default corpus (0-29) stay unseen. One piece in ten (by a hash of
its id, so a piece's mixes stay together) is the validation set that picks the checkpoint. Targets are the labelled
frames, with their two neighbours at half weight (beats are not frame-exact); 10 s crops, as the pipeline analyses
10 s clips, each stretched in time by up to `--stretch` (tempo augmentation).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.beat_network import FEATURE_SETS, FPS, N_MELS, spectral_frames  # noqa: E402


def render_default_corpus(out: str, params_path: str = "params.yaml") -> None:
    from core.config import load_section
    from pipelines.corpus import CorpusParams, render_corpus

    params = load_section(CorpusParams, params_path, "corpus").with_overrides(
        {
            "corpora": ["bach_chorales", "essen"],
            "pieces": {"bach_chorales": 40, "essen": 40},
            "piece_offset": 40,
            "piece_seconds": 20.0,
            "variants": 1,
        },
        "fit_beats",
    )
    r = render_corpus(out, params, workers=2)
    print(f"rendered {r.stats['pieces_rendered']} pieces, {r.stats['mixes']} mixes", flush=True)


def targets(times: list[float], n: int) -> np.ndarray:
    y = np.zeros(n, np.float32)
    idx = np.round(np.asarray(times, float) * FPS).astype(int)
    for off, val in ((-1, 0.5), (1, 0.5), (0, 1.0)):
        j = idx + off
        j = j[(j >= 0) & (j < n)]
        y[j] = np.maximum(y[j], val)
    return y


def load_examples(sets: list[str], cache: str, features: str = "mel") -> list[dict]:
    """Per file: spectral frames and (beat, downbeat) targets; frames cached by file path."""
    import pyarrow.parquet as pq
    import soundfile as sf

    os.makedirs(cache, exist_ok=True)
    out = []
    for root in sets:
        for row in pq.read_table(os.path.join(root, "labels.parquet")).to_pylist():
            path = os.path.join(root, "audio", row["file"])
            key = hashlib.sha256(f"{os.path.abspath(path)}:{features}".encode()).hexdigest()[:16]
            cached = os.path.join(cache, key + ".npy")
            if os.path.exists(cached):
                feats = np.load(cached)
            else:
                wave, sr = sf.read(path, dtype="float32", always_2d=True)
                feats = spectral_frames(wave.mean(axis=1), sr, features).astype(np.float16)
                np.save(cached, feats)
            n = len(feats)
            out.append(
                {
                    "name": f"{os.path.basename(root)}/{row['file']}",
                    "x": feats,
                    "beats": np.asarray(row["beats_s"], float),
                    "downbeats": np.asarray(row["downbeats_s"] or [], float),
                    "y": np.stack([targets(row["beats_s"], n), targets(row["downbeats_s"] or [], n)], axis=1),
                    "valid": int(hashlib.sha256(row.get("piece_id", row["file"]).encode()).hexdigest(), 16) % 10 == 0,
                }
            )
    return out


def build_model(channels: int, kernel: int, dilations: list[int], dropout: float, features: str = "mel"):
    import torch
    from torch import nn

    class TCN(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv1d(FEATURE_SETS[features], channels, 3, padding=1)
            self.blocks = nn.ModuleList(
                nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel - 1) // 2 * d) for d in dilations
            )
            self.out = nn.Conv1d(channels, 2, 1)
            self.drop = nn.Dropout(dropout)

        def forward(self, x):  # (batch, features, frames) -> logits (batch, 2, frames)
            x = nn.functional.elu(self.inp(x))
            for block in self.blocks:
                x = x + self.drop(nn.functional.elu(block(x)))
            return self.out(x)

    torch.manual_seed(0)
    return TCN()


def crops(examples: list[dict], rng: np.random.Generator, batch: int, frames: int, mean, std, stretch: float):
    """A batch of `frames`-frame crops, each time-stretched by a random factor in [1 / stretch, stretch] (frames
    interpolated, targets recomputed from the stretched beat times): tempo augmentation."""
    xs, ys, ms = [], [], []
    for _ in range(batch):
        ex = examples[rng.integers(len(examples))]
        n = len(ex["x"])
        factor = float(np.exp(rng.uniform(-np.log(stretch), np.log(stretch)))) if stretch > 1 else 1.0
        span = frames * factor  # source frames covered
        start = float(rng.uniform(0, max(0.0, n - span)))
        pos = start + np.arange(frames) * factor
        pos = pos[pos <= n - 1]
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (pos - lo)[:, None].astype(np.float32)
        src = ex["x"]
        x = (src[lo].astype(np.float32) * (1 - w) + src[hi].astype(np.float32) * w - mean) / std
        beats, downbeats = ((ex[k] - start / FPS) / factor for k in ("beats", "downbeats"))  # seconds in the crop
        y = np.stack([targets(beats, len(x)), targets(downbeats, len(x))], axis=1)
        m = np.ones(len(x), np.float32)
        pad = frames - len(x)
        xs.append(np.pad(x, ((0, pad), (0, 0))))
        ys.append(np.pad(y, ((0, pad), (0, 0))))
        ms.append(np.pad(m, (0, pad)))
    return np.stack(xs).transpose(0, 2, 1), np.stack(ys).transpose(0, 2, 1), np.stack(ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", default=["data/beat_fit", "data/beat_fit_corpus"])
    ap.add_argument("--render-corpus", default=None, help="render the default corpus' dev range here and exit")
    ap.add_argument("--out", default="pipelines/beat_model.npz")
    ap.add_argument("--cache", default="data/beat_fit_cache")
    ap.add_argument("--features", choices=sorted(FEATURE_SETS), default="mel")
    ap.add_argument("--channels", type=int, default=24)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--layers", type=int, default=9, help="dilations 1, 2, 4, ... 2^(layers-1)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--stretch", type=float, default=1.25, help="tempo augmentation: crops stretched up to this factor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crop-seconds", type=float, default=10.0, help="training crop length (the pipeline's clips: 10)")
    args = ap.parse_args()
    if args.render_corpus:
        render_default_corpus(args.render_corpus)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    examples = load_examples(args.sets, args.cache, args.features)
    train = [e for e in examples if not e["valid"]]
    valid = [e for e in examples if e["valid"]]
    allx = np.concatenate([e["x"] for e in train]).astype(np.float32)
    mean, std = allx.mean(axis=0), allx.std(axis=0) + 1e-3
    print(
        f"{len(train)} training files ({sum(len(e['x']) for e in train) / FPS / 60:.1f} min), {len(valid)} valid "
        f"({sum(len(e['x']) for e in valid) / FPS / 60:.1f} min); features in {time.time() - t0:.0f} s",
        flush=True,
    )
    dilations = [2**i for i in range(args.layers)]
    model = build_model(args.channels, args.kernel, dilations, args.dropout, args.features)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    rng = np.random.default_rng(0)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")

    def valid_loss() -> float:
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for ex in valid:
                x = torch.from_numpy(((ex["x"].astype(np.float32) - mean) / std).T[None])
                y = torch.from_numpy(ex["y"].T[None].copy())
                total += float(loss_fn(model(x), y).sum())
                count += y.numel()
        model.train()
        return total / count

    best, best_state, history = np.inf, None, []
    for step in range(1, args.steps + 1):
        x, y, m = crops(train, rng, args.batch, int(round(args.crop_seconds * FPS)), mean, std, args.stretch)
        gain = rng.uniform(-0.3, 0.3, size=(args.batch, 1, 1)).astype(np.float32)  # level shift of the log mel
        x[:, :N_MELS] += gain / std[:N_MELS, None]  # the mel bands
        if args.features == "pitch":
            x[:, 2 * N_MELS :] += gain / std[2 * N_MELS :, None]
        logits = model(torch.from_numpy(x))
        loss = (loss_fn(logits, torch.from_numpy(y)) * torch.from_numpy(m)[:, None]).sum() / (2 * m.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            v = valid_loss()
            history.append({"step": step, "train": loss.item(), "valid": v})
            print(f"step {step:5d} train {loss.item():.4f} valid {v:.4f} ({time.time() - t0:.0f} s)", flush=True)
            if v < best:
                best, best_state = v, {k: t.detach().numpy().copy() for k, t in model.state_dict().items()}
    arrays = {k: v.astype(np.float32) for k, v in best_state.items()}
    np.savez_compressed(
        args.out,
        **arrays,
        dilations=np.asarray(dilations),
        features=np.asarray(args.features),
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
    )
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(
            {
                "args": {k: v for k, v in vars(args).items() if k != "render_corpus"},
                "files": {"train": len(train), "valid": len(valid)},
                "best_valid_loss": best,
                "history": history,
                "seconds": round(time.time() - t0, 1),
            },
            f,
            indent=1,
        )
    print(f"best valid {best:.4f}; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
