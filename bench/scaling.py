"""Training throughput of ncf.py with 1, 2, ... processes (torchrun) on the same data.

    python bench/scaling.py                                  # CPU: 1 and 2 processes
    python bench/scaling.py --positives 19861770 --nproc 1 2 4 8 --epochs 2   # GPUs

Writes a converted dataset at the ml-20m shape (138,493 users, 26,744 items, --positives random
training positives, 100 test negatives per user) into WORKDIR once, then runs --epochs epochs
of ncf.py per process count and reads the last epoch's train_throughput (samples of all ranks
per second) from its log.json. On a CPU each process gets cores // processes threads: torchrun would give each
one thread, and a single process uses all cores. A cached dataset whose files do not all load
(one written before the writes were atomic, and killed midway) is written again.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import cli  # noqa: E402
from checkpoint import atomic_save  # noqa: E402
from child_process import run_child  # noqa: E402
from logger import log_records, read_log  # noqa: E402
from train_bench import make_data  # noqa: E402

USERS, ITEMS = 138_493, 26_744  # ml-20m's
FILES = ("train_ratings.pt", "test_ratings.pt", "test_negatives.pt")


def cache_problem(directory, positives):
    """Why `directory` does not hold write_dataset's files for `positives`; None when it does."""
    for name in FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            return f"{path} is missing"
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for damaged files
            return f"{path} cannot be read ({type(error).__name__})"
        if not isinstance(tensor, torch.Tensor):
            return f"{path} holds no tensor"
        if name == "train_ratings.pt" and len(tensor) != positives:
            return f"{path} holds {len(tensor)} positives, not {positives}"
    return None


def write_dataset(directory, positives):
    problem = cache_problem(directory, positives)
    if problem is None:
        return
    if os.path.isdir(directory):
        print(f"writing the dataset again: {problem}", flush=True)
    os.makedirs(directory, exist_ok=True)
    train, test, negatives = make_data(USERS, ITEMS, positives)
    for name, tensor in zip(FILES, (train, test, negatives)):
        atomic_save(tensor, os.path.join(directory, name))


def run(nproc, data, args):
    log_path = os.path.join(args.workdir, f"log-{nproc}.json")
    flags = ["ncf.py", "--data", data, "-e", str(args.epochs), "-b", str(args.batch_size),
             "--checkpoint_dir", os.path.join(args.workdir, f"ck-{nproc}"),
             "--log_path", log_path]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    if nproc == 1:
        command = [sys.executable, *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_port", str(29600 + nproc), *flags]
    print(f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '-')} {' '.join(command)}", flush=True)
    run_child(f"the {nproc}-process run", command, cwd=ROOT, env=env)
    epoch = log_records(read_log(log_path), "epoch")[-1]
    return {"processes": nproc, "threads_per_process": env.get("OMP_NUM_THREADS", "-"),
            "train_samples_per_s": epoch["train_throughput"],
            "eval_samples_per_s": epoch["eval_throughput"]}


def main(argv=None):
    parser = cli.ArgumentParser(prog="scaling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--positives", type=int, default=2_000_000)
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("-b", "--batch_size", type=int, default=2 ** 20)
    parser.add_argument("-e", "--epochs", type=int, default=1,
                        help="epochs per run; the last one is reported (use 2 on GPUs, whose "
                             "first epoch pays for CUDA/NCCL start-up)")
    parser.add_argument("--workdir", default="/tmp/ncf-scaling")
    args = parser.parse_args(argv)
    if args.positives < USERS:
        parser.error(f"--positives {args.positives} must be at least {USERS:,}, the users of the "
                     f"ml-20m shape: every user has a training positive")
    if min(args.nproc) < 1:
        parser.error(f"--nproc counts must be at least 1, got {min(args.nproc)}")
    data = os.path.join(args.workdir, f"data-{args.positives}")
    write_dataset(data, args.positives)
    results = [run(nproc, data, args) for nproc in args.nproc]
    print("| processes | threads each | train samples/s | speed-up | eval samples/s |")
    print("|---|---|---|---|---|")
    for result in results:
        print(f"| {result['processes']} | {result['threads_per_process']} | "
              f"{result['train_samples_per_s']:,.0f} | "
              f"x{result['train_samples_per_s'] / results[0]['train_samples_per_s']:.2f} | "
              f"{result['eval_samples_per_s']:,.0f} |")
    return results


if __name__ == "__main__":
    cli.run(main)
