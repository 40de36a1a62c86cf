"""Structured run logs: one JSON object per line, each stamped with the wall-clock time.

The original logs through NVIDIA's dllogger; this keeps the same idea (a machine-readable
record per event beside the human-readable lines on stdout) with no extra dependency.
"""
import json
import math
import os
import time


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
    """Appends records to `path`; a logger with no path (non-main ranks) writes nothing."""

    def __init__(self, path=None, append=False):
        self.path = path
        if path is None:
            return
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        if not append:
            open(path, "w").close()

    def log(self, kind, **data):
        if self.path is None:
            return
        record = {"timestamp": round(time.time(), 3), "type": kind, **_jsonable(data)}
        # Flushed and closed per record so a killed run keeps every epoch it finished.
        with open(self.path, "a") as log_file:
            log_file.write(json.dumps(record) + "\n")


def read_log(path):
    """The records of a log written by JsonLogger, in order."""
    with open(path) as log_file:
        return [json.loads(line) for line in log_file if line.strip()]
