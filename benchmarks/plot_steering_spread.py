"""How varied steered takes are next to real music and the generator's own: a picture of one cell of a
`steering_push_terms.py --own-takes K --save FILE.npz` run (docs/steering.md, "Takes made alike").

    python benchmarks/steering_push_terms.py --set 'tasks=[text]' --modes smitin --own-takes 15 --save /tmp/cells.npz
    python benchmarks/plot_steering_spread.py /tmp/cells.npz --out docs/steering_spread.png

Left and middle: every take in the Frechet distance's 16-d space (the stage's PCA of the real continuations),
components 1-2 and 3-4: the real continuations with and without the trait, the unsteered takes from prompts without
it, the smitin takes that add it, and the generator's own takes judged trait-bearing. Right: each set's variance
along each component over the real continuations' (1: as varied as real music).
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("npz")
    ap.add_argument("--trait", default="drums")
    ap.add_argument("--task", default="text")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    d = np.load(args.npz)
    t, task = args.trait, args.task
    ref, k = d[f"ref_{t}"], int(d[f"ref_with_{t}"])
    sets = [
        ("real, with", ref[:k], "tab:red", "x"),
        ("real, without", ref[k:], "tab:blue", "x"),
        ("unsteered", d[f"{t}/{task}/add/none"], "0.6", "o"),
        ("smitin (add)", d[f"{t}/{task}/add/smitin"], "tab:orange", "o"),
        ("own, judged with", d[f"own/{t}/{task}"], "tab:green", "o"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (i, j) in zip(axes[:2], ((0, 1), (2, 3))):
        for name, z, color, marker in sets:
            ax.scatter(z[:, i], z[:, j], s=14, c=color, marker=marker, alpha=0.75, label=f"{name} ({len(z)})")
        ax.set_xlabel(f"component {i + 1}")
        ax.set_ylabel(f"component {j + 1}")
    axes[0].legend(fontsize=8, loc="best")
    ref_var = ref.var(0)
    width = 0.8 / (len(sets) - 1)
    for n, (name, z, color, _) in enumerate(sets[2:] + [("real, all", ref, "k", "")]):
        share = z.var(0) / ref_var
        axes[2].bar(
            np.arange(ref.shape[1]) + n * width,
            share,
            width,
            color=color,
            label=f"{name}: total {z.var(0).sum() / ref_var.sum():.2f}",
        )
    axes[2].set_xlabel("component")
    axes[2].set_ylabel("variance over real music's")
    axes[2].set_xticks(np.arange(ref.shape[1]) + width, [str(c + 1) for c in range(ref.shape[1])])
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{t}, {task}: takes in the Frechet distance's space")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
