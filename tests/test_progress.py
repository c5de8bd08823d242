import io
import logging
from types import SimpleNamespace

from distgen.outputs.progress import LiveCounters, ProgressDisplay, RankSampler, progress_line


def test_plain_lines_once_each_interval_with_rate_and_eta():
    now, lines = [0.0], []
    display = ProgressDisplay(total_prompts=10, every_s=5, clock=lambda: now[0], terminal=False, say=lines.append)
    for t, prompts in [(1, 2), (6, 4), (7, 6), (12, 10)]:
        now[0] = t
        display.update(prompts, tokens=10 * prompts)
    assert lines == [
        "4/10 prompts (40.0%), 40 tokens generated, 6.7 generated tok/s (wall), 6s elapsed, ETA 0m09s",
        "10/10 prompts (100.0%), 100 tokens generated, 8.3 generated tok/s (wall), 12s elapsed, ETA -",
    ]


def test_progress_lines_are_info_lines_on_stdout(capsys):
    ProgressDisplay(total_prompts=2, every_s=1e-9, terminal=False).update(2, 8, final=True)
    out, err = capsys.readouterr()
    assert out.startswith("distgen: 2/2 prompts (100.0%), 8 tokens generated") and err == ""


def test_zero_interval_is_silent(capsys):
    ProgressDisplay(total_prompts=1, every_s=0, clock=lambda: 100.0, terminal=False).update(1, 5, final=True)
    assert capsys.readouterr() == ("", "")


def test_terminal_gets_one_bar():
    out = io.StringIO()
    display = ProgressDisplay(total_prompts=4, every_s=0, out=out, terminal=True)
    display.update(2, 20)
    display.update(4, 40, final=True)
    assert "4/4" in out.getvalue() and "40 tok" in out.getvalue()


def test_quiet_shows_no_bar(capsys):
    logging.getLogger("distgen").setLevel(logging.WARNING)
    out = io.StringIO()
    display = ProgressDisplay(total_prompts=4, every_s=0, out=out, terminal=True)
    display.update(4, 40, final=True)
    assert out.getvalue() == "" and capsys.readouterr() == ("", "")


def test_rank_zero_shows_the_sum_of_every_rank(tmp_path):
    lines = []
    display = ProgressDisplay(total_prompts=10, every_s=1e-9, terminal=False, say=lines.append)
    loop = SimpleNamespace(forward_steps=3, idle_steps=1)
    cpu = SimpleNamespace(type="cpu")
    other = RankSampler(1, 60, tmp_path, LiveCounters(4, 10, 40), loop, cpu)
    other.sample()
    mine = RankSampler(0, 60, tmp_path, LiveCounters(5, 10, 50), loop, cpu, display)
    mine.sample()
    mine.show()
    assert "9/10 prompts" in lines[-1] and "90 tokens" in lines[-1]
    assert mine.samples[0].rss_mib > 0 and mine.samples[0].forward_steps == 3


def test_eta_formats_hours():
    assert "ETA 2h00m" in progress_line(1, 3, 0, 3600)
    assert progress_line(3, 4, 0, 1.0, "records").startswith("3/4 records (75.0%)")  # n samples per prompt
