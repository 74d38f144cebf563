"""What the command line shows: ``-q`` errors and the final table, the default our own progress
(a bar on a terminal, a status line every few seconds elsewhere) and warnings, ``-v`` Ray's
INFO logs and Ray Data's progress bars as well. Call ``configure`` before Ray starts (the
environment variables reach local workers only if set before ``ray.init``)."""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TextIO

QUIET, NORMAL, VERBOSE = -1, 0, 1
_verbosity = NORMAL
VERBOSITY_ENV = "FRANKENSOUP_VERBOSITY"
MIN_RATE_SECONDS = 1.0

# Ray Data's logging config (its default, console level changed): the file log keeps DEBUG
_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {{format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}}
filters:
  console_filter: {{"()": ray.data._internal.logging.HiddenRecordFilter}}
  not_ours: {{"()": pipeline.console.RayDataNoise}}
handlers:
  file: {{class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}}
  console: {{class: ray._private.log.PlainRayHandler, formatter: ray, level: {level},
            filters: [console_filter, not_ours]}}
loggers:
  ray.data: {{level: DEBUG, handlers: [file, console], propagate: false}}
"""


class RandomInitNoise(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly": we create
    models without weights on purpose (the demo base before pretraining, a tower before its
    checkpoint is loaded), so it never means what it says here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.module == "factory"
                    and str(record.msg).startswith("No pretrained weights loaded for model")
                    and str(record.msg).endswith("Model initialized randomly."))


class RayAuthNotice(logging.Filter):
    """Drops Ray's notice that token authentication is on: we keep it on, so it says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


class RayDataNoise(logging.Filter):
    """Drops the notice Ray Data logs once because we turned its progress bars off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled.")


def verbosity() -> int:
    return _verbosity


def configure(level: int = NORMAL) -> None:
    """Set the verbosity for this process and the Ray workers it starts."""
    global _verbosity
    _verbosity = level
    os.environ[VERBOSITY_ENV] = str(level)  # read by the workers this process's Ray starts
    root = logging.getLogger()
    if not any(isinstance(f, RandomInitNoise) for f in root.filters):
        root.addFilter(RandomInitNoise())  # open_clip logs on the root logger
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if level < VERBOSE and not any(isinstance(f, RayAuthNotice) for f in auth.filters):
        auth.addFilter(RayAuthNotice())
    if level < VERBOSE:
        name = "ERROR" if level <= QUIET else "WARNING"
        path = os.path.join(tempfile.gettempdir(), f"frankensoup-ray-data-logging-{name.lower()}.yaml")
        with open(path, "w") as f:
            f.write(_RAY_DATA_LOGGING.format(level=name))
        if os.path.basename(os.environ.get("RAY_DATA_LOGGING_CONFIG", path)).startswith("frankensoup-"):
            os.environ["RAY_DATA_LOGGING_CONFIG"] = path  # a config of the user's own stays
    elif os.path.basename(os.environ.get("RAY_DATA_LOGGING_CONFIG", "")).startswith("frankensoup-"):
        del os.environ["RAY_DATA_LOGGING_CONFIG"]


def ray_init_kwargs() -> dict:
    """``ray.init`` settings for this verbosity: Ray's own logger level, and whether workers'
    output is shown (with ``-q`` only the errors they raise reach the driver)."""
    level = {QUIET: logging.ERROR, NORMAL: logging.WARNING}.get(_verbosity, logging.INFO)
    return {"logging_level": level, "log_to_driver": _verbosity > QUIET}


# Ray core logs this at ERROR level, once per process, when an actor with max_restarts != 0
# gets ObjectRefs as constructor arguments (ray-project/ray#53727). Every Ray Data actor pool
# does (its map workers get the DataContext and the map function by reference, restarts on), and
# Ray Data holds those refs for the operator's whole life, so for us it never means what it says.
RESTART_NOTICE = "ray-project/ray/issues/53727"


def preempt_restart_notice() -> None:
    """In the driver, once Ray is up and unless ``-v``: spend Ray's once-per-process
    constructor-argument notice (RESTART_NOTICE) on a probe actor that is never scheduled, so a
    healthy evaluate pass prints no ERROR line. Our own actors never restart (max_restarts 0)
    and cannot trigger it. Anything else written to stderr meanwhile is passed on."""
    import ray

    if _verbosity >= VERBOSE:
        return

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nowhere = NodeAffinitySchedulingStrategy(node_id="0" * 55 + "1", soft=False)  # no node has this id

    @ray.remote(num_cpus=0, max_restarts=1, scheduling_strategy=nowhere)
    class _RestartNoticeProbe:
        def __init__(self, _ref):
            pass

    ref = ray.put(None)
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            probe = _RestartNoticeProbe.remote(ref)  # the notice is logged here, synchronously
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        del probe, ref  # out of scope before it is placed: Ray drops it without starting a worker
        captured.seek(0)
        rest = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                if RESTART_NOTICE not in line]
    if rest:
        sys.stderr.write("".join(rest))


def exit_during_cleanup_is_silent(unraisable) -> None:
    """``sys.unraisablehook`` for Ray workers. When Ray ends an actor (Tune does at each trial's
    end) it raises SystemExit in the worker; raised while a garbage-collection callback runs,
    Python can only report it as ignored, and the worker's forwarded stderr put that traceback
    ("Exception ignored in: <function WeakSet...> ... SystemExit: 1") into a healthy run's
    output. The process is exiting either way: such a SystemExit is dropped; any other
    unraisable exception is reported as Python would."""
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def quiet_worker_logs() -> None:
    """In a Ray worker: Ray Train's per-checkpoint INFO lines only with ``-v`` (the driver's
    verbosity arrives through the environment); an exit Ray raises during cleanup is not
    reported as an ignored exception (``exit_during_cleanup_is_silent``)."""
    sys.unraisablehook = exit_during_cleanup_is_silent
    if int(os.environ.get(VERBOSITY_ENV, NORMAL)) < VERBOSE:
        for name in ("ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)


def ray_data_settings() -> None:
    """Ray Data's progress bars only with ``-v`` (call in the driver once Ray Data is imported)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = _verbosity >= VERBOSE


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 2h07m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def rate_text(rate: float, unit: str) -> str:
    """Units per second, or seconds per unit when slower than one a second (as tqdm does)."""
    return f"{rate:,.1f} {unit}s/s" if rate >= 1 else f"{1 / rate:,.1f} s/{unit}"


class _LinesAroundBars:
    """Stands in for sys.stdout or sys.stderr while a bar is open: each whole line written is
    passed on with the open bars cleared first and redrawn below it, under tqdm's lock (Ray's
    log thread prints workers' lines from another thread); a partial line waits for its end.
    With no bar open it writes straight through, so a logging handler that took it as its stream
    stays correct after the bars close."""

    def __init__(self, real: TextIO):
        self.real = real
        self._pending = ""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        with tqdm.get_lock():
            if not _console.bars:
                self._flush_pending()
                self.real.write(text)
                return len(text)
            self._pending += text
            if "\n" in self._pending:
                whole, self._pending = self._pending.rsplit("\n", 1)
                _console.above_bars(self.real, whole + "\n")
        return len(text)

    def _flush_pending(self) -> None:
        if self._pending:
            self.real.write(self._pending)
            self._pending = ""

    def flush(self) -> None:
        from tqdm import tqdm

        with tqdm.get_lock():
            if not _console.bars:
                self._flush_pending()
            self.real.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, buffer, ...: the real stream's
        return getattr(self.real, name)


class _Console:
    """The one owner of the terminal while progress bars are open: from the first bar to the
    last, sys.stdout and sys.stderr (and the logging handlers that wrote to them) go through
    ``_LinesAroundBars``, so a stage line, a warning or a Ray worker's forwarded line never lands
    on a bar's line, and a bar is never drawn twice."""

    def __init__(self):
        self.bars: list = []  # open tqdm bars
        self._saved: tuple | None = None  # (stdout, stderr, [(handler, stream)])

    def open(self, bar) -> None:
        from tqdm import tqdm

        with tqdm.get_lock():
            if not self.bars:
                self._redirect()
            self.bars.append(bar)

    def close(self, bar) -> None:
        from tqdm import tqdm

        with tqdm.get_lock():
            if bar in self.bars:
                self.bars.remove(bar)
            if not self.bars:
                self._restore()

    def above_bars(self, real: TextIO, lines: str) -> None:
        """Write ``lines`` (whole lines) where the bars are, then draw the bars again below them
        (the caller holds tqdm's lock)."""
        for bar in self.bars:
            bar.clear(nolock=True)
            bar.fp.flush()
        real.write(lines)
        real.flush()
        for bar in self.bars:
            bar.refresh(nolock=True)

    def _redirect(self) -> None:
        out, err = sys.stdout, sys.stderr
        wrapped = {id(out): _LinesAroundBars(out), id(err): _LinesAroundBars(err)}
        handlers = []
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for h in getattr(logger, "handlers", []):
                if isinstance(h, logging.StreamHandler) and id(h.stream) in wrapped:
                    handlers.append((h, h.stream))
                    h.setStream(wrapped[id(h.stream)])
        self._saved = (out, err, handlers)
        sys.stdout, sys.stderr = wrapped[id(out)], wrapped[id(err)]

    def _restore(self) -> None:
        if self._saved is None:
            return
        out, err, handlers = self._saved
        self._saved = None
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _LinesAroundBars):
                stream.flush()  # a partial line left over
        sys.stdout, sys.stderr = out, err
        for h, stream in handlers:
            if isinstance(h.stream, _LinesAroundBars):  # nobody else replaced it meanwhile
                h.setStream(stream)


_console = _Console()


def real_stream(stream: TextIO) -> TextIO:
    """The terminal or file behind ``stream`` (sys.stderr may stand in for it while a bar is open)."""
    return stream.real if isinstance(stream, _LinesAroundBars) else stream


class Progress:
    """Progress of some work towards ``total`` units (``update(done)`` as it goes, ``close()``
    at the end): on a terminal a tqdm bar with rate and ETA; elsewhere (``ray job submit``
    logs, files) one status line every ``every_s`` seconds, with rate and ETA; nothing with -q.

    ``stream`` decides which (its ``isatty()``; default stderr) and takes the bar; status lines
    go to ``log``. ``clock`` is injectable so the interval can be tested without sleeping.
    The rate is the average since the helper was made."""

    def __init__(self, total: float | None, label: str, unit: str = "item", *, every_s: float = 10.0,
                 stream: TextIO | None = None, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic, bar: bool | None = None):
        self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
        self.log, self.clock = log, clock
        self.stream = real_stream(stream if stream is not None else sys.stderr)
        self.quiet = verbosity() <= QUIET
        self.start = self._last_line = clock()
        self.done = 0.0
        self._bar = None
        self._said_complete = False
        use_bar = bar if bar is not None else isatty(self.stream)
        if use_bar and not self.quiet:
            from tqdm import tqdm

            self._bar = tqdm(total=_whole(total), desc=label, unit=unit, file=self.stream, dynamic_ncols=True,
                             leave=True)
            _console.open(self._bar)

    @property
    def bar(self):
        """The tqdm bar, or None when progress goes to status lines (or nowhere)."""
        return self._bar

    def rate(self) -> float:
        """The average rate since the start; 0 (unknown) in the first second, when a rate would
        be one batch over next to no time."""
        elapsed = self.clock() - self.start
        return self.done / elapsed if elapsed >= MIN_RATE_SECONDS else 0.0

    def eta(self) -> float | None:
        """Seconds left at the average rate so far; None when that cannot be told yet."""
        if self.total is not None and self.done >= self.total:
            return 0.0
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(0.0, self.total - self.done) / rate

    def status(self, text: str | None = None, **fields) -> str:
        """The status line: ``text`` (default: done of total, then ``fields``), rate, ETA."""
        if text is None:
            of = f" of {self.total:,.0f}" if self.total is not None else ""
            pct = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
            text = " | ".join([f"{self.done:,.0f}{of} {self.unit}s{pct}",
                               *(f"{k.replace('_', ' ')} {_field(v)}" for k, v in fields.items())])
        rate, eta = self.rate(), self.eta()
        return " | ".join([f"{self.label}: {text}", *([rate_text(rate, self.unit)] if rate > 0 else []),
                           "ETA " + (duration(eta) if eta is not None else "?")])

    def update(self, done: float, total: float | None = None, *, text: str | None = None,
               force: bool = False, desc: str | None = None, **fields) -> None:
        """``done`` units so far (of ``total``, when it changed). A status line is written when
        ``every_s`` passed since the last one, when the work is complete, or with ``force``;
        ``text`` replaces its "done of total" part, ``desc`` the bar's label; ``fields`` (e.g.
        best_val=0.93) show in the bar and, without ``text``, in the line."""
        self.done = float(done)
        if total is not None:
            self.total = total
        if self.quiet:
            return
        if self._bar is not None:
            if total is not None:
                self._bar.total = _whole(total)
            if desc is not None:
                self._bar.set_description_str(desc, refresh=False)
            if fields:
                self._bar.set_postfix({k: _field(v) for k, v in fields.items()}, refresh=False)
            self._bar.update(_whole(done) - self._bar.n)
            return
        now = self.clock()
        complete = self.total is not None and self.done >= self.total and not self._said_complete
        if force or complete or now - self._last_line >= self.every_s:
            self._last_line, self._said_complete = now, self._said_complete or complete
            self.log(self.status(text, **fields))

    def close(self, note: str | None = None, finished: bool = True) -> None:
        """Ends the bar. ``finished``: the work is done, so the bar ends at what was done (its
        real total, whatever was expected); ``note`` (e.g. why it ended early) shows at its end."""
        if self._bar is None:
            return
        from tqdm import tqdm

        bar, self._bar = self._bar, None
        with tqdm.get_lock():
            if finished and bar.total != bar.n:
                bar.total = bar.n
            bar.bar_format = _fitting_format(bar, note)
            bar.close()
        _console.close(bar)


# a closed bar's formats, richest first, the note (if any) at the end: the first that fits is used
_CLOSED_FORMATS = ("{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}NOTE]",
                   "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}NOTE]",
                   "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}NOTE]",
                   "{l_bar}{bar}| {n_fmt}/{total_fmt}NOTE",
                   "{desc}: {n_fmt}/{total_fmt}NOTE")
_MIN_BAR = 4  # cells of the bar itself, below which a format does not fit


def _fitting_format(bar, note: str | None) -> str:
    """The richest of _CLOSED_FORMATS, ending in ``note``, whose line fits the terminal's width
    with a bar of at least _MIN_BAR cells, so nothing at its end is cut off."""
    width = bar.dynamic_ncols(bar.fp)[0] if callable(getattr(bar, "dynamic_ncols", None)) else bar.ncols
    ending = ", " + note.replace("{", "{{").replace("}", "}}") if note else ""
    formats = [f.replace("NOTE", ending) for f in _CLOSED_FORMATS]
    for fmt in formats:  # measured with tqdm's default bar of 10 cells
        if not width or len(bar.format_meter(**{**bar.format_dict, "bar_format": fmt, "ncols": None})) \
                <= width - _MIN_BAR + (10 if "{bar}" in fmt else 0):
            return fmt
    return formats[-1]


def isatty(stream) -> bool:
    """Whether ``stream`` is a terminal."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream: no terminal
        return False


def _whole(n: float | None) -> int | None:
    return None if n is None else math.ceil(n)


def _field(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
