"""`make bench-compare A=… B=…`: two bench result files side by side."""

from __future__ import annotations

import json
from pathlib import Path

FIGURES = (
    ("calls_per_s", "calls/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("server_cpu_us_per_call", "srv us/call", "{:.0f}"),
    ("client_cpu_share", "cli CPU", "{:.0%}"),
)


def compare(path_a: str, path_b: str) -> str:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    lines = [
        f"A: {path_a}  commit {a['meta']['commit']}  {a['meta']['date']}  host {a['meta']['host']}",
        f"B: {path_b}  commit {b['meta']['commit']}  {b['meta']['date']}  host {b['meta']['host']}",
    ]
    args_a, args_b = a["meta"].get("args", {}), b["meta"].get("args", {})
    differ = [k for k in sorted(set(args_a) | set(args_b)) if args_a.get(k) != args_b.get(k)]
    for key in differ:
        if key != "json":
            lines.append(f"   {key}: A {args_a.get(key)!r}  B {args_b.get(key)!r}")
    lines += ["", f"{'mix':7} {'server':13} {'figure':12} {'A':>10} {'B':>10} {'B/A':>7}"]
    for mix, by_server in a["series"].items():
        for name, sa in by_server.items():
            sb = b["series"].get(mix, {}).get(name)
            if sb is None:
                continue
            for key, label, fmt in FIGURES:
                va, vb = sa[key], sb[key]
                change = f"{vb / va:6.2f}x" if va else "-"
                lines.append(
                    f"{mix:7} {name:13} {label:12} {fmt.format(va):>10} {fmt.format(vb):>10} "
                    f"{change:>7}"
                )
    lines.append("")
    lines.append(f"{'target':56} {'A':>8} {'B':>8}")
    b_targets = {t["target"]: t for t in b.get("targets", [])}
    for ta in a.get("targets", []):
        tb = b_targets.get(ta["target"])
        if tb is None:
            continue
        lines.append(f"{ta['target']:56} {ta['verdict']:>8} {tb['verdict']:>8}")
    return "\n".join(lines)
