"""Bench results -> aggregated points, a Markdown table, accuracy-vs-GFLOPs plots and the README block.

Everything here reads only the JSON files :func:`trimkit.bench.run.run_bench` wrote, so
``trimkit bench --report-only`` rebuilds the report without running a model.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from trimkit.errors import ConfigError

__all__ = ["Point", "load_results", "aggregate", "claims", "markdown", "plot", "update_readme", "build_report",
           "START", "END"]

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
_TRAINING_FREE = ("random.tokens", "topk.cls_attention", "tome.merge")
_REACHED = 0.9  # a point counts as "about 2x / 3x" from 0.9 x the reduction on
_MATCH_TOL = 0.05  # a baseline whose FLOPs reduction differs by more than this fraction is not matched


@dataclass(frozen=True)
class Point:
    """One (family, task, method, target) point aggregated over its seeds."""

    family: str
    task: str
    method: str
    ratio: float
    seeds: tuple[int, ...]
    accuracy: float
    accuracy_std: float
    gflops: float
    gflops_p95: float
    flops_reduction: float
    speedup_1: float | None
    speedup_n: float | None
    batch_n: int
    revisions: tuple[str, ...] = ()  # git revisions (12 hex digits) of the runs behind the point

    @property
    def n(self) -> int:
        return len(self.seeds)


def load_results(out_dir: str | os.PathLike) -> list[dict]:
    """Every run JSON in `out_dir` (sorted by name)."""
    root = Path(out_dir)
    if not root.is_dir():
        raise ConfigError(f"no results folder {str(root)!r}; run `trimkit bench` first")
    found = []
    for path in sorted(root.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"cannot read {str(path)!r}: {err}") from None
        if isinstance(data, dict) and "config_hash" in data and "accuracy" in data:
            found.append(data)
    return found


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _revision(row: dict) -> str:
    return str(row.get("environment", {}).get("git_revision", "?"))[:12]


def _revisions(rows: Iterable[dict]) -> tuple[str, ...]:
    return tuple(sorted({_revision(r) for r in rows}))


def aggregate(results: Iterable[dict]) -> list[Point]:
    """Results grouped by (family, task, method, ratio): mean (and sample std) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["family"], r["task"], r["method"], round(r["ratio"], 6)), []).append(r)
    points = []
    for (family, task, method, ratio), rows in groups.items():
        batch_n = rows[0]["latency_batches"][1]
        acc = [r["accuracy"] for r in rows]
        points.append(Point(
            family, task, method, ratio, tuple(sorted(r["seed"] for r in rows)), statistics.fmean(acc),
            statistics.stdev(acc) if len(acc) > 1 else 0.0,
            statistics.fmean(r["flops"]["mean"] for r in rows) / 1e9,
            statistics.fmean(r["flops"]["p95"] for r in rows) / 1e9,
            statistics.fmean(r["flops_reduction"] for r in rows),
            _mean([r["latency_speedup"].get("batch_1") for r in rows]),
            _mean([r["latency_speedup"].get(f"batch_{batch_n}") for r in rows]), batch_n, _revisions(rows)))
    order = {"full": 0, "smarttrim": 1}
    return sorted(points, key=lambda p: (p.family, p.task, -p.ratio, order.get(p.method, 2), p.method))


def _find(points: list[Point], method: str, ratio: float | None = None) -> Point | None:
    for p in points:
        if p.method == method and (ratio is None or math.isclose(p.ratio, ratio, abs_tol=1e-4)):
            return p
    return None


def claims(points: list[Point], method: str = "smarttrim") -> list[dict]:
    """Per (family, task): the checks of the SmartTrim claim for `method` (``smarttrim`` or one of its
    variants, e.g. ``smarttrim-tokens``), from the aggregated points."""
    out = []
    for key in sorted({(p.family, p.task) for p in points}):
        pts = [p for p in points if (p.family, p.task) == key]
        full = _find(pts, "full")
        row: dict = {"family": key[0], "task": key[1], "method": method}
        for label, ratio, allowed in (("2x", 0.5, 0.01), ("3x", 1 / 3, 0.02)):
            st = _find(pts, method, ratio)
            if full is None or st is None:
                continue
            drop = full.accuracy - st.accuracy
            reached = st.flops_reduction >= _REACHED * (1 / ratio)
            # accuracies are fractions of the items counted, so a drop of exactly 1 point can come
            # out as 0.010000000000000009: compare with a tolerance far below one item
            row[label] = {"drop": drop, "ok": drop <= allowed + 1e-9 and reached, "reached": reached,
                          "flops_reduction": st.flops_reduction}
            fast = [s for s in (st.speedup_1, st.speedup_n) if s is not None]
            row[label]["speed_ok"] = bool(fast) and all(s >= 0.85 * st.flops_reduction for s in fast)
            if label == "3x":
                free = [p for p in pts if p.method in _TRAINING_FREE and math.isclose(p.ratio, ratio, abs_tol=1e-4)]
                row[label]["beats_training_free"] = bool(free) and all(st.accuracy > p.accuracy for p in free)
                row[label]["unmatched"] = {p.method: p.flops_reduction for p in free
                                           if abs(p.flops_reduction / st.flops_reduction - 1) > _MATCH_TOL}
        out.append(row)
    return out


def _fmt_speed(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def markdown(points: list[Point], commands: Iterable[str] = ()) -> str:
    """The README block: the command(s), one table per family/task, and the claim checks."""
    lines = []
    commands = sorted(set(commands))
    if commands:
        lines += ["Reproduce with:", "", "```", *commands, "```", ""]
    mixed = len({r for p in points for r in p.revisions}) > 1  # runs of several code revisions: say which
    for key in sorted({(p.family, p.task) for p in points}):
        pts = [p for p in points if (p.family, p.task) == key]
        full = _find(pts, "full")
        batch_n = pts[0].batch_n
        lines += [f"**{key[0]} / {key[1]}** (test accuracy; executed GFLOPs per sample; speedup = untrimmed / "
                  f"trimmed latency, same run)", "",
                  f"| method | target | seeds | accuracy | Δ vs full | GFLOPs mean | GFLOPs p95 | FLOPs ÷ | "
                  f"speedup b1 | speedup b{batch_n} |" + (" git |" if mixed else ""),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mixed else "")]
        for p in pts:
            target = "–" if p.method == "full" else f"{1 / p.ratio:.1f}×"
            acc = f"{100 * p.accuracy:.2f}" + (f" ± {100 * p.accuracy_std:.2f}" if p.n > 1 else "")
            delta = "–" if full is None or p.method == "full" else f"{100 * (p.accuracy - full.accuracy):+.2f}"
            lines.append(f"| {p.method} | {target} | {p.n} | {acc} | {delta} | {p.gflops:.4f} | {p.gflops_p95:.4f} "
                         f"| {p.flops_reduction:.2f} | {_fmt_speed(p.speedup_1)} | {_fmt_speed(p.speedup_n)} |"
                         + (f" {', '.join(r[:7] for r in p.revisions)} |" if mixed else ""))
        lines.append("")
    checks = claims(points)
    variants = sorted({p.method for p in points if p.method.startswith("smarttrim-")})
    checks += [c for v in variants for c in claims(points, v) if "2x" in c or "3x" in c]
    if checks:
        lines += ["Claim checks (SmartTrim vs full: ≤ 1 point at 2×, ≤ 2 points at 3×, where the point reaches at "
                  "least 0.9 × the reduction it aims at; above every training-free baseline at 3×; speedup ≥ "
                  "0.85 × FLOPs reduction at batch 1 and the large batch):", ""]
        for c in checks:
            parts = []
            for label in ("2x", "3x"):
                if label in c:
                    v = c[label]
                    short = "" if v.get("reached", True) else f": {v['flops_reduction']:.2f}× is short of {label}"
                    text = (f"{label} ({v['flops_reduction']:.2f}× fewer FLOPs): {100 * -v['drop'] + 0.0:+.2f} pt vs full "
                            f"({'ok' if v['ok'] else 'NOT met'}{short}), speed {'ok' if v['speed_ok'] else 'NOT met'}")
                    if "beats_training_free" in v:
                        text += f", above training-free {'yes' if v['beats_training_free'] else 'NO'}"
                        if v.get("unmatched"):
                            text += " (FLOPs not matched: " + ", ".join(
                                f"{m} at {r:.2f}×" for m, r in sorted(v["unmatched"].items())) + ")"
                    parts.append(text)
            who = "" if c["method"] == "smarttrim" else f" ({c['method']})"
            lines.append(f"- {c['family']} / {c['task']}{who}: " + ("; ".join(parts) if parts else "no 2×/3× point"))
        lines.append("")
    return "\n".join(lines)


def plot(points: list[Point], out_dir: str | os.PathLike, *, command: str = "") -> list[Path]:
    """One PNG per (family, task): accuracy vs executed GFLOPs, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in sorted({(p.family, p.task) for p in points}):
        pts = [p for p in points if (p.family, p.task) == key]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method in sorted({p.method for p in pts}, key=lambda m: (m != "smarttrim", m)):
            series = sorted((p for p in pts if p.method == method), key=lambda p: p.gflops)
            xs, ys = [p.gflops for p in series], [100 * p.accuracy for p in series]
            err = [100 * p.accuracy_std for p in series]
            style = dict(marker="*", markersize=12, linestyle="none") if method == "full" else dict(marker="o")
            if method.startswith("smarttrim") and method != "smarttrim":
                style = dict(marker="x", linestyle="none")
            ax.errorbar(xs, ys, yerr=err, label=method, capsize=3, **style)
        ax.set_xlabel("executed GFLOPs per sample (mean)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{key[0]} / {key[1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if command:
            fig.text(0.01, 0.005, command, fontsize=6, color="0.4")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = out / f"bench-{key[0]}-{key[1]}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def update_readme(readme: str | os.PathLike, block: str, *, start: str = START, end: str = END) -> None:
    """Replace the text between the markers (default: the bench's) of `readme`, appending them if absent."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    inner = f"{start}\n{block.rstrip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + inner + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + inner + "\n"
    path.write_text(text, encoding="utf-8")


def build_report(out_dir: str | os.PathLike, *, docs: str | os.PathLike | None = "docs",
                 readme: str | os.PathLike | None = "README.md") -> dict:
    """Aggregate the JSON in `out_dir`, write the plots into `docs` and the table into `readme`
    (None skips either); ``{"points": [...], "plots": [...], "markdown": str, "skipped": str}``, where
    ``skipped`` says why no plot was drawn (matplotlib missing), else is empty."""
    results = load_results(out_dir)
    if not results:
        raise ConfigError(f"no bench results in {str(out_dir)!r}; run `trimkit bench` first")
    points = aggregate(results)
    commands = sorted({r.get("command", "") for r in results} - {""})
    modes = sorted({r.get("bench", {}).get("mode", "?") for r in results})
    env = results[0].get("environment", {})
    revs = Counter(_revision(r) for r in results)
    git = ", ".join(f"{r} ({n} run{'s' if n != 1 else ''})" if len(revs) > 1 else r for r, n in revs.most_common())
    header = (f"Bench mode: {', '.join(modes)}; results in `{Path(out_dir).as_posix()}` "
              f"({len(results)} runs); device {env.get('device', '?')} ({env.get('device_name', '?')}), "
              f"{env.get('threads', '?')} threads, torch {env.get('torch', '?')}, transformers "
              f"{env.get('transformers', '?')}, git {git}.\n")
    plots, skipped = [], ""
    if docs is not None:
        try:
            plots = plot(points, docs, command=commands[0] if commands else "")
        except ModuleNotFoundError as err:
            if err.name != "matplotlib":
                raise
            skipped = "plots skipped: matplotlib is not installed (pip install 'trimkit[plot]')"
    text = header + "\n" + markdown(points, commands)
    if plots:
        base = Path(readme).parent if readme is not None else Path(".")
        text += "\nPlots: " + ", ".join(f"[{p.name}]({Path(os.path.relpath(p, base)).as_posix()})" for p in plots) + "\n"
    if readme is not None:
        update_readme(readme, text)
    return {"points": points, "plots": plots, "markdown": text, "skipped": skipped}
