"""Draws the time-to-verdict chart of `cargo xtask bench`.

    python chart.py RESULTS.json OUT.png

RESULTS.json: {"contenders": [...], "cases": [...], "seconds": {contender: {case: median}},
"steady_seconds": the same with every case run in one process}.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = [
    ("seconds", "one test per process: start, attach, calls, verdict, exit"),
    ("steady_seconds", "steady state: every case in one process (one-time costs paid before)"),
]


def main():
    results_path, out = sys.argv[1:]
    with open(results_path) as f:
        results = json.load(f)
    contenders, cases = results["contenders"], results["cases"]
    width = 0.8 / len(contenders)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(16, 12), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        for i, contender in enumerate(contenders):
            xs, ys = [], []
            for j, case in enumerate(cases):
                value = results[key][contender].get(case)
                if value is not None:
                    xs.append(j + (i - (len(contenders) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=contender)
        ax.set_yscale("log")
        ax.set_ylabel("time to verdict, s (median of 5)")
        ax.set_title(f"Time to verdict per case — {title}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend()
    axes[-1].set_xticks(range(len(cases)))
    axes[-1].set_xticklabels(cases, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
