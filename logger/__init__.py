"""Run logs in the format of NVIDIA's dllogger JSON stream, as the original's log.json.

Each record is one line, `DLLL ` followed by a JSON object:
    {"timestamp": "1732850000.123", "datetime": "2024-11-29 03:33:20.123000",
     "elapsedtime": "12.5", "type": "LOG", "step": STEP, "data": {...}}
STEP is "PARAMETER" for the run's settings, [epoch] for an epoch and [] for the run's summary,
as the original logs them. Metric descriptions are `"type": "METADATA"` records with "metric"
and "metadata" instead of "step" and "data". The strings for timestamp and elapsed time are
dllogger's own choice, kept so NVIDIA's log consumers read these files unchanged. The
dllogger package is not on PyPI, so this writes the format itself.
"""
import contextlib
import datetime
import json
import math
import os
import time

import cli

PREFIX = "DLLL "
PARAMETER = "PARAMETER"
# What a ranking metric's log key may start with, in this order, and the words stdout says for
# each: the validation split, then the full-ranking protocol (val_full_hr@10).
METRIC_PREFIXES = (("val_", "validation "), ("full_", "full "))


def metric_parts(key):
    """(the prefixes of METRIC_PREFIXES a log key starts with, the metric after them) for a
    ranking metric's key (hr@K, ndcg@K, mrr after the prefixes); None for any other key."""
    prefixes = []
    for prefix, _ in METRIC_PREFIXES:
        if key.startswith(prefix):
            prefixes.append(prefix)
            key = key.removeprefix(prefix)
    name = key.partition("@")[0]
    if name in ("hr", "ndcg") and key.partition("@")[2].isdigit() or key == "mrr":
        return tuple(prefixes), key
    return None


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class JsonLogger:
    """Appends dllogger records to `path`; a logger with no path (non-main ranks) writes nothing."""

    def __init__(self, path=None, append=False):
        self.path = path
        self.start = time.time()
        # A log this logger started that no record reaches (a full disk) is removed, not left
        # empty; an appended one is someone else's.
        self.started_here = not append
        if path is None:
            return
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        if not append:
            open(path, "w").close()

    def log(self, step, data):
        """One LOG record: `step` is PARAMETER, an epoch as (epoch,), or () for the summary."""
        self._write({"type": "LOG", "step": _jsonable(step), "data": _jsonable(data)})

    def metadata(self, metric, metadata):
        self._write({"type": "METADATA", "metric": metric, "metadata": _jsonable(metadata)})

    @contextlib.contextmanager
    def write_failures_reported(self, kept):
        """Inside it, a failed write of this log (a full disk, a file size limit) raises a
        cli.UserError: the flag, the reason, what the log and the run kept (`kept`, or what
        `kept()` says at the failure), what to do. Other OSErrors pass unchanged."""
        try:
            yield
        except OSError as error:
            if self.path is None or error.filename != self.path:
                raise
            said = kept() if callable(kept) else kept
            raise cli.UserError(f"--log_path {self.path}: writing failed ({error.strerror}); "
                                f"{said}; free space or pass --log_path elsewhere") from None

    def _write(self, fields):
        if self.path is None:
            return
        now = time.time()
        record = {"timestamp": str(now),
                  "datetime": str(datetime.datetime.fromtimestamp(now)),
                  "elapsedtime": str(now - self.start), **fields}
        line = (PREFIX + json.dumps(record) + "\n").encode()
        size = None
        # Closed per record so a killed run keeps every epoch it finished. Unbuffered, so that
        # a failed write leaves nothing behind to be flushed at close; a raw write may take
        # only part of the line, and the rest follows.
        try:
            with open(self.path, "ab", buffering=0) as log_file:
                size = log_file.seek(0, os.SEEK_END)
                while line:
                    line = line[log_file.write(line):]
        except OSError as error:
            if size is not None:
                # A write cut short by a full disk or a file size limit leaves part of the line,
                # which read_log could not parse: the log keeps whole records only.
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)
            if self.started_here and not size:
                with contextlib.suppress(OSError):
                    os.remove(self.path)
            # A full disk fails in write or close, whose errors name no file; name the log's.
            raise OSError(error.errno, error.strerror, self.path) from None


def read_log(path):
    """The records of a log written by JsonLogger, in order (the `DLLL ` prefix removed)."""
    with open(path) as log_file:
        return [json.loads(line.removeprefix(PREFIX)) for line in log_file if line.strip()]


def log_records(records, step_kind):
    """The `data` of each LOG record of one kind: "parameter", "epoch" or "summary"."""
    def kind(step):
        if step == PARAMETER:
            return "parameter"
        return "epoch" if step else "summary"
    return [record["data"] for record in records
            if record.get("type") == "LOG" and kind(record.get("step")) == step_kind]
