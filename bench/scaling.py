"""Training throughput of ncf.py with 1, 2, ... processes (torchrun) on the same data.

    python bench/scaling.py                                  # CPU: 1 and 2 processes
    python bench/scaling.py --positives 19861770 --nproc 1 2 4 8 --epochs 2   # GPUs

Writes a converted dataset at the ml-20m shape (138,493 users, 26,744 items, --positives random
training positives, 100 test negatives per user) into WORKDIR once, then runs --epochs epochs
of ncf.py per process count and reads the last epoch's train_throughput (samples of all ranks
per second) from its log.json. On a CPU each process gets cores // processes threads: torchrun would give each
one thread, and a single process uses all cores.
"""
import argparse
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from logger import log_records, read_log  # noqa: E402
from train_bench import make_data  # noqa: E402


def write_dataset(directory, positives):
    if os.path.exists(os.path.join(directory, "test_negatives.pt")):
        return
    os.makedirs(directory, exist_ok=True)
    train, test, negatives = make_data(138_493, 26_744, positives)
    for name, tensor in (("train_ratings.pt", train), ("test_ratings.pt", test),
                         ("test_negatives.pt", negatives)):
        torch.save(tensor, os.path.join(directory, name))


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
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    epoch = log_records(read_log(log_path), "epoch")[-1]
    return {"processes": nproc, "threads_per_process": env.get("OMP_NUM_THREADS", "-"),
            "train_samples_per_s": epoch["train_throughput"],
            "eval_samples_per_s": epoch["eval_throughput"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positives", type=int, default=2_000_000)
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("-b", "--batch_size", type=int, default=2 ** 20)
    parser.add_argument("-e", "--epochs", type=int, default=1,
                        help="epochs per run; the last one is reported (use 2 on GPUs, whose "
                             "first epoch pays for CUDA/NCCL start-up)")
    parser.add_argument("--workdir", default="/tmp/ncf-scaling")
    args = parser.parse_args(argv)
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
    main()
