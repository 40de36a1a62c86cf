"""Top-k recommendations from a trained NeuMF, in the original user and movie ids.

    python recommend.py --data DIR --load_checkpoint_path model.pth --users 1 42 --movies movies.csv
    python recommend.py --data DIR --load_checkpoint_path model.pth --all_users --output recs.csv

DIR is what convert.py wrote (the ratings tensors and the id maps user_ids.pt, item_ids.pt).
Items a user rated in training are never recommended. Ranks start at 1; score is the model's
sigmoid output; the user and item columns are named as those convert.py read the ids from
(userId and movieId where metadata.json records none). The answer is float32's over every item,
found exactly by scoring only the items whose upper bound can reach a user's top k
(bounded_topk.py; a model with an MLP hidden layer and at least 4,096 items). Elsewhere every
item is scored in one pass of the factored model (scoring.py), in float32, except where the
bounds would apply but rule out too few items: there, where bfloat16 is native (a CPU with AMX
or AVX512_BF16, a CUDA device with bf16), a bfloat16 pass picks each user's shortlist, which
float32 scores and orders (--precision, default auto).
"""
import os
import sys

import numpy as np
import torch

import cli
from fileio import atomic_output
from progress import Progress
from recommender import Recommender, add_scoring_flags, load_titles, titles_note

PROG = "recommend.py"


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory written by convert.py")
    # The names ncf.py and inference.py use; --checkpoint is this tool's first spelling.
    parser.add_argument("--load_checkpoint_path", "--checkpoint", dest="checkpoint",
                        required=True, help="model.pth written by ncf.py")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", nargs="+", metavar="ID",
                     help="original user ids (as in the ratings file; text ids too)")
    who.add_argument("--all_users", action="store_true",
                     help="every user, written as CSV to --output")
    parser.add_argument("--output", help="CSV for --all_users: userId,rank,movieId,score[,title] "
                                          "(the id columns named as in the converted ratings)")
    parser.add_argument("-k", "--topk", type=int, default=10, help="items per user")
    parser.add_argument("--movies", help="MovieLens titles: movies.csv (movieId,title,...), "
                                          "ml-1m's or ml-10m's movies.dat, or ml-100k's u.item")
    add_scoring_flags(parser)
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be at least 1, got {args.topk}")
    if args.all_users and not args.output:
        parser.error("--all_users needs --output FILE.csv")
    if args.output and not args.all_users:
        parser.error("--output goes with --all_users; --users prints to the terminal")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    return args


def add_titles(table, titles, item_column):
    if titles is not None:
        table["title"] = table[item_column].map(titles).fillna("")
    return table


def print_table(table):
    """Recommender.table's rows, aligned, under the user and item columns' names."""
    header = f"{table.columns[0]:>8} {'rank':>4} {table.columns[2]:>8} {'score':>8}"
    print(header + ("  title" if "title" in table else ""))
    # By position: a column's name need not be a Python name (`user id`).
    for user, rank, item, score, *title in table.itertuples(index=False, name=None):
        line = f"{user:>8} {rank:>4} {item:>8} {score:>8.4f}"
        print(line + (f"  {title[0]}" if title else ""))


def write_all_users(recommender, topk, titles, output):
    """Recommendations for every user, by original user id, into `output` atomically, with
    progress on stderr (a bar on a terminal, else a line every 30 s)."""
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise cli.UserError(f"--output {output}: directory {directory} does not exist; "
                            f"create it or pass a path in an existing directory")
    order = torch.from_numpy(np.argsort(recommender.user_ids, kind="stable"))
    step = recommender.users_per_batch()
    try:
        with atomic_output(output) as temporary, open(temporary, "w", newline="") as handle, \
                Progress(len(order), "recommend", "user") as bar:
            for start in range(0, len(order), step):
                users = order[start:start + step]
                table = add_titles(recommender.table(users, topk), titles,
                                   recommender.item_column)
                table.to_csv(handle, header=start == 0, index=False, float_format="%.6f")
                bar.update(len(users))
    except OSError as error:
        raise cli.UserError(f"--output {output}: cannot write ({error.strerror}); pass a "
                            f"writable file path") from None


def main(argv=None):
    """Returns the recommendation table for --users; None after writing --all_users' CSV."""
    args = parse_args(argv)
    titles = load_titles(args.movies) if args.movies else None
    recommender = Recommender(args.data, args.checkpoint, args.device, args.precision)
    # After loading, whose temporaries then go back to the system (ncf.py does the same).
    cli.reuse_freed_memory()
    note = titles_note(titles, recommender.item_ids, args.movies)
    if note:
        print(f"{PROG}: {note}", file=sys.stderr)
    if args.all_users:
        write_all_users(recommender, args.topk, titles, args.output)
        return None
    users = recommender.dense_users(list(dict.fromkeys(args.users)))
    table = add_titles(recommender.table(users, args.topk), titles, recommender.item_column)
    print_table(table)
    sys.stdout.flush()
    return table


if __name__ == "__main__":
    cli.run(main)
