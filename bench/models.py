"""GMF, MLP and NeuMF, from scratch and pretrained from them: one markdown table of best HR@k /
NDCG@k (sampled and full-ranking), epochs and time, over seeds and datasets.

    python bench/models.py                                   # both datasets, seeds 1 2 3
    python bench/models.py --datasets generated --seeds 1 -e 2  # a quick look

The data is bench/accuracy.py's: ml-latest-small's ratings.csv (--ml_latest_small, default
$NCF_REAL_DATA) and generate.py's ml-latest-small preset, each converted once (convert.py, seed
1). For every seed, each in its own ncf.py process with -b 8192 -e EPOCHS --full_ranking and the
other flags at their defaults: GMF, MLP, NeuMF from scratch, then NeuMF from that seed's GMF and
MLP (--alpha 0.5) with Adam and with plain SGD at --sgd_lr. k is the runs' -k (10 unless given
after `--`). Full-ranking figures are those of the epoch with the best sampled HR@k (the
model.pth a run keeps); times are training seconds, evaluation left out.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
from accuracy import prepare  # noqa: E402
from child_process import run_child  # noqa: E402
from logger import log_records, read_log  # noqa: E402

DATASETS = ("ml-latest-small", "generated")
# (row name, run name, ncf.py flags); {gmf} and {mlp} are the same seed's model.pth files.
RUNS = [
    ("GMF", "gmf", ["--model", "gmf"]),
    ("MLP", "mlp", ["--model", "mlp"]),
    ("NeuMF, scratch", "neumf", []),
    ("NeuMF, pretrained, Adam", "pretrained-adam",
     ["--pretrained_gmf", "{gmf}", "--pretrained_mlp", "{mlp}"]),
    ("NeuMF, pretrained, SGD", "pretrained-sgd",
     ["--pretrained_gmf", "{gmf}", "--pretrained_mlp", "{mlp}", "--optimizer", "sgd",
      "-l", "{sgd_lr}"]),
]


def train(data, run_dir, seed, flags, args):
    """The results of one ncf.py run, read from its log."""
    log_path = os.path.join(run_dir, "log.json")
    command = [sys.executable, os.path.join(ROOT, "ncf.py"), "--data", data, "-b", "8192",
               "-e", str(args.epochs), "--seed", str(seed), "--checkpoint_dir", run_dir,
               "--log_path", log_path, "--full_ranking", *flags, *args.ncf_flags]
    print(" ".join(command), flush=True)
    run_child(f"the ncf.py run in {run_dir}", command, stdout=subprocess.DEVNULL)
    records = read_log(log_path)
    summary = log_records(records, "summary")[-1]
    best = next(record for record in log_records(records, "epoch")
                if record["epoch"] == summary["best_epoch"])
    epochs = log_records(records, "epoch")
    k = log_records(records, "parameter")[0]["topk"]
    return {"k": k, "hr": summary["best_accuracy"], "ndcg": summary["best_ndcg"],
            "full_hr": best[f"full_hr@{k}"], "full_ndcg": best[f"full_ndcg@{k}"],
            "epoch": summary["best_epoch"], "seconds_to_best": summary["train_time_to_best_model"],
            "seconds": sum(record["train_epoch_time"] for record in epochs)}


def run_seed(name, seed, args, all_results):
    """Trains every run of `seed` on `name`, adding their results to all_results[name]."""
    if name == "generated":
        source = SimpleNamespace(ratings=None, generate="ml-latest-small")
    else:
        source = SimpleNamespace(ratings=args.ml_latest_small, generate=None)
    workdir, data = prepare(SimpleNamespace(**vars(source), workdir=args.workdir))
    results = all_results.setdefault(name, {run: [] for _, run, _ in RUNS})
    paths = {kind: os.path.join(workdir, f"seed{seed}", kind, "model.pth")
             for kind in ("gmf", "mlp")}
    for _, run, flags in RUNS:
        flags = [flag.format(sgd_lr=args.sgd_lr, **paths) for flag in flags]
        results[run].append(train(data, os.path.join(workdir, f"seed{seed}", run), seed, flags,
                                  args))


def table(all_results):
    # Every run has the same flags, so one k for the table.
    k = next(iter(all_results.values()))["gmf"][0]["k"]
    lines = [f"| data | model | HR@{k} | NDCG@{k} | full HR@{k} | full NDCG@{k} | best epoch "
             "| train s to best | train s, all epochs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, results in all_results.items():
        pretraining = np.array([gmf["seconds"] + mlp["seconds"]
                                for gmf, mlp in zip(results["gmf"], results["mlp"])])
        for row, run, _ in RUNS:
            seeds = results[run]
            seconds = np.array([result["seconds"] for result in seeds])
            total = f"{seconds.mean():.0f}"
            if run.startswith("pretrained"):
                total += f" (+{pretraining.mean():.0f} GMF and MLP)"
            lines.append(
                f"| {name} | {row} | "
                + " | ".join(f"{np.mean([result[key] for result in seeds]):.4f}"
                             for key in ("hr", "ndcg", "full_hr", "full_ndcg"))
                + f" | {' / '.join(str(result['epoch']) for result in seeds)} | "
                f"{np.mean([result['seconds_to_best'] for result in seeds]):.0f} | {total} |")
    return "\n".join(lines)


def main(argv=None):
    parser = cli.ArgumentParser(prog="models.py", description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--ml_latest_small", default=os.environ.get("NCF_REAL_DATA"),
                        help="ml-latest-small's ratings.csv (./prepare_dataset.sh "
                             "ml-latest-small writes /data/ml-latest-small/ratings.csv); "
                             "default: $NCF_REAL_DATA")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("-e", "--epochs", type=int, default=20)
    parser.add_argument("--sgd_lr", type=float, default=0.1,
                        help="learning rate of the pretrained NeuMF's SGD fine-tuning")
    parser.add_argument("--workdir", default="/tmp/ncf-models")
    parser.add_argument("ncf_flags", nargs="*", help="more ncf.py flags for every run, after --")
    args = parser.parse_args(argv)
    if "ml-latest-small" in args.datasets and not args.ml_latest_small:
        parser.error("--datasets ml-latest-small needs its ratings.csv: pass --ml_latest_small "
                     "or set NCF_REAL_DATA, or measure --datasets generated")
    all_results = {}
    # Seed by seed, the table so far printed after each, so that a long measurement stopped
    # early still leaves every dataset's finished seeds.
    for seed in args.seeds:
        for name in args.datasets:
            run_seed(name, seed, args, all_results)
            print(f"After seed {seed} of {name}:\n{table(all_results)}", flush=True)
    print(f"HR/NDCG: mean of seeds {', '.join(map(str, args.seeds))}; best epoch per seed "
          f"(0-based, of {args.epochs})")
    text = table(all_results)
    print(text)
    return all_results, text


if __name__ == "__main__":
    cli.run(main)
