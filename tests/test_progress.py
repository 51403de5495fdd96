"""trimkit.progress: plain lines in a log, rich on a terminal, nothing when disabled; stdout stays clean."""
import io

import pytest

from trimkit.progress import due, plain_line, progress


def test_plain_line_parts():
    assert plain_line("step", 40, 200, "loss 1.234  ratio 0.61", 3.14) == "step 40/200  loss 1.234  ratio 0.61  3.1 it/s"
    assert plain_line("counting FLOPs", 3, 8) == "counting FLOPs 3/8"
    assert plain_line("latency", 1, 2, rate=0.25) == "latency 1/2  4.0 s/it"


@pytest.mark.parametrize("before, after, total, expected", [
    (0, 1, 200, False), (19, 20, 200, True), (20, 21, 200, False), (199, 200, 200, True),
    (0, 1, 2, True), (0, 1, 0, False), (3, 7, 100, False), (9, 11, 100, True),
])
def test_due_at_every_tenth(before, after, total, expected):
    assert due(before, after, total) is expected


def test_marks_over_a_run():
    marks = [n for n in range(1, 201) if due(n - 1, n, 200)]
    assert marks == list(range(20, 201, 20))


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _run(monkeypatch, tty: bool, enabled: bool, total: int = 50) -> tuple[str, str]:
    err, out = _Stream(tty), _Stream(tty)
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    with progress(enabled) as bar:
        task = bar.add("step", total)
        for i in range(total):
            bar.advance(task, info=f"loss {i:.3f}")
    return out.getvalue(), err.getvalue()


def test_log_gets_plain_periodic_lines(monkeypatch):
    out, err = _run(monkeypatch, tty=False, enabled=True)
    lines = err.splitlines()
    assert out == ""
    assert lines[0] == "step 0/50"
    assert [line.split("  ")[0] for line in lines[1:]] == [f"step {n}/50" for n in range(5, 51, 5)]
    assert lines[-1].startswith("step 50/50  loss 49.000  ") and lines[-1].endswith(" it/s")
    assert "\r" not in err and "\x1b" not in err


def test_disabled_prints_nothing(monkeypatch):
    assert _run(monkeypatch, tty=False, enabled=False) == ("", "")
    assert _run(monkeypatch, tty=True, enabled=False) == ("", "")


def test_terminal_gets_a_bar_on_stderr(monkeypatch):
    out, err = _run(monkeypatch, tty=True, enabled=True)
    assert out == ""
    assert "50/50" in err and "step 5/50" not in err
