"""The README's GPU tables, built from GPU-check folders (``benchmarks/gpu_check.sh --out DIR``):
Backward Search per query set and engine (1 and 1,000 queries, speed-up over the eager loop at
1,000, identical top-10, capture seconds), and Serve per method and concurrency (p50 / p99 ms,
requests/s, errors), each folder a column group, e.g. a GPU run next to a CPU run. Prints
Markdown.

    python benchmarks/gpu_table.py GPU_DIR [CPU_DIR ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _label(folder: Path) -> str:
    env_file = folder / "environment.json"
    env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    if env.get("gpu"):
        return f"{env['gpu']} ({env.get('device', 'cuda')})"
    return f"{env.get('cpus', '?')} CPU cores" if env else folder.name


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _times(speed: float | None) -> str:
    if speed is None:
        return "–"
    return f"{speed:.1f}×" if speed >= 1 else f"{speed:.2f}×"


def backward_table(folders: list[Path]) -> str:
    lines = ["| machine | query set | engine | 1 query ms | 1,000 queries ms | speed-up at 1,000 | identical top-10 "
             "| capture s |", "|---|---|---|---|---|---|---|---|"]
    for folder in folders:
        path = folder / "backward_search.json"
        if not path.is_file():
            continue
        bs = json.loads(path.read_text())
        for name, qs in bs["query_sets"].items():
            eng = qs.get("engines") or {}
            for engine in [k for k in eng if isinstance(eng[k], dict) and "capture_s" in eng[k]]:
                row = eng[engine]
                speed = (eng.get(f"speedup_{engine}") or {}).get("batch_1000")
                same = eng.get(f"identical_top10_{engine}")
                lines.append(f"| {_label(folder)} | {name} | {engine} | {_ms(row.get('batch_1_ms'))} | "
                             f"{_ms(row.get('batch_1000_ms'))} | {_times(speed)} | "
                             f"{'–' if same is None else f'{100 * same:.1f} %'} | {row['capture_s']:.1f} |")
            for engine, why in ((k, v["error"]) for k, v in eng.items() if isinstance(v, dict) and "error" in v):
                lines.append(f"| {_label(folder)} | {name} | {engine} | failed: {why[:80]} | | | | |")
    return "\n".join(lines)


def serve_table(folders: list[Path]) -> str:
    loads = {f: json.loads((f / "loadtest" / "loadtest.json").read_text())["stages"] for f in folders
             if (f / "loadtest" / "loadtest.json").is_file()}
    head = "| method | concurrency | " + " | ".join(f"{_label(f)}: p50 / p99 ms | req/s | errors" for f in loads) + " |"
    lines = [head, "|---|---|" + "---|---|---|" * len(loads)]
    keys = sorted({(s["method"], s["concurrency"]) for st in loads.values() for s in st if s["mode"] == "closed"},
                  key=lambda k: (["student", "teacher", "knn"].index(k[0]) if k[0] in ("student", "teacher", "knn")
                                 else 9, k[0], k[1]))
    for method, c in keys:
        cells = []
        for stages in loads.values():
            s = next((s for s in stages if s["mode"] == "closed" and (s["method"], s["concurrency"]) == (method, c)),
                     None)
            cells.append("– | – | –" if s is None or not s["requests"] else
                         f"{_ms(s['p50_ms'])} / {_ms(s['p99_ms'])} | {s['qps']:.0f} | {s['errors']}")
        lines.append(f"| {method} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "summary.json").is_file()]
    if missing:
        print(f"not a GPU-check folder (no summary.json): {', '.join(missing)}", file=sys.stderr)
        return 2
    print(backward_table(args.folders))
    print()
    print(serve_table(args.folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
