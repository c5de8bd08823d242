import io
from types import SimpleNamespace

from distgen.outputs.progress import LiveCounters, ProgressDisplay, RankSampler, progress_line


def test_plain_lines_once_each_interval_with_rate_and_eta():
    now = [0.0]
    out = io.StringIO()
    display = ProgressDisplay(total_prompts=10, every_s=5, out=out, clock=lambda: now[0], terminal=False)
    for t, prompts in [(1, 2), (6, 4), (7, 6), (12, 10)]:
        now[0] = t
        display.update(prompts, tokens=10 * prompts)
    assert out.getvalue().splitlines() == [
        "distgen: 4/10 prompts (40.0%), 40 tokens generated, 6.7 generated tok/s (wall), 6s elapsed, ETA 0m09s",
        "distgen: 10/10 prompts (100.0%), 100 tokens generated, 8.3 generated tok/s (wall), 12s elapsed, ETA -",
    ]


def test_zero_interval_is_silent():
    out = io.StringIO()
    ProgressDisplay(total_prompts=1, every_s=0, out=out, clock=lambda: 100.0, terminal=False).update(1, 5, final=True)
    assert out.getvalue() == ""


def test_terminal_gets_one_bar():
    out = io.StringIO()
    display = ProgressDisplay(total_prompts=4, every_s=0, out=out, terminal=True)
    display.update(2, 20)
    display.update(4, 40, final=True)
    assert "4/4" in out.getvalue() and "40 tok" in out.getvalue()


def test_rank_zero_shows_the_sum_of_every_rank(tmp_path):
    out = io.StringIO()
    display = ProgressDisplay(total_prompts=10, every_s=1e-9, out=out, terminal=False)
    loop = SimpleNamespace(forward_steps=3, idle_steps=1)
    cpu = SimpleNamespace(type="cpu")
    other = RankSampler(1, 60, tmp_path, LiveCounters(4, 10, 40), loop, cpu)
    other.sample()
    mine = RankSampler(0, 60, tmp_path, LiveCounters(5, 10, 50), loop, cpu, display)
    mine.sample()
    mine.show()
    assert "9/10 prompts" in out.getvalue() and "90 tokens" in out.getvalue()
    assert mine.samples[0].rss_mib > 0 and mine.samples[0].forward_steps == 3


def test_eta_formats_hours():
    assert "ETA 2h00m" in progress_line(1, 3, 0, 3600)
