#!/usr/bin/env python3
"""Per-worker timeline of one run, from the CSV `switchyard-bench des --per-request` writes.

    switchyard-bench des --scenario bench/scenarios/zipf-mixed.toml --policy marginal_utility \\
        --load 1.3 --out /tmp/zm --per-request
    python3 bench/timeline.py /tmp/zm/requests-marginal_utility-1.30.csv [window seconds, 10]

One line per window of arrivals: for each worker, the requests sent there, the share of them
outside the SLOs ("late"), the share of prompt tokens served from its cache ("hit"), the mean
TTFT (s) and, where the policy says why it chose (marginal_utility's `reason`), the share sent
there by best effort, no worker being feasible ("be"), and the share of the late ones sent by a
rule that expected them in time ("miss": the model was wrong, not the fleet short). A summary
says how a run went; this says when and where: e.g. one worker late from the first burst on and
never recovering, against a fleet that drains its warm-up queue. In a prefill/decode fleet each
request counts twice: at its prefill worker ("w") and at its decode worker ("d"), whose batch
slots are where a PD fleet's queue builds.
"""

import csv
import sys
from collections import defaultdict

# Reasons under which the policy expected the first token within the SLO.
IN_TIME = ("feasible", "best_effort_in_margin_soonest", "best_effort_small_in_time")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    window = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    cells = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, 0, 0.0, 0, 0, 0]))
    reasons = False
    with open(sys.argv[1], newline="") as f:
        for r in csv.DictReader(f):
            reason = r.get("reason") or ""
            reasons = reasons or bool(reason)
            legs = [("w", r["worker"] or "-")]
            if r.get("decode_worker"):
                legs.append(("d", r["decode_worker"]))
            for leg in legs:
                c = cells[int(float(r["sent_s"]) // window)][leg]
                c[0] += 1
                c[1] += r["meets_slo"] != "1"
                c[2] += int(r["cached_tokens"])
                c[3] += int(r["prompt_tokens"])
                if r["ttft_s"]:
                    c[4] += float(r["ttft_s"])
                    c[5] += 1
                c[6] += reason.startswith("best_effort")
                c[7] += r["meets_slo"] != "1" and reason.startswith(IN_TIME)
    for w in sorted(cells):
        parts = []
        for (leg, worker), (n, late, cached, prompt, ttft, with_ttft, be, miss) in sorted(cells[w].items()):
            hit = cached / prompt if prompt else 0.0
            mean_ttft = ttft / with_ttft if with_ttft else float("nan")
            part = f"{leg}{worker}: n {n:4d} late {late / n:.2f} hit {hit:.2f} ttft {mean_ttft:6.2f}"
            if reasons:
                part += f" be {be / n:.2f} miss {miss / late if late else 0.0:.2f}"
            parts.append(part)
        print(f"{w * window:6.0f}s  " + " | ".join(parts))


if __name__ == "__main__":
    main()
