"""Print benchmark results as one line per case: each implementation's median and its speed-up over
the case's baseline (public-eval, public or reference, whichever the case has), measured in the
same run; for test_adapter_interleaved's records, each implementation's median and the speed-up of
the two timed alternately in one loop.

    python scripts/bench_table.py FILE [FILE ...]

FILE: pytest-benchmark's --benchmark-json output, or the JSON lines bench/conftest.py appends with
MOCE_FAST_BENCH_JSONL (those survive an interrupted run).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

BASELINES = ("public-eval", "public", "reference")


def records(path: str) -> list[dict]:
    with open(path) as f:
        text = f.read()
    try:  # --benchmark-json: one object
        return json.loads(text)["benchmarks"]
    except (json.JSONDecodeError, KeyError, TypeError):  # JSON lines
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def table(recs: list[dict]) -> list[str]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    lines, interleaved = [], []
    for r in recs:
        extra = r.get("extra_info", {})
        if "speedup" in extra:  # bench_adapter.py's test_adapter_interleaved: both timed in one loop
            cells = [f"{impl} {t * 1e3:.3f} ms" for impl, t in extra["median_s"].items()]
            interleaved.append(f"{r['group']}: " + ", ".join(cells) + f" ({extra['speedup']:.2f}x, interleaved)")
            continue
        impl = extra.get("impl") or r["name"].rsplit("-", 1)[-1].rstrip("]")
        groups[r["group"]][impl] = r["stats"]
    for group in sorted(groups):
        stats = groups[group]
        base = next((b for b in BASELINES if b in stats), None)
        cells = []
        for impl, st in stats.items():
            cell = f"{impl} {st['median'] * 1e3:.3f} ms"
            if base and impl != base:
                cell += f" ({stats[base]['median'] / st['median']:.2f}x)"
            if st.get("rounds", 0) < 3:
                cell += f" [{st.get('rounds')} rounds]"
            cells.append(cell)
        lines.append(f"{group}: " + ", ".join(cells))
    return lines + sorted(interleaved)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    recs = [r for path in argv for r in records(path)]
    print("\n".join(table(recs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
