"""Generate MovieLens-shaped synthetic ratings in ml-20m's ``ratings.csv`` format.

The data has the shape recommenders are tuned for on MovieLens: every user has at least
``min_ratings`` ratings, user activity is lognormal (a long tail up to thousands of ratings),
item popularity is Zipf-like, no (user, item) pair repeats, and the output is seeded and
byte-identical for the same arguments.

It is also learnable. Items belong to genres and users to taste profiles; each profile has its
own affinity for every genre. A user's items are drawn from popularity x affinity, the same
distribution over the user's whole history, so the latest rating (the held-out test item) follows
the same taste as the earlier ones. Popularity alone ranks the held-out item well above chance,
but knowing the user's taste ranks it clearly better: a model has more to learn than popularity.

Output order is that of ml-20m's file: by userId, then movieId. Timestamps are independent of
that order, so a converter has to sort by time itself.
"""

import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

import cli
from fileio import atomic_output, check_replaceable, make_writable_dir, removed_if_failed

PRESETS = {
    # users, items, mean ratings per user
    "small": (1500, 1000, 50.0),
    "ml-latest-small": (610, 9724, 100836 / 610),
    "ml-20m": (138493, 26744, 20000263 / 138493),
}
MIN_RATINGS = 20

N_GENRES = 24
N_TASTES = 64
# Dirichlet concentration of a taste over genres: small values make tastes peaked on a few genres.
TASTE_CONCENTRATION = 0.15
# Share of every taste spread evenly over all genres, so no genre is ever impossible for a user.
TASTE_FLOOR = 0.1
ZIPF_EXPONENT = 1.0
# Offset of the Zipf-Mandelbrot law: flattens the head so the top item is not a tenth of all ratings.
ZIPF_OFFSET = 10.0
ACTIVITY_SIGMA = 1.3
# A user can rate at most this share of the catalogue, as the heaviest MovieLens raters do.
MAX_CATALOGUE_SHARE = 1 / 3
# MovieLens ids are sparse: ml-20m's 26,744 movies use ids up to 131,262.
ID_SPREAD = 5
# 1995-01-09 to 2015-03-31: the period ml-20m covers.
FIRST_TIME, LAST_TIME = 789652009, 1427784002
# Peak memory per rating, item and user, measured with tracemalloc (numpy's arrays) from 1 to
# 4 M ratings and 2,000 to 400,000 items (96 bytes a rating, 1,560 an item), rounded up.
BYTES_PER_RATING, BYTES_PER_ITEM, BYTES_PER_USER = 128, 2048, 64


@dataclass
class TasteModel:
    """The planted structure the ratings are drawn from."""

    movie_ids: np.ndarray  # [items] sorted original-style ids
    popularity: np.ndarray  # [items] Zipf weights, sum 1
    genre: np.ndarray  # [items] genre of each item
    affinity: np.ndarray  # [tastes, genres] mean 1 per taste
    taste: np.ndarray  # [users] taste profile of each user

    def log_scores(self, users, items):
        """Log of the (unnormalised) probability that a user picks an item: the oracle's score."""
        return np.log(self.popularity[items]) + np.log(
            self.affinity[self.taste[users], self.genre[items]]
        )


def _streams(seed):
    model_seq, sample_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(model_seq), np.random.default_rng(sample_seq)


def plant_model(n_users, n_items, seed):
    """The taste model behind ``generate_ratings`` with the same seed (for oracle checks)."""
    rng, _ = _streams(seed)
    return _plant(rng, n_users, n_items)


def _plant(rng, n_users, n_items):
    movie_ids = np.sort(rng.choice(ID_SPREAD * n_items, n_items, replace=False)) + 1
    zipf = (np.arange(n_items) + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    popularity = zipf[rng.permutation(n_items)]
    popularity /= popularity.sum()
    genre = rng.integers(N_GENRES, size=n_items)
    peaked = rng.dirichlet(np.full(N_GENRES, TASTE_CONCENTRATION), size=N_TASTES)
    affinity = N_GENRES * ((1 - TASTE_FLOOR) * peaked + TASTE_FLOOR / N_GENRES)
    taste = rng.integers(N_TASTES, size=n_users)
    return TasteModel(movie_ids, popularity, genre, affinity, taste)


def _activity(rng, n_users, mean_ratings, min_ratings, cap):
    """Ratings per user: min_ratings plus a lognormal excess, capped, averaging mean_ratings.

    The lognormal's location is solved for on the drawn sample, so the cap and the sample's own
    noise do not pull the total away from n_users * mean_ratings.
    """
    z = rng.standard_normal(n_users)

    def counts(mu):
        return np.minimum(min_ratings + np.rint(np.exp(mu + ACTIVITY_SIGMA * z)), cap)

    low, high = -20.0, np.log(cap) + 20.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if counts(mid).mean() < mean_ratings else (low, mid)
    return counts(high).astype(np.int64)


def _draw(rng, model, cdfs, users, n_draws):
    """Draw n_draws[k] items for users[k], with replacement, from popularity x affinity.

    Returns keys user * n_items + item; each user's draws are contiguous and in draw order.
    """
    n_items = len(model.popularity)
    parts = []
    tastes = model.taste[users]
    for t in np.unique(tastes):
        in_taste = tastes == t
        rows = np.repeat(users[in_taste], n_draws[in_taste])
        items = np.searchsorted(cdfs[t], rng.random(len(rows)), side="right")
        # Rounding can leave the last CDF entry a hair below 1.
        np.minimum(items, n_items - 1, out=items)
        parts.append(rows * n_items + items)
    return np.concatenate(parts)


def _sample_keys(rng, model, counts):
    """Exactly counts[u] distinct items for every user u, as sorted keys user * n_items + item.

    The first round draws counts[u] with replacement and drops repeats; each top-up round draws,
    for the users still short, enough to cover the shortfall at the rate at which their previous
    draws turned out new, and keeps the new items in draw order. Keeping draws in order makes the
    result a draw without replacement from the user's distribution, whatever the round sizes.
    """
    n_items = len(model.popularity)
    weights = model.popularity[None, :] * model.affinity[:, model.genre]
    cdfs = np.cumsum(weights, axis=1)
    cdfs /= cdfs[:, -1:]

    keys = _draw(rng, model, cdfs, np.arange(len(counts)), counts)
    keys.sort()
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    have = np.bincount(keys // n_items, minlength=len(counts))
    new_rate = np.maximum(have / counts, 0.01)
    while True:
        short = np.flatnonzero(have < counts)
        if not len(short):
            return keys
        missing = counts[short] - have[short]
        # A 20% margin over the expected need usually makes this the last round for most users.
        n_draws = np.ceil(missing / new_rate[short] * 1.2).astype(np.int64) + 2
        drawn = _draw(rng, model, cdfs, short, n_draws)
        pos = np.minimum(np.searchsorted(keys, drawn), len(keys) - 1)
        fresh = drawn[keys[pos] != drawn]
        order = np.argsort(fresh, kind="stable")
        repeat = np.zeros(len(fresh), dtype=bool)
        repeat[order[1:]] = fresh[order[1:]] == fresh[order[:-1]]
        fresh = fresh[~repeat]
        users = fresh // n_items
        n_fresh = np.bincount(users, minlength=len(counts))
        new_rate[short] = np.maximum(n_fresh[short] / n_draws, 0.001)
        # Rank of each fresh key among its user's fresh keys (a user's keys are contiguous).
        starts = np.concatenate(([0], np.flatnonzero(np.diff(users)) + 1))
        rank = np.arange(len(users)) - np.repeat(starts, np.diff(np.append(starts, len(users))))
        accepted = np.sort(fresh[rank < (counts - have)[users]])
        have += np.bincount(accepted // n_items, minlength=len(counts))
        keys = np.insert(keys, np.searchsorted(keys, accepted), accepted)


def _cover_catalogue(rng, model, keys):
    """Give every item nobody rated one rating, from a user picked by affinity to its genre.

    MovieLens lists only rated movies, so its item count is the catalogue size; this keeps the
    generated item count equal to n_items too. Adds at most a few percent of n_items rows.
    """
    n_items = len(model.popularity)
    unrated = np.flatnonzero(np.bincount(keys % n_items, minlength=n_items) == 0)
    if not len(unrated):
        return keys
    added = []
    for g in np.unique(model.genre[unrated]):
        items = unrated[model.genre[unrated] == g]
        cdf = np.cumsum(model.affinity[model.taste, g])
        users = np.searchsorted(cdf, rng.random(len(items)) * cdf[-1], side="right")
        added.append(np.minimum(users, len(cdf) - 1) * n_items + items)
    added = np.sort(np.concatenate(added))
    return np.insert(keys, np.searchsorted(keys, added), added)


def check_sizes(n_users, n_items, mean_ratings, seed, min_ratings=MIN_RATINGS):
    """The most ratings one user may get; ValueError for arguments generate_ratings cannot
    honour."""
    # Messages name the command-line flags, which match the parameters one to one.
    if n_users < 1 or n_items < 1:
        raise ValueError(f"--users {n_users} --items {n_items}: need at least one of each")
    if min_ratings < 1:
        raise ValueError(f"--min_ratings {min_ratings}: must be at least 1")
    if seed < 0:
        raise ValueError(f"--seed {seed}: must not be negative")
    if n_items < min_ratings:
        raise ValueError(f"--items {n_items}: cannot give every user --min_ratings "
                         f"{min_ratings} distinct ratings")
    cap = max(min_ratings, int(n_items * MAX_CATALOGUE_SHARE))
    if not min_ratings <= mean_ratings <= cap:
        raise ValueError(
            f"--mean_ratings {mean_ratings:g}: must lie between --min_ratings {min_ratings} and "
            f"{cap}, the most one user may rate out of {n_items} items"
        )
    return cap


def generate_ratings(n_users, n_items, mean_ratings, seed, min_ratings=MIN_RATINGS):
    """MovieLens-shaped ratings as a DataFrame (userId, movieId, rating, timestamp).

    Rows are ordered by userId, then movieId, as in ml-20m's ratings.csv. userId runs from 1 to
    n_users; movieIds are a sparse sorted set. Same arguments, same frame.
    """
    cap = check_sizes(n_users, n_items, mean_ratings, seed, min_ratings)
    model_rng, rng = _streams(seed)
    model = _plant(model_rng, n_users, n_items)
    counts = _activity(rng, n_users, mean_ratings, min_ratings, cap)
    keys = _cover_catalogue(rng, model, _sample_keys(rng, model, counts))
    users, items = np.divmod(keys, n_items)

    # People rate genres they like higher; NCF ignores ratings, this only keeps the file plausible.
    liking = np.log(model.affinity[model.taste[users], model.genre[items]])
    stars = rng.normal(3.5 + 0.3 * liking, 0.9)
    rating = np.clip(np.rint(stars * 2) / 2, 0.5, 5.0)

    # Each user is active from a random start for a lognormal span (hours to years).
    start = rng.integers(FIRST_TIME, LAST_TIME, size=n_users)
    span = np.minimum(rng.lognormal(np.log(3 * 86400), 2.5, size=n_users), LAST_TIME - start)
    timestamp = start[users] + (rng.random(len(keys)) * span[users]).astype(np.int64)

    return pd.DataFrame(
        {
            "userId": users + 1,
            "movieId": model.movie_ids[items],
            "rating": rating,
            "timestamp": timestamp,
        }
    )


def _digits(values, width):
    """ASCII digits of non-negative ints, right-aligned in `width` columns, and which to keep."""
    chars = np.empty((len(values), width), dtype=np.uint8)
    rest = values
    # Dividing by a scalar lets numpy use its fast constant-divisor path, column by column.
    for column in range(width - 1, -1, -1):
        rest, chars[:, column] = np.divmod(rest, 10)
    chars += ord("0")
    keep = values[:, None] >= 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    keep[:, -1] = True  # zero is written as "0"
    return chars, keep


def _csv_chunk(frame):
    """generate_ratings rows as CSV bytes, byte for byte what DataFrame.to_csv writes for them.

    pandas formats about a million rows a second, which alone would take most of the ml-20m
    budget; assembling digits with array arithmetic is several times faster.
    """
    rating_text = np.frombuffer(
        "".join(f"{half / 2:.1f}" for half in range(1, 11)).encode(), dtype=np.uint8
    ).reshape(10, 3)
    half_stars = np.rint(frame["rating"].to_numpy() * 2).astype(np.int64)
    fields = []
    for name in frame.columns:
        if name == "rating":
            fields.append((rating_text[half_stars - 1], np.ones((len(frame), 3), dtype=bool)))
        else:
            values = frame[name].to_numpy()
            fields.append(_digits(values, len(str(values.max()))))
    width = sum(chars.shape[1] + 1 for chars, _ in fields)
    text = np.full((len(frame), width), ord(","), dtype=np.uint8)
    text[:, -1] = ord("\n")
    keep = np.ones((len(frame), width), dtype=bool)
    at = 0
    for chars, mask in fields:
        text[:, at : at + chars.shape[1]] = chars
        keep[:, at : at + chars.shape[1]] = mask
        at += chars.shape[1] + 1
    return text[keep].tobytes()


def write_csv(frame, path, chunk_rows=1 << 20, copies=1):
    """Write ml-20m-style CSV under a temporary name beside `path`, then rename into place.

    copies: the frame's rows that many times over, one copy after the other, each copy's
    userIds past the previous copy's (copy k adds k x the frame's highest userId): the same
    shape with that many times the users and ratings, for measuring sizes beyond ml-20m
    without that much memory here.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    users = int(frame["userId"].max())
    with atomic_output(path) as temporary, open(temporary, "wb") as out:
        out.write(",".join(frame.columns).encode() + b"\n")
        for copy in range(copies):
            for begin in range(0, len(frame), chunk_rows):
                chunk = frame.iloc[begin : begin + chunk_rows]
                if copy:
                    chunk = chunk.assign(userId=chunk["userId"] + copy * users)
                out.write(_csv_chunk(chunk))


def memory_needed(n_users, n_items, mean_ratings):
    """Bytes generate_ratings and write_csv take at their peak, roughly."""
    ratings = n_users * mean_ratings
    return BYTES_PER_RATING * ratings + BYTES_PER_ITEM * n_items + BYTES_PER_USER * n_users


def check_resources(output, n_users, n_items, mean_ratings):
    """Refuse up front an output that cannot be written or sizes that cannot fit in memory,
    rather than after minutes of generating (or at the out-of-memory killer's hands).
    Returns the directories it created for the output (make_writable_dir)."""
    if os.path.isdir(output):
        raise cli.UserError(f"--output {output}: is a directory; pass a file name such as "
                            f"{os.path.join(output, 'ratings.csv')}")
    try:
        check_replaceable(output)  # before minutes of generating, not at the rename
    except OSError as err:
        raise cli.UserError(f"--output {output}: {err.strerror}; pass the name of a new or "
                            f"regular file") from None
    needed, available = memory_needed(n_users, n_items, mean_ratings), cli.available_memory()
    if available is not None and needed > available:
        raise cli.UserError(
            f"--users {n_users} --items {n_items} --mean_ratings {mean_ratings:g}: need about "
            f"{needed / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB available; "
            f"pass smaller sizes"
        )
    directory = os.path.dirname(os.path.abspath(output))
    try:
        return make_writable_dir(directory)
    except OSError as err:
        raise cli.UserError(f"--output {output}: cannot write in {directory} ({err.strerror}); "
                            f"pass a writable path") from None


def main(argv=None):
    parser = cli.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="CSV file to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="shape to imitate (default: small)")
    parser.add_argument("--users", type=int, help="number of users (overrides the preset)")
    parser.add_argument("--items", type=int, help="number of items (overrides the preset)")
    parser.add_argument("--mean_ratings", type=float,
                        help="mean ratings per user (overrides the preset)")
    parser.add_argument("--min_ratings", type=int, default=MIN_RATINGS,
                        help=f"fewest ratings any user gets (default: {MIN_RATINGS})")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    args = parser.parse_args(argv)
    # The range every tool takes, so that the seed of a generated file is one convert.py takes.
    cli.check_seed(parser, args.seed)

    n_users, n_items, mean_ratings = PRESETS[args.preset]
    n_users = n_users if args.users is None else args.users
    n_items = n_items if args.items is None else args.items
    mean_ratings = mean_ratings if args.mean_ratings is None else args.mean_ratings
    # Before the memory estimate, which a nonsense size (--mean_ratings inf) would only garble.
    try:
        check_sizes(n_users, n_items, mean_ratings, args.seed, args.min_ratings)
    except ValueError as err:
        parser.error(str(err))
    began = time.perf_counter()
    created = check_resources(args.output, n_users, n_items, mean_ratings)
    with removed_if_failed(created):
        try:
            frame = generate_ratings(n_users, n_items, mean_ratings, args.seed, args.min_ratings)
        except MemoryError:
            raise cli.UserError(f"--users {n_users} --items {n_items} --mean_ratings "
                                f"{mean_ratings:g}: ran out of memory; pass smaller sizes"
                                ) from None
        try:
            write_csv(frame, args.output)
        except OSError as err:
            raise cli.UserError(f"--output {args.output}: cannot write ({err.strerror}); pass a "
                                f"writable path with free space") from None
    print(
        f"wrote {args.output}: {n_users} users, {frame['movieId'].nunique()} items, "
        f"{len(frame)} ratings in {time.perf_counter() - began:.1f} s"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
