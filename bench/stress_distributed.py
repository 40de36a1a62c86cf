"""Repeat 2-process CPU runs of ncf.py under torchrun and count the ones that do not exit 0.

    python bench/stress_distributed.py --runs 30      # 30 train + 30 --mode test runs

Exists because a run that trained, printed and logged could still abort at exit on one rank
(SIGABRT, torchrun exit 1) a few times in 30: a bug only a count over many runs shows. Writes a
small dataset once with generate.py and convert.py into WORKDIR, then alternates a train run
and a --mode test run of its model, each `torchrun --nproc_per_node=2` with gloo on 127.0.0.1,
a fresh free port and OMP_NUM_THREADS=1. Every run is bounded by --timeout. Prints one line per
run, a table of the failures with the tail of their stderr, and "N runs, F failures"; exits 1
when any run failed.
"""
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402

STDERR_TAIL_LINES = 3
# Beyond torchrun's own 30 s between its workers' SIGTERM and their SIGKILL.
TERMINATE_SECONDS = 60


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_dataset(workdir, users):
    data = os.path.join(workdir, "data")
    if os.path.exists(os.path.join(data, "test_negatives.pt")):
        return data
    ratings = os.path.join(workdir, "ratings.csv")
    for command in (["generate.py", "--output", ratings, "--users", str(users), "--items", "500"],
                    ["convert.py", "--path", ratings, "--output", data]):
        subprocess.run([sys.executable, *command], cwd=ROOT, check=True, capture_output=True)
    return data


def torchrun(flags, timeout):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "ncf.py", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    status, stderr = run_bounded(command, env, timeout)
    return status, stderr, time.time() - start


def run_bounded(command, env, timeout):
    """(exit status, or "timeout", and stderr) of a torchrun command run in ROOT for at most
    `timeout` seconds.

    Out of time, torchrun gets SIGTERM, on which it ends its workers itself: SIGKILL would end
    torchrun alone, and its workers, in sessions of their own, would run on holding the
    checkpoint directory's lock, so that every later run failed for it.
    """
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        stderr = process.communicate(timeout=timeout)[1]
        return process.returncode, stderr
    except subprocess.TimeoutExpired:
        process.terminate()
    try:
        stderr = process.communicate(timeout=TERMINATE_SECONDS)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        stderr = process.communicate()[1]
    return "timeout", stderr


def stderr_tail(stderr):
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return " / ".join(lines[-STDERR_TAIL_LINES:]).replace("|", "\\|")


def main(argv=None):
    parser = cli.ArgumentParser(prog="stress_distributed.py",
                                description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30,
                        help="train runs, each followed by a --mode test run (2 x RUNS in all)")
    parser.add_argument("--users", type=int, default=300, help="users of the generated dataset")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120, help="seconds allowed per run")
    parser.add_argument("--workdir", default="/tmp/ncf-stress")
    args = parser.parse_args(argv)
    # 0 runs would report "0 runs, 0 failures": a pass that tried nothing.
    for flag in ("runs", "users", "epochs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be above 0 seconds, got {args.timeout}")
    os.makedirs(args.workdir, exist_ok=True)
    data = write_dataset(args.workdir, args.users)
    checkpoints = os.path.join(args.workdir, "ck")
    train_flags = ["--data", data, "-e", str(args.epochs), "-b", "2048",
                   "--checkpoint_dir", checkpoints,
                   "--log_path", os.path.join(args.workdir, "train.json")]
    test_flags = ["--data", data, "--mode", "test",
                  "--load_checkpoint_path", os.path.join(checkpoints, "model.pth"),
                  "--log_path", os.path.join(args.workdir, "test.json")]
    failures = []
    for index in range(args.runs):
        for mode, flags in (("train", train_flags), ("test", test_flags)):
            status, stderr, seconds = torchrun(flags, args.timeout)
            print(f"run {index + 1}/{args.runs} {mode}: exit {status}, {seconds:.1f} s",
                  flush=True)
            if status != 0:
                failures.append((index + 1, mode, status, stderr_tail(stderr)))
    if failures:
        print("| run | mode | exit | stderr tail |")
        print("|---|---|---|---|")
        for index, mode, status, tail in failures:
            print(f"| {index} | {mode} | {status} | {tail} |")
    print(f"{2 * args.runs} runs, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    cli.run(main)
