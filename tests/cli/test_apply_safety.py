"""`trimkit apply`: --out is checked before any work, an old folder survives any failure, and
models it cannot trim get one line."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from trimkit.cli import cli
from trimkit.cli.apply_cmd import _eval_table, _summary_table

ROOT = Path(__file__).resolve().parents[2]
TOY = "tests/models/toy_vlms.py:two_stream"


def _invoke(*args):
    res = CliRunner().invoke(cli, list(args))
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    return res.exit_code, lines


def _old_folder(tmp_path: Path) -> Path:
    old = tmp_path / "old"
    old.mkdir()
    (old / "trimkit.json").write_text('{"trained": 200}')
    return old


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model-xyz", "--data", "synthetic:vqa"], "unknown model 'no-such-model-xyz'"),
    (["--model", TOY, "--data", "synthetic:nosuch"], "unknown synthetic task 'nosuch'"),
])
def test_a_typo_with_overwrite_deletes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old = _old_folder(tmp_path)
    before = _listing(tmp_path)
    code, lines = _invoke("apply", *args, "--out", str(old), "--overwrite")
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {message}")
    assert _listing(tmp_path) == before


def test_out_is_checked_before_the_model_is_loaded(tmp_path):
    (tmp_path / "file").write_text("x")
    code, lines = _invoke("apply", "--model", "no-such-model-xyz", "--out", str(tmp_path / "file" / "out"))
    assert code == 1
    assert lines == [f"Error: --out {str(tmp_path / 'file' / 'out')!r} cannot be written: "
                     f"{str(tmp_path / 'file')!r} is not a folder"]
    code, lines = _invoke("apply", "--model", "no-such-model-xyz", "--out", "/proc/nc-out")
    assert lines == ["Error: --out '/proc/nc-out' cannot be written (No such file or directory)"]


def test_a_foreign_folder_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    code, lines = _invoke("apply", "--model", TOY, "--out", str(tmp_path), "--overwrite", "--no-profile")
    assert code == 1
    assert lines == [f"Error: --out {str(tmp_path)!r} is not empty and is not a trimkit folder; choose another "
                     "(nothing was written)"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_ctrl_c_during_training_keeps_the_old_folder(tmp_path, monkeypatch):
    import trimkit.train

    def interrupted(*args, out_dir, **kwargs):
        (Path(out_dir) / "checkpoints").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(trimkit.train, "train", interrupted)
    old = _old_folder(tmp_path)
    before = _listing(tmp_path)
    res = CliRunner().invoke(cli, ["apply", "--model", TOY, "--data", "synthetic:vqa", "--out", str(old),
                                   "--overwrite"])
    assert res.exit_code == 130
    assert res.output.strip().splitlines()[-1] == f"Error: interrupted; {str(old)!r} was left as it was"
    assert _listing(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_nothing_to_trim_is_one_line(tmp_path):
    factory = tmp_path / "plain.py"
    factory.write_text("import torch\n\n"
                       "def mlp():\n"
                       "    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
                       "    return model, {'input': torch.randn(2, 5, 4)}\n\n"
                       "def pair():\n"
                       "    return torch.nn.Linear(4, 2), (torch.randn(2, 4),)\n")
    code, lines = _invoke("apply", "--model", f"{factory}:mlp", "--out", str(tmp_path / "o"))
    assert code == 1 and lines == [f"Error: nothing to trim: no attention site found in {factory}:mlp"]
    code, lines = _invoke("inspect", "--model", f"{factory}:mlp")
    assert code == 0 and lines[-1].endswith("nothing to trim: no attention site found")
    code, lines = _invoke("apply", "--model", f"{factory}:pair", "--out", str(tmp_path / "o"))
    assert code == 1 and lines == [
        f"Error: factory '{factory}:pair' must return a Backbone or (model, example_inputs), got (model, tuple): "
        "the example inputs must be a dict of keyword arguments, e.g. {'pixel_values': ..., 'input_ids': ...}, "
        "so that model(**inputs) runs"]
    assert not (tmp_path / "o").exists()


def _text(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_tables_show_speedups_as_before_over_after_and_no_nan():
    report = {"data": "synthetic:vqa", "items": 8, "metric": {"name": "accuracy", "value": 0.5},
              "metric_untrimmed": {"name": "accuracy", "value": float("nan")},
              "flops": {"mean": 50.0}, "flops_untrimmed": {"mean": 100.0}, "flops_ratio": 0.5,
              "latency_ratio": {"batch_1": 0.8, "batch_8": None},
              "latency_ms": {"batch_1": {"trimmed": 8.0, "untrimmed": 10.0}}}
    text = _text(_eval_table(report))
    assert "nan" not in text.lower() and "batch 8" not in text and "speedup = before / after (> 1 is faster)" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if line.startswith("│")}
    assert rows["accuracy"] == ["-", "0.5000", ""]
    assert rows["FLOPs / sample (mean)"] == ["100", "50", "2.000x"]
    assert rows["latency batch 1 (ms)"] == ["10.000", "8.000", "1.250x"]

    profile = {"before": {"flops": {"mean": 100.0}, "params": 10, "latency_ms": {"batch_1": 4.0, "batch_8": None}},
               "after": {"flops": {"mean": 25.0}, "params": 12, "latency_ms": {"batch_1": 2.0}},
               "speedup": {"flops": 4.0, "latency_batch_1": 2.0, "latency_batch_8": None}}
    text = _text(_summary_table(profile))
    assert "nan" not in text.lower() and "speedup = before / after (> 1 is faster)" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if line.startswith("│")}
    assert rows["FLOPs (mean)"] == ["100", "25", "4.000x"]
    assert rows["latency batch 1 (ms)"] == ["4.000", "2.000", "2.000x"]
    assert rows["latency batch 8 (ms)"] == ["-", "-", "-"]
