"""The picture of an allocation: decoder block (rows) x layer type (columns), colour = kept fraction
c(k) / (m n) of that layer, dense layers marked "D". Several ranks.json files give panels side by side.

  python bench/heatmap.py runs/default/allocation/ranks.json              # -> runs/default/allocation/heatmap.png
  python bench/heatmap.py a/ranks.json b/ranks.json -o compare.png        # methods side by side

Needs matplotlib (pip install matplotlib), the one plotting library users already have.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def grid(ranks, shapes):
    """(blocks, types, kept (B, T) as nested lists, dense flags): block = first integer in the name."""
    cells = {}
    for name, rank in ranks.items():
        block = int(re.search(r"\.(\d+)\.", name).group(1))
        kind = re.sub(r"^.*?\.\d+\.", "", name)
        m, n = shapes[name]
        cells[(block, kind)] = (common.layer_cost(rank, m, n) / (m * n), rank == "dense")
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in cells))
    return blocks, kinds, [[cells.get((b, k), (float("nan"), False)) for k in kinds] for b in blocks]


def draw(paths, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    allocs = [json.load(open(p)) for p in paths]
    fig, axes = plt.subplots(1, len(allocs), figsize=(3.2 * len(allocs) + 1, 7), squeeze=False)
    for ax, alloc, path in zip(axes[0], allocs, paths):
        shapes = alloc.get("shapes") or json.load(open(os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(path))), "decompose", "manifest.json")))["layers"]
        shapes = {k: (v["m"], v["n"]) if isinstance(v, dict) else tuple(v) for k, v in shapes.items()}
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
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ranks", nargs="+", help="ranks.json files (allocation/ or compressed/)")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: heatmap.png next to the first file)")
    a = p.parse_args()
    draw(a.ranks, a.out or os.path.join(os.path.dirname(os.path.abspath(a.ranks[0])), "heatmap.png"))
