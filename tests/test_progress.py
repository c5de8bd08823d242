import io

from distgen.progress import ProgressLog


def test_prints_only_once_each_interval():
    now = [0.0]
    out = io.StringIO()
    log = ProgressLog(rank=1, total_prompts=10, every_s=5, clock=lambda: now[0], out=out)
    for t, prompts in [(1, 2), (6, 2), (7, 2), (12, 4)]:
        now[0] = t
        log.finished(prompts, tokens=10 * prompts)
    assert out.getvalue().splitlines() == [
        "distgen: rank 1: 4/10 prompts, 40 tokens, 6s, 6.7 tok/s",
        "distgen: rank 1: 10/10 prompts, 100 tokens, 12s, 8.3 tok/s",
    ]


def test_zero_interval_is_silent():
    out = io.StringIO()
    log = ProgressLog(rank=0, total_prompts=1, every_s=0, clock=lambda: 100.0, out=out)
    log.finished(1, 5)
    assert out.getvalue() == ""
