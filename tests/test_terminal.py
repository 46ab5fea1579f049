"""The sweep's terminal: the live table, the plain lines off a terminal, the FLOP-weighted ETA, and a point's
output caught in its own log file (a real sweep's calm output is checked in test_sweep.py)."""
import io
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.recipe import RunSpec
from pipeline.sweep.point_logs import point_log
from pipeline.sweep.progress import DONE, FAILED, PENDING, RUNNING, SKIPPED, SweepBoard, SweepProgress, format_duration

STEP_LINE = re.compile(r"step \d+/\d+")


def spec(family: str = "arm", shape: str = "cpu-26k", budget: float = 1e10) -> RunSpec:
    return RunSpec(family=family, shape=shape, budget=budget)


def window(step: int, steps: int = 100, loss: float = 3.21, tokens_per_step: int = 256, rate: float = 12_000.0) -> dict:
    """What a trial reports to Tune after a log window (pipeline.sweep.trial.SweepReporter)."""
    return {"step": step, "steps": steps, "loss": loss, "tokens": step * tokens_per_step, "tokens_per_s": rate}


def test_flop_weighted_eta():
    """FLOPs left over FLOPs done per second so far; failed and skipped points leave nothing to do."""
    specs = [spec(budget=b) for b in (1e10, 3e10, 6e10, 2e10, 5e10)]
    board = SweepBoard.of("eta", specs)
    assert board.eta_s(board.started + 100) is None  # nothing done yet: no rate
    done, running, pending, failed, skipped = (board.points[s.run_hash] for s in specs)
    done.update({**window(100), "status": "finished"})
    running.update(window(30, steps=90))             # a third of its 3e10
    failed.update({**window(50), "status": "errored"})   # half of its 2e10 was computed, then it failed
    skipped.update({"status": "skipped"})              # finished by another sweep: no work here
    assert [p.state for p in (done, running, pending, failed, skipped)] == [DONE, RUNNING, PENDING, FAILED, SKIPPED]
    flops_done = 1e10 + 3e10 / 3 + 2e10 / 2
    flops_left = 3e10 * 2 / 3 + 6e10
    assert board.eta_s(board.started + 100) == pytest.approx(flops_left / (flops_done / 100))
    board.first_start = board.started + 20  # Ray took 20 s to start the first point: the rate leaves them out
    assert board.eta_s(board.started + 100) == pytest.approx(flops_left / (flops_done / 80))
    running.update({**window(90, steps=90), "status": "finished"})
    pending.update({**window(100), "status": "finished"})
    assert board.eta_s(board.started + 250) == 0.0
    assert board.counts() == {DONE: 3, RUNNING: 0, PENDING: 0, FAILED: 1, SKIPPED: 1}
    nothing_done = SweepBoard.of("failed", specs[:1])
    nothing_done.points[specs[0].run_hash].update({"status": "errored"})
    assert nothing_done.eta_s(nothing_done.started + 10) == 0.0  # nothing left to do, though nothing was done


def test_table_shows_each_running_point_and_the_sweep_tally():
    specs = [spec("arm", "cpu-26k", 1e10), spec("mdm", "cpu-51k", 3e10), spec("arm", "cpu-51k", 1e10), spec("mdm", "cpu-26k", 1e10)]
    board = SweepBoard.of("demo", specs)
    board.points[specs[0].run_hash].update(window(50, loss=3.2109, rate=12_800.0))
    board.points[specs[1].run_hash].state = RUNNING  # started, no log window yet
    board.points[specs[2].run_hash].update({"status": "finished"})
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(board.table(board.started + 75))
    lines = console.file.getvalue().splitlines()
    assert lines[0].startswith("sweep demo: 1 done, 2 running, 1 pending, 0 failed | 1m15s elapsed | ETA ")
    assert lines[1].split() == ["family", "shape", "budget", "step", "loss", "tokens/s", "ETA"]
    eta = format_duration((100 - 50) * 256 / 12_800.0)  # the point's steps left at its last window's rate
    assert lines[2].split() == ["arm", "cpu-26k", "1e+10", "50/100", "3.2109", "12,800", eta]
    assert lines[3].split() == ["mdm", "cpu-51k", "3e+10", "starting", "?"]
    assert len(lines) == 4 and max(map(len, lines)) <= 120  # finished and pending points have no row


def test_durations():
    assert [format_duration(s) for s in (None, 4.4, 59.6, 185, 7440, 266_400)] == ["?", "4s", "1m00s", "3m05s",
                                                                                    "2h04m", "3d02h"]


@dataclass
class Trial:
    """The part of a Tune trial the callback reads."""
    spec: RunSpec
    last_result: dict = field(default_factory=dict)

    @property
    def trial_id(self) -> str:
        return self.spec.run_hash

    @property
    def config(self) -> dict:
        return {"spec": self.spec.to_dict()}

    error_file: str | None = None  # Tune's error.txt in the trial's folder


def test_plain_lines_off_a_terminal(tmp_path, capsys):
    """Not a terminal: a `[sweep]` line at most every `plain_every` seconds and at the end, and the log file's
    path for a point that fails; no table."""
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1\nTraceback (most recent call last):\n  ...\nValueError: a bad point\n\n")
    a, b = Trial(spec(budget=1e10)), Trial(spec(budget=2e10), error_file=str(error))
    board = SweepBoard.of("plain", [a.spec, b.spec])
    progress = SweepProgress(board, tmp_path, console=Console(file=io.StringIO()), plain_every=0.2)
    progress.setup()
    assert progress.live is None
    for trial in (a, b):
        progress.on_trial_start(0, [a, b], trial)
    progress.on_step_end(0, [a, b])
    progress.on_trial_result(0, [a, b], a, window(10))
    progress.on_step_end(1, [a, b])  # too soon for another line
    time.sleep(0.25)
    progress.on_step_end(2, [a, b])
    progress.on_trial_error(3, [a, b], b)
    a.last_result = {"status": "finished"}
    progress.on_trial_complete(4, [a, b], a)
    progress.on_experiment_end([a, b])
    progress.stop()  # once only
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[sweep] 0 done, 2 running, 0 pending, 0 failed") and "ETA after the first" in lines[0]
    assert lines[1].startswith("[sweep] 0 done, 2 running, 0 pending, 0 failed") and "ETA after the first" not in lines[1]
    log = point_log(tmp_path, b.spec.run_name)
    assert lines[2] == f"failed: {b.spec.run_name} (errored: ValueError: a bad point); its log: {log}"
    assert lines[3].startswith("[sweep] 0 done, 1 running, 0 pending, 1 failed")
    assert lines[4].startswith("[sweep] 1 done, 0 running, 0 pending, 1 failed")
    assert len(lines) == 5 and not any("family" in line for line in lines)


def test_live_table_on_a_terminal(tmp_path):
    a, b = Trial(spec(budget=1e10)), Trial(spec("mdm", budget=4e10))
    board = SweepBoard.of("tty", [a.spec, b.spec])
    screen = Console(file=io.StringIO(), width=120, force_terminal=True, color_system=None)
    progress = SweepProgress(board, tmp_path, console=screen, draw_every=0.0)
    progress.setup()
    assert progress.live is not None
    for trial in (a, b):
        progress.on_trial_start(0, [a, b], trial)
    progress.on_trial_result(0, [a, b], b, window(40, steps=400))
    progress.on_step_end(1, [a, b])
    b.last_result = {"status": "diverged"}
    progress.on_trial_complete(2, [a, b], b)
    progress.on_experiment_end([a, b])
    out = screen.file.getvalue()
    assert "40/400" in out and "sweep tty: 0 done, 2 running" in out
    assert f"failed: {b.spec.run_name} (diverged); its log: {point_log(tmp_path, b.spec.run_name)}" in out
    assert "[sweep]" not in out


def test_output_to_a_file_catches_prints_and_tracebacks(tmp_path):
    """In a process of its own, as a trial is: what it prints, C-level writes included, lands in the file."""
    log = tmp_path / "logs" / "point.log"
    script = f"""
import os
from pipeline.sweep.point_logs import output_to
try:
    with output_to({str(log)!r}):
        print("step 1/2 | a step line")
        os.write(2, b"from below Python\\n")
        raise ValueError("the point broke")
except ValueError:
    pass
print("back on the terminal")
with output_to({str(log)!r}):  # a retried point appends
    print("step 2/2")
"""
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and proc.stdout == "back on the terminal\n" and proc.stderr == "", proc.stderr
    text = log.read_text()
    assert "step 1/2 | a step line\nfrom below Python\n" in text and "ValueError: the point broke" in text
    assert text.endswith("step 2/2\n")


def test_windows_reach_tune_at_most_every_few_seconds(monkeypatch):
    """A one-rank run reports its first window at once, then none until REPORT_EVERY_SECONDS have passed."""
    from pipeline.sweep import trial

    sent = []
    reporter = trial.SweepReporter(None, sent.append, world=1)
    monkeypatch.setattr(trial, "REPORT_EVERY_SECONDS", 0.2)
    for step in (5, 10, 15):
        reporter.progress({"step": step, "loss": 3.0, "tokens": step * 256, "tokens_per_s": 1e4, "lr": 1e-3}, 100)
    time.sleep(0.25)
    reporter.progress({"step": 20, "loss": 2.9, "tokens": 20 * 256, "tokens_per_s": 1e4, "lr": 1e-3}, 100)
    assert sent == [{"step": 5, "loss": 3.0, "tokens": 1280, "tokens_per_s": 1e4, "steps": 100},
                    {"step": 20, "loss": 2.9, "tokens": 5120, "tokens_per_s": 1e4, "steps": 100}]
