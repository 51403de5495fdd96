"""The speed table: Markdown generated only from the JSON files of one `run_speed` run."""
from __future__ import annotations

import json
import os
from pathlib import Path

from trimkit.bench.report import update_readme
from trimkit.errors import ConfigError

__all__ = ["SPEED_START", "SPEED_END", "SUMMARY_START", "SUMMARY_END", "latest_run", "load_speed_run",
           "newest_per_model", "speed_markdown", "speed_summary_markdown", "build_speed_report", "timed_reduction"]

SPEED_START, SPEED_END = "<!-- speed:start -->", "<!-- speed:end -->"
SUMMARY_START, SUMMARY_END = "<!-- speed-summary:start -->", "<!-- speed-summary:end -->"
_GOAL = 0.85  # speedup / executed-FLOPs reduction the table marks


def _runs(out_dir: str | os.PathLike) -> list[Path]:
    runs = sorted((p for p in (Path(out_dir) / "runs").glob("*") if (p / "manifest.json").is_file()),
                  key=lambda p: p.name)
    if not runs:
        raise ConfigError(f"no speed runs under {str(Path(out_dir) / 'runs')!r}; run `trimkit bench --speed` first")
    return runs


def latest_run(out_dir: str | os.PathLike) -> Path:
    """The newest run folder under ``<out_dir>/runs`` that has a manifest."""
    return _runs(out_dir)[-1]


def load_speed_run(run_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``(manifest, records)`` of one run folder, records in the manifest's order."""
    root = Path(run_dir)
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        records = [json.loads((root / name).read_text(encoding="utf-8")) for name in manifest["files"]]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot read speed run {str(root)!r}: {err}") from None
    return manifest, records


def _model_key(r: dict) -> tuple:
    """A model as the tables tell them apart: its name and depth."""
    return r["model"]["name"], r["model"].get("layers") or 0


def _key(r: dict) -> tuple:
    return *_model_key(r), r["method"], r.get("target_reduction")


def newest_per_model(out_dir: str | os.PathLike) -> list[tuple[dict, list[dict]]]:
    """For each variant (model and its depth, method, target), its record from the newest run that measured it:
    ``[(manifest, records)]``, oldest run first (variants run in separate processes make one table)."""
    chosen: dict[tuple, tuple[dict, dict]] = {}
    for run in _runs(out_dir):
        manifest, records = load_speed_run(run)
        for r in records:
            chosen[_key(r)] = (manifest, r)
    by_run: dict[str, tuple[dict, list[dict]]] = {}
    for manifest, r in chosen.values():
        by_run.setdefault(manifest["run_id"], (manifest, []))[1].append(r)
    return [by_run[k] for k in sorted(by_run)]


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _mark(eff: float | None) -> str:
    return "–" if eff is None else f"**{eff:.3f}**" if eff < _GOAL else f"{eff:.3f}"


def timed_reduction(rec: dict, batch: int) -> float | None:
    """The executed-FLOPs reduction of exactly the inputs timed at `batch`: at batch 1 the first
    measured row (the one timed), at a larger batch the whole padded batch when it was counted;
    otherwise the per-sample mean."""
    flops = rec.get("flops", {})
    if batch == 1 and flops.get("per_row_reduction"):
        return flops["per_row_reduction"][0]
    padded = flops.get("padded_batch")
    if batch > 1 and padded and padded.get("batch") == batch:
        return padded["reduction"]
    return flops.get("reduction")


def _over_timed(rec: dict, batch: int) -> float | None:
    """Speedup at `batch` over :func:`timed_reduction` (None where either is missing)."""
    got, timed = rec.get("latency", {}).get(f"batch_{batch}"), timed_reduction(rec, batch)
    return got["speedup"] / timed if got and timed else None


def _batches(runs: list[tuple[dict, list[dict]]]) -> list[int]:
    """The batch sizes any of `runs` timed, ascending."""
    return sorted({b for manifest, _ in runs for b in manifest["config"]["batches"]})


def _cell(rec: dict, batch: int) -> tuple[str, str, str]:
    got = rec.get("latency", {}).get(f"batch_{batch}")
    if got is None:
        return "–", "–", "–"
    return f"{got['speedup']:.2f}x", _mark(got["speedup_over_reduction"]), _mark(_over_timed(rec, batch))


def _model_label(rec: dict) -> str:
    m = rec["model"]
    if m.get("tiny"):
        return f"{m['name']} (tiny)"
    return f"{m['name']} ({m['layers']}/{m['full_layers']} layers)"


def _run_note(manifest: dict) -> str:
    env, cfg = manifest["environment"], manifest["config"]
    state = "" if manifest.get("status") == "complete" else f" ({manifest.get('status', '?')}: stopped before the end)"
    return (f"- run `{manifest['run_id']}`{state}: `{manifest.get('command') or 'trimkit bench --speed'}`; "
            f"{env['threads']} thread, torch {env['torch']}, transformers {env['transformers']}, git "
            f"{str(env.get('git_revision', '?'))[:12]}, load average at start {env.get('load_average')}; "
            f"timing rounds {cfg['rounds']} at batches {cfg['batches']}; FLOPs over {cfg['flops_rows']} rows; "
            f"SmartTrim decisions {cfg.get('decisions', 'raw')}")


def _row(r: dict, batches: list[int], padded: bool) -> str:
    row = [_model_label(r), r["method"], f"{r['target_reduction']:g}x", f"{r['flops']['reduction']:.2f}x"]
    for b in batches:
        row += list(_cell(r, b))
    if padded:
        pad = r["flops"].get("padded_batch")
        row.append(_num(pad and pad["reduction"], "{:.2f}x"))
    return "| " + " | ".join(row) + " |"


def speed_markdown(runs: list[tuple[dict, list[dict]]]) -> str:
    """One table (a row per model, method and target) from ``[(manifest, records)]``, and its notes."""
    batches = _batches(runs)
    order = {"smarttrim": 0, "random.tokens": 1, "topk.cls_attention": 2, "tome.merge": 3}
    records = sorted((r for _, recs in runs for r in recs),
                     key=lambda r: (*_model_key(r), order.get(r["method"], 9), r.get("target_reduction") or 0))
    head = ["model", "method", "target", "FLOPs reduction"]
    for b in batches:
        head += [f"speedup b{b}", f"÷ mean reduction b{b}", f"÷ timed reduction b{b}"]
    padded = any("padded_batch" in r.get("flops", {}) for r in records)
    if padded:
        head.append("padded-batch FLOPs reduction")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_row(r, batches, padded) for r in records if r["status"] == "ok" and "flops" in r]
    notes = ["", "Speedup: median latency of a clean copy of the model over the trimmed model's, interleaved "
             "in one process, one thread. FLOPs reduction: executed FLOPs per sample (profiler), each measured "
             f"row run alone. ÷ mean reduction: speedup / that per-sample reduction. ÷ timed reduction: speedup / the "
             "executed-FLOPs reduction of exactly the inputs timed (batch 1: the timed row, counted alone; the "
             "large batch: the whole padded batch), the measure the 0.85 goal is judged on; the two differ where "
             f"rows keep different amounts (**bold**: below {_GOAL}). Padded-batch: SmartTrim's executed FLOPs of "
             "the whole largest batch, rows padded to the longest kept row.", ""]
    notes += [_run_note(m) for m, _ in runs]
    for r in records:
        if r["status"] != "ok" or "flops" not in r:
            notes.append(f"- failed: {r['model']['name']} {r['method']} {r.get('target_reduction', '')}: "
                         f"{r.get('error', 'no FLOPs measured')}")
    return "\n".join(lines + notes) + "\n"


def speed_summary_markdown(runs: list[tuple[dict, list[dict]]]) -> str:
    """SmartTrim's rows only, one per model and target: its speedup over the executed-FLOPs
    reduction of the inputs timed at each batch, beside the best and worst baseline's at the same
    target (the full table has every figure)."""
    batches = _batches(runs)
    ok = [r for _, recs in runs for r in recs if r["status"] == "ok" and "flops" in r]
    head = ["model", "target", "SmartTrim FLOPs reduction"]
    for b in batches:
        head += [f"SmartTrim speedup b{b} (÷ timed reduction)", f"baselines ÷ timed reduction b{b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted((r for r in ok if r["method"] == "smarttrim"),
                    key=lambda r: (*_model_key(r), r.get("target_reduction") or 0)):
        row = [_model_label(r), f"{r['target_reduction']:g}x", f"{r['flops']['reduction']:.2f}x"]
        others = [o for o in ok if o["method"] != "smarttrim" and _model_key(o) == _model_key(r)
                  and o.get("target_reduction") == r.get("target_reduction")]
        for b in batches:
            got = r.get("latency", {}).get(f"batch_{b}")
            row.append("–" if got is None else f"{got['speedup']:.2f}x ({_mark(_over_timed(r, b))})")
            vals = [v for v in (_over_timed(o, b) for o in others) if v is not None]
            row.append(f"{min(vals):.3f}-{max(vals):.3f}" if vals else "–")
        lines.append("| " + " | ".join(row) + " |")
    runs_ids = ", ".join(f"`{m['run_id']}`" for m, _ in runs)
    return "\n".join(lines) + (f"\n\n**Bold**: below {_GOAL}. Run(s) {runs_ids}; every figure, the per-sample "
                                "ratios and the padded-batch reductions: "
                                "[benchmarks/README.md](benchmarks/README.md#speed-at-published-base-sizes-trimkit-bench---speed).\n")


def build_speed_report(out_dir: str | os.PathLike, *, readme: str | os.PathLike | None = None,
                       summary: str | os.PathLike | None = None) -> dict:
    """The table of the newest run of each model under `out_dir` (:func:`newest_per_model`), written
    to ``<out_dir>/speed.md`` and, with `readme`, between the speed markers there; with `summary`,
    SmartTrim's rows (:func:`speed_summary_markdown`) between the summary markers of that file;
    ``{"runs": [run ids], "markdown": str, "summary": str}``."""
    runs = newest_per_model(out_dir)
    text = speed_markdown(runs)
    used = {m["run_id"] for m, _ in runs}
    others = [load_speed_run(r)[0] for r in _runs(out_dir) if r.name not in used]
    if others:
        text += "\nOther runs kept in `runs/` (not in the table): " + "; ".join(
            f"`{m['run_id']}` ({m.get('status', '?')}{': ' + m['note'] if m.get('note') else ''})" for m in others) + "\n"
    Path(out_dir, "speed.md").write_text(text, encoding="utf-8")
    if readme is not None:
        update_readme(readme, text, start=SPEED_START, end=SPEED_END)
    brief = speed_summary_markdown(runs)
    if summary is not None:
        update_readme(summary, brief, start=SUMMARY_START, end=SUMMARY_END)
    return {"runs": [m["run_id"] for m, _ in runs], "markdown": text, "summary": brief}
