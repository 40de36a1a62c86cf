"""Time convert.py on an ml-20m-shaped ratings.csv and report its wall time and peak memory.

    python bench/convert_bench.py [--workdir /tmp/ncf-bench]

The input (19,875,407 rows, 138,493 users with at least 20 ratings each, 26,744 items,
heavy-tailed user activity and item popularity, timestamp ties and 1,000 repeated (user, item)
pairs, 537 MB) is written once into WORKDIR and reused. convert.py then runs as a subprocess, so its
peak resident memory is measured on its own. Targets on the 2-core development machine: 35 s and
2.5 GB (the original's preprocessing: 70 s, 5.0 GB).
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np

USERS, ITEMS, ROWS = 138_493, 26_744, 20_000_263  # ml-20m
MIN_RATINGS = 20
DUPLICATES = 1_000
FIRST_TIME, LAST_TIME = 789_652_009, 1_427_784_002  # ml-20m's first and last timestamps
TARGET_SECONDS, TARGET_BYTES = 35, 2.5e9
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ratings_columns(seed=0):
    """user, item, rating x 2, timestamp columns of an ml-20m-shaped file, grouped by user."""
    rng = np.random.default_rng(seed)
    # ml-20m: median 68 and mean 144 ratings per user, the most active near 9,000
    extra = rng.lognormal(np.log(48), 1.38, USERS)
    counts = MIN_RATINGS + np.minimum(extra * (ROWS - MIN_RATINGS * USERS) / extra.sum(), 9_000)
    counts = counts.astype(np.int64)
    keys = np.empty(0, dtype=np.int64)
    owed = counts
    # Draws repeat items, so each round draws more than each user is still owed (twice as much)
    # and the surplus is trimmed at random at the end. np.unique is avoided: with numpy 2.4 it
    # took 87 s on 20 M keys here, where a sort takes a second.
    while owed.any():
        users = np.repeat(np.arange(USERS, dtype=np.int64), 2 * owed)
        keys = np.concatenate([keys, users * ITEMS + _popular_items(rng, len(users))])
        keys.sort()
        keys = keys[np.diff(keys, prepend=-1) != 0]
        owed = np.maximum(counts - np.bincount(keys // ITEMS, minlength=USERS), 0)
    by_user_at_random = np.argsort((keys // ITEMS) << 32 | rng.integers(0, 2**32, len(keys)))
    held = np.bincount(keys // ITEMS, minlength=USERS)
    rank = np.arange(len(keys)) - np.repeat(np.cumsum(held) - held, held)
    keys = np.sort(keys[by_user_at_random[rank < np.repeat(counts, held)]])
    user, item = np.divmod(keys, ITEMS)
    del keys
    # sparse ids as in MovieLens, in a random popularity order
    item_ids = np.sort(rng.choice(131_262, ITEMS, replace=False) + 1)
    item = rng.permutation(item_ids)[item]
    # Each user rates within an active spell; minute resolution makes ties, as in MovieLens.
    spell = np.minimum(rng.exponential(3e7, USERS), LAST_TIME - FIRST_TIME).astype(np.int64)
    start = FIRST_TIME + (rng.random(USERS) * (LAST_TIME - FIRST_TIME - spell)).astype(np.int64)
    timestamp = start[user] + rng.integers(0, spell[user] // 60 + 1) * 60
    rating2 = rng.integers(1, 11, len(user))
    # a few pairs rated twice, the copy next to the original and either before or after it
    copies = np.sort(rng.choice(len(user), DUPLICATES, replace=False))
    moved = timestamp[copies] + rng.integers(-10**6, 10**6, DUPLICATES)
    columns = [np.insert(c, copies + 1, c[copies]) for c in (user + 1, item, rating2)]
    columns.append(np.insert(timestamp, copies + 1, moved))
    return columns


def _popular_items(rng, n):
    """Item indices with probability ~ 1 / (index + 50): Zipf-like, the most popular item near
    ml-20m's 0.3 % of all ratings (inverse of the continuous distribution function)."""
    span = np.log((ITEMS + 50) / 50)
    return np.minimum((50 * np.exp(rng.random(n) * span) - 50).astype(np.int64), ITEMS - 1)


def _digits(values, width):
    """values as a (len, width) array of ASCII digits, leading zeros replaced by NUL."""
    out = np.empty((len(values), width), dtype=np.uint8)
    for position in range(width):
        power = 10 ** (width - 1 - position)
        out[:, position] = values // power % 10 + ord("0")
        if position < width - 1:
            out[values < power, position] = 0
    return out


def write_csv(path, columns, chunk=2_000_000):
    """Write userId,movieId,rating,timestamp lines; np.savetxt or pandas take minutes for 20 M."""
    user, item, rating2, timestamp = columns
    comma, newline = np.full((1, 1), ord(","), np.uint8), np.full((1, 1), ord("\n"), np.uint8)
    with open(path, "wb") as f:
        f.write(b"userId,movieId,rating,timestamp\n")
        for start in range(0, len(user), chunk):
            part = slice(start, start + chunk)
            n = len(user[part])
            # rating2 is twice the rating: 1..10 -> "0.5" .. "5.0"
            rating = np.empty((n, 3), np.uint8)
            rating[:, 0] = rating2[part] // 2 + ord("0")
            rating[:, 1] = ord(".")
            rating[:, 2] = np.where(rating2[part] % 2, ord("5"), ord("0"))
            block = np.hstack([_digits(user[part], 6), comma.repeat(n, 0),
                               _digits(item[part], 6), comma.repeat(n, 0), rating,
                               comma.repeat(n, 0), _digits(timestamp[part], 10),
                               newline.repeat(n, 0)])
            f.write(block[block != 0].tobytes())


def bench_input(workdir):
    path = os.path.join(workdir, "ml-20m-shaped", "ratings.csv")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"writing {path} (once)", flush=True)
        started = time.perf_counter()
        partial = f"{path}.partial"
        write_csv(partial, ratings_columns())
        os.replace(partial, path)
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/ncf-bench",
                        help="where the input is cached and the output written")
    args = parser.parse_args(argv)
    path = bench_input(args.workdir)
    output = os.path.join(args.workdir, "converted")
    command = [sys.executable, os.path.join(REPO, "convert.py"), "--path", path,
               "--output", output]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    finished = subprocess.run(command)
    seconds = time.perf_counter() - started
    if finished.returncode:
        sys.exit(f"convert.py failed with exit code {finished.returncode}")
    # ru_maxrss is in KiB on Linux; the only child waited for is convert.py
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    verdict = "within" if seconds <= TARGET_SECONDS and peak <= TARGET_BYTES else "OUTSIDE"
    print(f"convert.py: {seconds:.1f} s wall, {peak / 1e9:.2f} GB peak RSS ({verdict} the targets "
          f"{TARGET_SECONDS} s, {TARGET_BYTES / 1e9} GB)")


if __name__ == "__main__":
    main()
