"""logger.JsonLogger: the dllogger records, and the one line a failed write becomes."""
import os

import pytest

import cli
from logger import PARAMETER, JsonLogger, log_records, read_log


def test_a_failed_write_of_the_log_becomes_the_tools_one_line(tmp_path):
    path = str(tmp_path / "log.json")
    logger = JsonLogger(path)
    logger.log(PARAMETER, {"seed": 1})
    os.remove(path)
    os.mkdir(path)  # the next write cannot open it
    with pytest.raises(cli.UserError) as caught:
        with logger.write_failures_reported("it holds the settings"):
            logger.log((), {"hr@10": 0.5})
    assert str(caught.value) == (f"--log_path {path}: writing failed (Is a directory); it holds "
                                 f"the settings; free space or pass --log_path elsewhere")


def test_other_os_errors_pass_unchanged(tmp_path):
    logger = JsonLogger(str(tmp_path / "log.json"))
    other = tmp_path / "model.pth"
    with pytest.raises(FileNotFoundError) as caught:
        with logger.write_failures_reported("kept"):
            open(other)
    assert caught.value.filename == str(other)
    # a rank without a log (path None) has no write to fail
    with pytest.raises(PermissionError):
        with JsonLogger(None).write_failures_reported("kept"):
            raise PermissionError(13, "Permission denied", None)


def test_records_round_trip(tmp_path):
    path = tmp_path / "log.json"
    logger = JsonLogger(str(path))
    logger.log(PARAMETER, {"seed": 1})
    logger.log((0,), {"hr@10": 0.25})
    logger.log((), {"best_accuracy": 0.25})
    records = read_log(path)
    assert log_records(records, "parameter") == [{"seed": 1}]
    assert log_records(records, "epoch") == [{"hr@10": 0.25}]
    assert log_records(records, "summary") == [{"best_accuracy": 0.25}]
    appended = JsonLogger(str(path), append=True)
    appended.log((1,), {"hr@10": 0.5})
    assert len(read_log(path)) == 4
    JsonLogger(str(path))  # a new run starts the file afresh
    assert read_log(path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("append, kept", [(False, False), (True, True)])
def test_a_log_started_here_that_no_record_reaches_is_removed(tmp_path, append, kept):
    path = tmp_path / "log.json"
    path.symlink_to("/dev/full")  # every write fails: No space left on device
    logger = JsonLogger(str(path), append=append)
    with pytest.raises(cli.UserError, match="writing failed"):
        with logger.write_failures_reported("kept"):
            logger.log(PARAMETER, {"seed": 1})
    assert path.is_symlink() is kept
