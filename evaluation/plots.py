"""Pictures of an allocation, drawn by evaluate.py next to metrics.json and by hand for comparisons:
  heatmap     decoder block (rows) x layer type (columns), colour = kept fraction c(k) / (m n) of
              that layer, dense layers marked "D"; several ranks.json files give panels side by side
  trajectory  every layer's r_l over the training steps (learned methods), one colour per layer
              type, dense flips marked; the dashed line is r = 1, where a layer switches to dense

  python -m evaluation.plots runs/default/allocation/ranks.json                  # -> heatmap.png next to it
  python -m evaluation.plots a/ranks.json b/ranks.json -o compare.png            # methods side by side
  python -m evaluation.plots --trajectory runs/default/allocation/ranks.json -o traj.png   # r_l over training

matplotlib is the one plotting library users already have (requirements.txt says so).
"""
import argparse
import json
import os
import re

from plumbing.loading import layer_type



def grid(ranks, shapes):
    """(blocks, types, cells (B, T) of (kept fraction, dense?)): block = first integer in the name."""
    cells = {}
    for name, rank in ranks.items():
        block = int(re.search(r"\.(\d+)\.", name).group(1))
        m, n = shapes[name]
        cells[(block, layer_type(name))] = (1.0 if rank == "dense" else min(rank * (m + n) / (m * n), 1.0), rank == "dense")  # c(k) / (m n)
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in cells))
    return blocks, kinds, [[cells.get((b, k), (float("nan"), False)) for k in kinds] for b in blocks]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def heatmap(allocs, out):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(allocs), figsize=(3.2 * len(allocs) + 1, 7), squeeze=False)
    for ax, alloc in zip(axes[0], allocs):
        shapes = {k: tuple(v) for k, v in alloc["shapes"].items()}
        blocks, kinds, cells = grid(alloc["layers"], shapes)
        img = ax.imshow([[c[0] for c in row] for row in cells], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(cells):
            for j, (_, dense) in enumerate(row):
                if dense:
                    ax.text(j, i, "D", ha="center", va="center", color="black", fontsize=6)
        ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=90, fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=6)
        ax.set_title(f"{alloc['method']} keep {alloc['kept_fraction_linear']:.2f}", fontsize=9)
    axes[0][0].set_ylabel("decoder block")
    fig.colorbar(img, ax=axes[0].tolist(), label="kept fraction of the layer (D = dense)")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def trajectory(alloc, out):
    plt = _pyplot()
    traj = alloc["trajectory"]
    kinds = list(dict.fromkeys(map(layer_type, traj["r"])))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in traj["r"].items():
        ax.plot(traj["step"], r, lw=0.6, alpha=0.6, color=colours(kinds.index(layer_type(name)) % 10))
    for step, name, to in alloc.get("dense_flips", []):
        ax.plot([step], [1.0], "^" if to == "dense" else "v", ms=3, color="k", alpha=0.4)
    for i, kind in enumerate(kinds):
        ax.plot([], [], color=colours(i % 10), label=kind.split(".")[-1])
    ax.axhline(1.0, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("r_l = k_hat (m + n) / (m n)")
    ax.set_title(f"{alloc['method']} keep {alloc['keep']}: r_l per layer, "
                 f"{len(alloc.get('dense_flips', []))} dense flips (^ to dense, v back)", fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_allocation_plots(alloc, folder):
    """heatmap.png (and trajectory.png for learned methods) next to ranks.json."""
    try:
        heatmap([alloc], os.path.join(folder, "heatmap.png"))
        if alloc.get("trajectory"):
            trajectory(alloc, os.path.join(folder, "trajectory.png"))
    except ImportError:
        print("matplotlib not installed: no heatmap.png / trajectory.png (pip install matplotlib)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ranks", nargs="+", help="ranks.json files (allocation/ or compressed/)")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: heatmap.png next to the first file)")
    p.add_argument("--trajectory", action="store_true", help="draw r_l over the training steps of one learned run")
    a = p.parse_args()
    kind = "trajectory" if a.trajectory else "heatmap"
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.ranks[0])), f"{kind}.png")
    if a.trajectory:
        trajectory(json.load(open(a.ranks[0])), out)
    else:
        heatmap([json.load(open(path)) for path in a.ranks], out)
    print(f"wrote {out}")
