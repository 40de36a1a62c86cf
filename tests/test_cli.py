"""cli.run, the one exit every tool takes, and cli.ArgumentParser's flags given or left out."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
from conftest import ROOT


def main_raising(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("error, status, line", [
    (cli.UserError("--data x: not found; pass a directory"), 2,
     "test_cli.py: error: --data x: not found; pass a directory\n"),
    (KeyboardInterrupt(), 130, "test_cli.py: interrupted (Ctrl-C)\n"),
    (BrokenPipeError(), 0, ""),
    (SystemExit(3), 3, ""),
])
def test_run_turns_each_ending_into_its_status_and_at_most_one_line(error, status, line, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr(cli, "discard_stdout", lambda: None)
    with pytest.raises(SystemExit) as leaving:
        cli.run(main_raising(error), [])
    assert leaving.value.code == status
    assert capsys.readouterr().err == line


@pytest.mark.parametrize("returned, status", [(None, 0), (0, 0), (1, 1), ({"hr": 1}, 0),
                                              (True, 0)])
def test_an_int_that_main_returns_is_the_exit_status(returned, status):
    with pytest.raises(SystemExit) as leaving:
        cli.run(lambda argv: returned, [])
    assert leaving.value.code == status


def test_an_unexpected_error_keeps_its_traceback_in_one_process():
    with pytest.raises(ZeroDivisionError):
        cli.run(main_raising(ZeroDivisionError()), [])


def test_sigterm_unwinds_through_cleanups_with_one_line(capsys):
    cleaned = []

    def main(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as leaving:
        cli.run(main, [])
    assert leaving.value.code == 143 and cleaned == [True]
    assert capsys.readouterr().err == "test_cli.py: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("argv, given", [
    ([], []),
    (["--alpha", "0.5"], ["alpha"]),  # given at its default value
    (["--beta=0.1", "--alpha", "1"], ["alpha", "beta"]),
])
def test_given_tells_a_flag_at_its_default_from_one_left_out(argv, given):
    parser = cli.ArgumentParser(prog="t")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.25)
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    assert parser.given(argv, ("alpha", "beta", "layers")) == given
    # the defaults are back for the next parse
    assert parser.parse_args([]).alpha == 0.5


def test_a_list_default_is_a_new_list_each_parse():
    parser = cli.ArgumentParser(prog="t")
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    first = parser.parse_args([])
    first.layers.append(3)
    assert parser.parse_args([]).layers == [1, 2]


def interruptible():
    """SIGINT as a terminal's Ctrl-C delivers it. A suite started in the background (`make
    test &`) hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler, rightly: the child would train on, as `nohup` asks."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, line", [
    (signal.SIGINT, 130, "ncf.py: interrupted (Ctrl-C)"),
    (signal.SIGTERM, 143, "ncf.py: terminated (SIGTERM)"),
])
def test_stopping_training_is_one_line(clustered_data, tmp_path, signum, status, line):
    process = subprocess.Popen(
        [sys.executable, "ncf.py", "--data", clustered_data, "-b", "4096", "-e", "1000",
         "--threshold", "1.1", "--checkpoint_dir", str(tmp_path / "ck"), "--log_path",
         str(tmp_path / "log.json")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=interruptible)
    seen = []
    try:
        for output in process.stdout:
            seen.append(output)
            # epoch 0's last.pth is written before epoch 1 ends
            if output.startswith("Epoch 1:"):
                break
        assert seen[-1].startswith("Epoch 1:"), "".join(seen)
        process.send_signal(signum)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert process.returncode == status
    assert stderr.splitlines() == [line]
    # the epochs it finished are kept: it resumes from them
    assert torch.load(tmp_path / "ck" / "last.pth", weights_only=True)["epoch"] >= 1
