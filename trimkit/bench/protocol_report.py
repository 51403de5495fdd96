"""The table of a protocol's results, with paired-bootstrap intervals and non-inferiority verdicts.

Read from the run JSONs of :mod:`trimkit.bench.protocol_run` (only runs made under the protocol's
current digest). Every Δ is in accuracy points on the test split, paired over its items;
SmartTrim's intervals also resample its seeds (:func:`trimkit.bench.stats.seeded_bootstrap`).
The verdict is the protocol's claim: SmartTrim is non-inferior to the full model at a target when
the interval's lower end is at or above minus that target's margin.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from trimkit.bench.protocol import CONTROL, PRIOR, Protocol, plan
from trimkit.bench.protocol_run import read_run
from trimkit.bench.report import update_readme
from trimkit.bench.stats import seeded_bootstrap
from trimkit.bench.sweep import unpack_bits

__all__ = ["build_protocol_report", "collect", "models_in", "MARKERS"]

MARKERS = ("<!-- protocol:start -->", "<!-- protocol:end -->")


def models_in(protocol: Protocol, out_dir: str | Path) -> tuple[str, ...]:
    """The protocol's models, then any other model with runs under its digest in `out_dir` (run
    with ``--models``)."""
    found = []
    for path in sorted(Path(out_dir).glob("*.json")):
        data = read_run(path)
        if data and data.get("protocol", {}).get("digest") == protocol.digest and data.get("model"):
            found.append(data["model"])
    return tuple(dict.fromkeys([*protocol.models, *found]))


def collect(protocol: Protocol, out_dir: str | Path) -> dict[tuple, list[dict]]:
    """``(model, method, ratio) -> [run records]`` of finished runs under the current digest, in
    seed order; failed runs are listed under ``("failed",)``."""
    out = Path(out_dir)
    groups: dict[tuple, list[dict]] = {}
    for run in plan(replace(protocol, models=models_in(protocol, out))):
        data = read_run(out / f"{run.name}.json")
        if data and data.get("status") == "ok" and data.get("protocol", {}).get("digest") == protocol.digest:
            groups.setdefault((run.model, run.method, run.ratio), []).append(data)
    groups[("failed",)] = [d for p in sorted(out.glob("*.failed-*.json")) if (d := read_run(p))]
    return groups


def _correct(runs: list[dict], key: str = "correct", split: str = "test") -> np.ndarray:
    return np.stack([unpack_bits(r[split][key], r[split]["items"]) for r in runs]).astype(np.float32)


def _pct(runs: list[dict], split: str, key: str = "accuracy") -> str:
    values = np.array([r[split][key] for r in runs]) * 100
    return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")


def _flops(runs: list[dict]) -> str:
    if "flops" not in runs[0]["test"]:
        return "–"
    mean = np.mean([r["test"]["flops_reduction"] for r in runs])
    p95 = np.mean([r["test"]["flops_untrimmed"]["mean"] / r["test"]["flops"]["p95"] for r in runs])
    return f"{mean:.2f}x (p95 item {p95:.2f}x)"


def _delta(a: np.ndarray, b: np.ndarray, paired: bool = False) -> tuple[str, object]:
    d = seeded_bootstrap(a, b, paired_seeds=paired)
    return f"{d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}]", d


def _partial(seeds: int, planned: int) -> str:
    return "" if seeds >= planned else f"; {seeds} of {planned} seeds, not yet a claim"


def _reduction(ratio: float) -> str:
    return f"{1 / ratio:.1f}x".replace(".0x", "x")


def _model_rows(protocol: Protocol, groups: dict, model: str) -> tuple[list[str], list[str], dict]:
    """The SmartTrim/control table and the baseline table of one model, and its verdicts."""
    get = lambda method, ratio=1.0: groups.get((model, method, ratio), [])  # noqa: E731
    full, prior, control = get("full"), get(PRIOR), get(CONTROL)
    if not full:
        return [], [], {}
    base = _correct(full)
    main = ["| row | seeds | val acc | test acc | executed FLOPs, fewer (mean; p95 item) | Δ vs full | "
            "Δ vs own untrimmed | Δ vs full + fine-tuning | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    if prior:
        main.append(f"| text-only prior | – | {_pct(prior, 'val')} | {_pct(prior, 'test')} | – | "
                    f"{_delta(base, _correct(prior))[0]} | | | |")
    main.append(f"| full | – | {_pct(full, 'val')} | {_pct(full, 'test')} | 1x | | | | |")
    ctrl = _correct(control) if control else None
    if control:
        main.append(f"| full + fine-tuning (control) | {len(control)} | {_pct(control, 'val')} | {_pct(control, 'test')} "
                    f"| 1x | {_delta(base, ctrl)[0]} | | | |")
    verdicts, smart = {}, {}
    for ratio in protocol.ratios:
        runs = get("smarttrim", ratio)
        if not runs:
            continue
        trimmed = smart[ratio] = _correct(runs)
        text, d = _delta(base, trimmed)
        margin = protocol.margin(ratio)
        verdicts[ratio] = {"seeds": len(runs), "delta": d.delta, "low": d.low, "high": d.high, "margin": margin,
                           "verdict": d.verdict(margin), "complete": len(runs) >= protocol.seeds}
        own = _delta(_correct(runs, "correct_untrimmed"), trimmed, paired=True)[0]
        vs_ctrl = _delta(ctrl, trimmed)[0] if ctrl is not None else "–"
        main.append(f"| SmartTrim {_reduction(ratio)} | {len(runs)} | {_pct(runs, 'val')} | {_pct(runs, 'test')} | "
                    f"{_flops(runs)} | {text} | {own} | {vs_ctrl} | **{d.verdict(margin)}** (margin {margin:g}"
                    f"{_partial(len(runs), protocol.seeds)}) |")
    rows = ["| baseline | target | seeds | val acc | test acc | executed FLOPs, fewer (mean; p95 item) | Δ vs full | "
            "SmartTrim − baseline |", "|---|---|---|---|---|---|---|---|"]
    for ratio in protocol.ratios:
        for name in protocol.baselines:
            for method in (name, f"{name}+ft"):
                runs = get(method, ratio)
                if not runs:
                    continue
                other = _correct(runs)
                versus = _delta(other, smart[ratio])[0] if ratio in smart else "–"
                rows.append(f"| {method} | {_reduction(ratio)} | {len(runs)} | {_pct(runs, 'val')} | {_pct(runs, 'test')} "
                            f"| {_flops(runs)} | {_delta(base, other)[0]} | {versus} |")
    return main, rows if len(rows) > 2 else [], verdicts


def _header(protocol: Protocol, groups: dict, out_dir: Path) -> list[str]:
    n, seed = protocol.splits["test"]
    done = sum(len(v) for k, v in groups.items() if k != ("failed",))
    return [f"Protocol `{protocol.name}` ([{protocol.path}]({protocol.path}), sha256 `{protocol.digest[:12]}`), "
            f"run with `trimkit bench --protocol {protocol.path}`; {done} of {len(plan(protocol))} runs finished, "
            f"{len(groups[('failed',)])} failed attempts kept; JSON and `MANIFEST.json` in `{out_dir}`.",
            "",
            f"Test split: {n:,} items on seed {seed}, read once by the final runs. Accuracy in %, mean ± SD over "
            "training seeds. Δ in points with 95 % paired-bootstrap intervals (10,000 resamples of the test "
            "items and, for multi-seed rows, of the seeds). Executed FLOPs are counted by the profiler for "
            "every test item (mean reduction, and the reduction of the 95th-percentile item). Verdict: "
            "SmartTrim is *non-inferior* to the full model when the interval's lower end is ≥ −margin, "
            "*inferior* when its upper end is below −margin, else *inconclusive*.", ""]


def build_protocol_report(protocol: Protocol, out_dir: str | Path, readme: str | Path | None = "README.md") -> dict:
    """The markdown of the protocol's tables; written between :data:`MARKERS` in `readme` (appended
    with them when absent, as the bench's own table; None: not written). Returns
    ``{"markdown", "verdicts"}``."""
    out = Path(out_dir)
    groups = collect(protocol, out)
    protocol = replace(protocol, models=models_in(protocol, out))
    lines = _header(protocol, groups, out)
    verdicts = {}
    for model in protocol.models:
        main, rows, verdicts[model] = _model_rows(protocol, groups, model)
        if not main:
            lines += [f"`{model}`: no finished full-model run yet.", ""]
            continue
        lines += [f"**{model}**", "", *main, "", *(rows + [""] if rows else [])]
    markdown = "\n".join(lines).rstrip() + "\n"
    if readme is not None:
        update_readme(readme, markdown, start=MARKERS[0], end=MARKERS[1])
    return {"markdown": markdown, "verdicts": verdicts}
