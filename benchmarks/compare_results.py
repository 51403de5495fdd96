"""Compare two folders of bench results (``trimkit bench --out``) run for run.

Every field must agree except the ones that measure time or describe the machine and command
(latency, seconds, finish time, environment, command line, cache paths). Exit code 1 when a run
is missing on one side or a field differs.

    python benchmarks/compare_results.py OLD_DIR NEW_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NOISE = frozenset({"latency_ratio", "latency_speedup", "latency_ms", "seconds", "finished", "environment", "command",
                   "cache_dir"})


def _kept(data, path: str = ""):
    """`data` without the noisy keys (and the base model's file path)."""
    if isinstance(data, dict):
        return {k: _kept(v, f"{path}.{k}") for k, v in data.items()
                if k not in NOISE and not (k == "path" and path == ".base")}
    if isinstance(data, list):
        return [_kept(v, path) for v in data]
    return data


def differences(a, b, path: str = "") -> list[str]:
    """Every path at which `a` and `b` (JSON values) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in {'second' if k in b else 'first'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str]) -> int:
    old, new = Path(argv[0]), Path(argv[1])
    names = sorted({p.name for p in old.glob("*.json")} | {p.name for p in new.glob("*.json")})
    bad = 0
    for name in names:
        if not (old / name).is_file() or not (new / name).is_file():
            print(f"{name}: only in {'first' if (old / name).is_file() else 'second'}")
            bad += 1
            continue
        a, b = (json.loads((d / name).read_text(encoding="utf-8")) for d in (old, new))
        found = differences(_kept(a), _kept(b))
        print(f"{name:48} {'identical' if not found else f'{len(found)} differences'}")
        for line in found:
            print("   ", line)
        bad += len(found)
    print("all identical" if not bad else f"{bad} differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
