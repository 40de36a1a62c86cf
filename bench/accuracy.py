"""Best HR@k / NDCG@k of full training runs over several seeds, as a markdown table.

    python bench/accuracy.py --ratings /data/ml-latest-small/ratings.csv  # ./prepare_dataset.sh
    python bench/accuracy.py --generate ml-latest-small      # generate.py's data instead

Converts the ratings once (convert.py, seed 1) into WORKDIR, then trains with ncf.py for each
--seeds value (-b 8192 and the other flags at their defaults unless given after `--`), each run
in its own process, and reads the results from its log.json, k among them (-k, 10 unless given).
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import generate  # noqa: E402
from child_process import run_child  # noqa: E402
from fileio import atomic_output  # noqa: E402
from logger import log_records, read_log  # noqa: E402


def cached_source(marker):
    """What the cache beside `marker` was converted from; None when it does not say."""
    try:
        with open(marker) as text:
            return text.read()
    except FileNotFoundError:
        return None


def prepare(args):
    """(workdir, converted data) of the ratings; converted again unless the cache is of the same
    file, unchanged since: the directory's name alone once let another file of the same folder
    (or of a folder of the same name) be measured on the first one's data."""
    if args.generate:
        name, source = f"generated-{args.generate}", f"generate.py --preset {args.generate}"
    else:
        path = os.path.abspath(args.ratings)
        if not os.path.isfile(path):
            raise cli.UserError(f"{args.ratings}: no such ratings file; put MovieLens there "
                                f"(./prepare_dataset.sh ml-latest-small) or measure generated "
                                f"data (accuracy.py --generate PRESET, models.py --datasets "
                                f"generated)")
        stat = os.stat(path)
        name = (f"{os.path.basename(os.path.dirname(path))}-"
                f"{os.path.splitext(os.path.basename(path))[0]}")
        source = f"{path}, {stat.st_size} bytes, modified {stat.st_mtime_ns} ns"
    workdir = os.path.join(args.workdir, name)
    data = os.path.join(workdir, "data")
    marker = os.path.join(workdir, "source.txt")
    if not (os.path.exists(os.path.join(data, "metadata.json"))
            and cached_source(marker) == source):
        ratings = args.ratings
        if args.generate:
            ratings = os.path.join(workdir, "ratings.csv")
            users, items, mean_ratings = generate.PRESETS[args.generate]
            generate.write_csv(generate.generate_ratings(users, items, mean_ratings, seed=1),
                               ratings)
        run_child(f"the conversion of {ratings}",
                    [sys.executable, os.path.join(ROOT, "convert.py"), "--path", ratings,
                     "--output", data])
        with atomic_output(marker) as temporary, open(temporary, "w") as out:
            out.write(source)
    return workdir, data


def run_seed(workdir, data, seed, args):
    run_dir = os.path.join(workdir, f"seed{seed}")
    log_path = os.path.join(run_dir, "log.json")
    command = [sys.executable, os.path.join(ROOT, "ncf.py"), "--data", data, "-b", "8192",
               "-e", str(args.epochs), "--seed", str(seed), "--checkpoint_dir", run_dir,
               "--log_path", log_path, *args.ncf_flags]
    print(" ".join(command), flush=True)
    run_child(f"the ncf.py run of seed {seed}", command)
    records = read_log(log_path)
    summary = log_records(records, "summary")[-1]
    seconds = np.mean([record["train_epoch_time"] + record["validation_epoch_time"]
                       for record in log_records(records, "epoch")])
    return {"seed": seed, "k": log_records(records, "parameter")[0]["topk"],
            "hr": summary["best_accuracy"], "ndcg": summary["best_ndcg"],
            "epoch": summary["best_epoch"], "seconds_per_epoch": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ratings", help="a ratings file convert.py reads")
    source.add_argument("--generate", choices=sorted(generate.PRESETS),
                        help="use generate.py's data of this preset")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("-e", "--epochs", type=int, default=20)
    parser.add_argument("--workdir", default="/tmp/ncf-accuracy")
    parser.add_argument("ncf_flags", nargs="*", help="more ncf.py flags, after --")
    args = parser.parse_args(argv)
    workdir, data = prepare(args)
    results = [run_seed(workdir, data, seed, args) for seed in args.seeds]
    k = results[0]["k"]  # every run has the same flags
    print(f"| seed | best HR@{k} | NDCG@{k} | epoch | seconds per epoch |")
    print("|---|---|---|---|---|")
    for result in results:
        print(f"| {result['seed']} | {result['hr']:.4f} | {result['ndcg']:.4f} | "
              f"{result['epoch']} | {result['seconds_per_epoch']:.1f} |")
    print(f"| mean | {np.mean([r['hr'] for r in results]):.4f} | "
          f"{np.mean([r['ndcg'] for r in results]):.4f} | | |")
    return results


if __name__ == "__main__":
    cli.run(main)
