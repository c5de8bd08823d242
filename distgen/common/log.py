"""distgen's own lines: one `distgen` logger hierarchy (each module logs to `logging.getLogger(__name__)`), one
handler, installed by whoever owns the process.

Where a line goes: debug and info to stdout, warnings and errors to stderr (the streams are looked up at each
line, so a redirect or pytest's capture sees them). What it reads like, one rule: a rank of a job of several ranks
names itself on every line, rank 0 included, `distgen[rank 1]: message`; the launcher's lines and those of a
one-rank job read `distgen: message`. A message of several lines (the table, a traceback) has the prefix on each.

Who installs the handler: the command lines (`python -m distgen.launch`, `python -m distgen.run`, the launcher's
watchdog) own their process: `configure` puts distgen's handler on the `distgen` logger (not the root logger) with
propagation off, as transformers and vLLM do for theirs, and sets output.log_level. `distgen.generate` runs inside
a host application: `for_api` adds distgen's handler (for the call only) where the host has configured no
logging, and otherwise adds nothing and sets no level: distgen's records propagate to the host's handlers at the
levels the host chose (the library convention). Third-party libraries' own output is left as they print it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Callable, Iterator, Optional

from distgen.common.registry import Registry

ROOT = "distgen"
# The coordinator's closing lines (the table, `wrote N records to ...`): a logger of their own, so a launcher that
# relays them from a rank (Ray's driver) takes them apart from the live lines.
REPORT = "distgen.report"

# output.log_level: the lowest level shown. Results are info lines too: --quiet (warning) hides the table and the
# `wrote N records` line, as vLLM's VLLM_LOGGING_LEVEL=WARNING hides its run-batch lines; stats.json, report.html
# and the exit status say how the job went.
LOG_LEVELS: Registry[int] = Registry("output.log_level", valued=True)
LOG_LEVELS.register("debug", None, logging.DEBUG, doc="info, and each rank's engine line")
LOG_LEVELS.register("info", None, logging.INFO,
                    doc="progress, the engine, resuming, the table and `wrote N records` (the default)")
LOG_LEVELS.register("warning", None, logging.WARNING,
                    doc="only warnings (refusals, fallbacks, error records) and errors: --quiet")
LOG_LEVELS.register("error", None, logging.ERROR, doc="only errors")


def prefix(rank: Optional[int] = None, world_size: int = 1) -> str:
    """`distgen[rank N]: ` for a rank of a job of several ranks; `distgen: ` otherwise."""
    return f"{ROOT}[rank {rank}]: " if rank is not None and world_size > 1 else f"{ROOT}: "


class LineFormatter(logging.Formatter):
    """The message (with its traceback, if any), each of its lines prefixed."""

    def __init__(self) -> None:
        super().__init__("%(message)s")
        self.prefix = prefix()

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.prefix + line for line in super().format(record).split("\n"))


class SplitHandler(logging.Handler):
    """Below WARNING to stdout, from WARNING on to stderr, each line flushed. A stream that cannot take a line any
    more (the terminal gone after a hangup: EIO) loses it quietly: the exit the line is about goes on."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with contextlib.suppress(OSError, ValueError):
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(text)
            stream.flush()


FORMAT = LineFormatter()
HANDLER = SplitHandler()
HANDLER.setFormatter(FORMAT)
# The process's owner: "cli" once a command line configured it, "host" while distgen.generate runs inside a host
# application that configured logging itself (then configure() changes nothing).
STATE: dict[str, Optional[str]] = {"owner": None}


def name_rank(rank: Optional[int], world_size: int) -> None:
    """From now on each line names `rank` (when the job has several ranks)."""
    FORMAT.prefix = prefix(rank, world_size)


def configure(level: Optional[str] = None) -> None:
    """A command line's logging: distgen's handler on the `distgen` logger (once), no propagation to the root
    logger, and `level` (output.log_level; None keeps the level set so far, info at first). Nothing changes
    while distgen.generate runs in a host application that configured logging itself."""
    if STATE["owner"] == "host":
        return
    logger = logging.getLogger(ROOT)
    if HANDLER not in logger.handlers:
        logger.addHandler(HANDLER)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        STATE["owner"] = "cli"
    if level is not None:
        logger.setLevel(LOG_LEVELS.get(level))


def unconfigure() -> None:
    """Back to no distgen handler, no level, the plain prefix (tests; the end of a distgen.generate call)."""
    logger = logging.getLogger(ROOT)
    logger.removeHandler(HANDLER)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    name_rank(None, 1)
    STATE["owner"] = None


def host_configured() -> bool:
    """The host application has a handler on the root logger or on distgen's (distgen's own aside)."""
    return bool(logging.getLogger().handlers) or any(h is not HANDLER for h in logging.getLogger(ROOT).handlers)


@contextlib.contextmanager
def for_api() -> Iterator[None]:
    """Around a distgen.generate call: where the host configured logging, distgen adds no handler and sets no
    level (its records propagate to the host's handlers, at the host's levels); where it did not, distgen's handler
    shows the job's lines during the call (`configure` sets output.log_level) and is gone after it. Where a command
    line configured this process, it stays as it is."""
    if STATE["owner"] == "cli":
        yield
        return
    hosted = host_configured()
    if hosted:
        STATE["owner"] = "host"
    else:
        configure()
    try:
        yield
    finally:
        if hosted:
            STATE["owner"] = None
        else:
            unconfigure()


@contextlib.contextmanager
def captured(name: str = REPORT) -> Iterator[io.StringIO]:
    """Inside: the lines of logger `name` (formatted as distgen's handler would) go to the StringIO yielded, not to
    the terminal (a rank whose report another process relays)."""
    logger, text = logging.getLogger(name), io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(FORMAT)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield text
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def exit_status(main: Callable[[], int], who: str) -> int:
    """`main()`'s exit status. An exception it raises is an error line naming `who` with its traceback below (each
    line prefixed like the others), and status 1, as Python's own report of it would be."""
    try:
        return main()
    except BrokenPipeError:  # stdout's reader left (`--help | head`): no traceback, the status a SIGPIPE gives
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit's flush of stdout would raise again
        return 128 + 13
    except Exception:
        logging.getLogger(ROOT).exception("%s stopped on an error:", who)
        return 1
