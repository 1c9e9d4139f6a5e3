"""Draw the benchmark figure for docs/benchmarks.md from the JSON that benchmarks/step.py writes.

    python benchmarks/plot.py benchmarks/results/latest.json docs/benchmarks.png

One panel per parameter set; for each algorithm, bars give each implementation's step time as a multiple of
torch's fastest implementation of that algorithm (lower is better; the dashed line is torch's best).
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

IMPL_ORDER = [
    "torch-loop",
    "torch-foreach",
    "torch-fused",
    "pureopt-pure",
    "pureopt-step",
    "pureopt-donated",
    "pureopt-flat-gather",
    "pureopt-flat",
]
COLORS = {
    "torch-loop": "#bbbbbb",
    "torch-foreach": "#888888",
    "torch-fused": "#444444",
    "pureopt-pure": "#6baed6",
    "pureopt-step": "#3182bd",
    "pureopt-donated": "#08519c",
    "pureopt-flat-gather": "#74c476",
    "pureopt-flat": "#006d2c",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("out")
    args = parser.parse_args()
    with open(args.results) as fh:
        data = json.load(fh)
    rows = data["rows"]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        sub = [r for r in rows if r["set"] == set_name]
        algos = list(dict.fromkeys(r["algo"] for r in sub))
        impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in sub)]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, algo in enumerate(algos):
                match = [r for r in sub if r["algo"] == algo and r["impl"] == impl]
                if match:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(match[0]["ratio_to_torch_best"])
            ax.bar(xs, ys, width=width, label=impl, color=COLORS.get(impl))
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(algos)))
        ax.set_xticklabels(algos, rotation=30, ha="right")
        first = sub[0]
        ax.set_title(f"{set_name}: {first['tensors']} tensors, {first['params'] / 1e6:.1f}M params")
        ax.set_ylabel("step time / torch's fastest")
    axes[0][0].legend(fontsize=8)
    machine = data.get("machine", {})
    fig.suptitle(f"{machine.get('processor', '')} ({machine.get('cpus', '?')} CPUs), torch {machine.get('torch', '')}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
