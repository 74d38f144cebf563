"""What the command line shows: ``-q`` errors and the final table, the default our own progress
lines and warnings, ``-v`` Ray's INFO logs and Ray Data's progress bars as well. Call
``configure`` before Ray starts (the environment variables reach local workers only if set
before ``ray.init``)."""
from __future__ import annotations

import logging
import os
import tempfile

QUIET, NORMAL, VERBOSE = -1, 0, 1
_verbosity = NORMAL

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
    root = logging.getLogger()
    if not any(isinstance(f, RandomInitNoise) for f in root.filters):
        root.addFilter(RandomInitNoise())  # open_clip logs on the root logger
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


def ray_data_settings() -> None:
    """Ray Data's progress bars only with ``-v`` (call in the driver once Ray Data is imported)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = _verbosity >= VERBOSE
