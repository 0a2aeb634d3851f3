#!/usr/bin/env python3
"""marginal_utility against the best other policy at every load of every scenario, from the
results.json files `bench/des_all.sh` (or `switchyard-bench compare`) writes.

    python3 bench/mu_vs_best.py bench-results/des

Prints a Markdown table: per scenario the knee (load 1.0), MU's goodput ratio against the best
non-marginal_utility policy at each load, and the minimum with where it occurs.
"""

import glob
import json
import sys


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "bench-results/des"
    files = sorted(glob.glob(f"{root}/*/results.json"))
    if not files:
        sys.exit(f"no results.json under {root}")
    loads = sorted({r["load"] for f in files for r in json.load(open(f))["runs"]})
    print("| scenario | knee (req/s) | " + " | ".join(f"{l:.1f}" for l in loads) + " | min (load, best other) |")
    print("|---|---|" + "---|" * len(loads) + "---|")
    for f in files:
        res = json.load(open(f))
        cells, worst = [], None
        for load in loads:
            runs = [r for r in res["runs"] if r["load"] == load]
            mu = [r for r in runs if r["policy"] == "marginal_utility" and r["router"] == "switchyard"]
            others = [r for r in runs if not r["policy"].startswith("marginal_utility")]
            if not mu or not others:
                cells.append("–")
                continue
            best = max(others, key=lambda r: r["goodput_rps"])
            ratio = mu[0]["goodput_rps"] / best["goodput_rps"] if best["goodput_rps"] > 0 else float("inf")
            cells.append(f"{ratio:.3f}")
            if worst is None or ratio < worst[0]:
                worst = (ratio, load, f'{best["router"]}:{best["policy"]}')
        w = f"{worst[0]:.3f} ({worst[1]:.1f}, {worst[2]})" if worst else "–"
        print(f'| {res["scenario"]} | {res["capacity_rps"]:.2f} | ' + " | ".join(cells) + f" | {w} |")


if __name__ == "__main__":
    main()
