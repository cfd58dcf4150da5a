"""One table from a pytest-benchmark JSON file: op, size, candidate time, best baseline,
ratio, GB/s, % of the bandwidth probe measured in the same run.

pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
python -m benchmarks.report bench.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(data: dict) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "op" in info:
            groups[(info["op"], str(info["size"]))].append(b)
    lines = [
        "| op | size | lottery_ext | best masking baseline | its time | speed-up "
        "| vs unmasked torch | GB/s | % of probe |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (op, size), bs in groups.items():
        cands = [b for b in bs if b["extra_info"].get("candidate")]
        # "(no mask)" baselines do less work: reported as a reference, not as competitors
        bases = [b for b in bs if not b["extra_info"].get("candidate")
                 and "(no mask)" not in b["extra_info"]["impl"]]  # fmt: skip
        unmasked = [b for b in bs if "(no mask)" in b["extra_info"]["impl"]]
        if not cands or not bases:
            continue
        cand = min(cands, key=lambda b: b["stats"]["median"])
        base = min(bases, key=lambda b: b["stats"]["median"])
        t, tb = cand["stats"]["median"], base["stats"]["median"]
        nbytes, probe = cand["extra_info"].get("bytes"), cand["extra_info"].get("probe_gbps")
        gbps = nbytes / t / 1e9 if nbytes else None
        vs_unmasked = f"{t / unmasked[0]['stats']['median']:.3f}x" if unmasked else ""
        lines.append(
            f"| {op} | {size} | {t * 1e3:.3f} ms | {base['extra_info']['impl']} | "
            f"{tb * 1e3:.3f} ms | {tb / t:.2f}x | {vs_unmasked} | "
            f"{'' if gbps is None else f'{gbps:.1f}'} | "
            f"{'' if gbps is None or not probe else f'{100 * gbps / probe:.0f}%'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report BENCHMARK.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(table(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
