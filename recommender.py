"""A trained NeuMF with the data it was trained on, answering in the original user and movie ids:
what recommend.py prints and serve.py serves.

Items a user rated in training are never recommended. A user's best items are found exactly from
bounds on clusters of items (bounded_topk.py), or by scoring every item in one pass of the
factored model (scoring.py); the item side of both is computed once when the Recommender is
built.
"""
import copy
import json
import os
import re

import numpy as np
import pandas as pd
import torch

import bounded_topk
import cli
import dataloading
import scoring
import train
from checkpoint import check_matches, load_model

ID_MAPS = ("user_ids", "item_ids")
# Names of the user and item id columns in answers where metadata.json records none: MovieLens's.
DEFAULT_ID_COLUMNS = ("userId", "movieId")
# The other fields of an answer (recommend.py's CSV, serve.py's items), which the id columns'
# names must not take.
ANSWER_FIELDS = ("rank", "score", "title", "ratings")
# --precision of recommend.py and serve.py: whether a bfloat16 shortlist serves (shortlist_wanted).
PRECISIONS = ("auto", "bf16", "fp32")
_WHOLE_NUMBER = re.compile(r"[+-]?\d{1,19}", re.ASCII)
# With the bfloat16 shortlist, the items rescored in float32 for a top-k: max(SHORTLIST_MIN,
# SHORTLIST_PER_K * k) of the best by bfloat16 scores.
SHORTLIST_MIN = 100
SHORTLIST_PER_K = 4
# Pairs a bfloat16 shortlist pass scores on a CPU: at most this many items of one user's
# first-layer product and the layers after it (scoring.FactoredScorer). With AMX (2-core Sapphire
# Rapids, ml-20m shape, paired runs) all 26,744 items of a user at once ran as fast as 2**14 and
# 1.2x faster than 2**13.
BF16_CPU_CHUNK_PAIRS = 2 ** 16
# Users a Recommender tries its item bounds on before it keeps them.
BOUNDS_TRIAL_USERS = 64


def add_scoring_flags(parser):
    """recommend.py's and serve.py's --device and --precision."""
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="bf16: where the item bounds would apply (an MLP hidden layer, "
                             "4,096 items or more) but rule out too few items, a bfloat16 pass "
                             "picks max(100, 4k) items per user, which float32 scores and "
                             "orders; fp32: float32 throughout; auto (default): bf16 where the "
                             "device has native bf16. Every other path scores in float32")


class Recommender:
    """A model with the data it was trained on: scores users, hides their training items.

    precision, one of PRECISIONS: whether a bfloat16 shortlist serves where the item bounds would
    pay but were dropped (shortlist_wanted); every other path scores in float32.
    """

    def __init__(self, data_dir, checkpoint_path, device="cpu", precision="fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision!r}")
        dataset = dataloading.open_dataset(data_dir)
        train_pairs, nb_users, nb_items = dataset.train, dataset.nb_users, dataset.nb_items
        self.user_column, self.item_column = id_columns(dataset.metadata)
        # numpy arrays: int64, or str objects for ids convert.py read as text
        self.user_ids, self.item_ids = (load_id_map(data_dir, name) for name in ID_MAPS)
        for name, (path, ids), count in zip(ID_MAPS, (self.user_ids, self.item_ids),
                                            (nb_users, nb_items)):
            if len(ids) != count:
                raise cli.UserError(f"{path}: has {len(ids)} ids but the "
                                    f"ratings have {count}; re-run convert.py on this directory")
            repeated = pd.Index(ids).duplicated()
            if repeated.any():
                # Two dense ids under one original id: answers would go to the wrong one.
                raise cli.UserError(f"{path}: id {ids[repeated.argmax()]} appears twice; each "
                                    f"original id maps to one dense id, re-run convert.py on "
                                    f"this directory")
        self.user_ids, self.item_ids = self.user_ids[1], self.item_ids[1]
        self.text_ids = self.user_ids.dtype == object
        model = load_model(checkpoint_path, device).eval()
        check_matches(model.state_dict(), checkpoint_path, nb_users, nb_items)
        self.scorer = scoring.FactoredScorer(model)
        # int32 items where they fit: half the memory every request's mask reads them from.
        self.trained = scoring.TrainingItems(
            train_pairs[:, 0].to(device),
            train_pairs[:, 1].to(device, dataloading.smallest_id_dtype(nb_items)), nb_users)
        self.bounds = self.shortlist_scorer = None
        if bounded_topk.bounds_pay(self.scorer):
            # Exact top-k from a few hundred scored items a user instead of all.
            self.bounds = self._useful_bounds()
            # Where they were dropped, every item of an MLP over 4,096 or more items is scored:
            # there alone a bfloat16 pass that picks a shortlist, which float32 then scores and
            # orders, ran faster where bfloat16 is native (2.4-2.7x with AMX). A GMF, a model
            # without a hidden layer or fewer items ran as fast or slower with it, and beside
            # kept bounds it would cost a copy of the model for nothing (docs/recommendations.md).
            if self.bounds is None and shortlist_wanted(precision, device):
                chunk_pairs = BF16_CPU_CHUNK_PAIRS if torch.device(device).type == "cpu" else None
                self.shortlist_scorer = scoring.FactoredScorer(copy.deepcopy(model).bfloat16(),
                                                               chunk_pairs)
        # Ties go to the lower dense id: a stable sort keeps the answer the same run to run.
        self.ratings = torch.bincount(train_pairs[:, 1], minlength=nb_items)
        self.most_rated = torch.sort(self.ratings, descending=True, stable=True).indices
        self.position = {user: dense for dense, user in enumerate(self.user_ids.tolist())}
        self.device = device
        self.data_dir = data_dir

    def _useful_bounds(self):
        """ItemBounds of the scorer, or None when they rule out too few items for a top-10 of a
        fixed sample of users: bounds that cannot prune (random weights) cost a request about
        6 ms at the ml-20m shape before it scores every item anyway."""
        bounds = bounded_topk.ItemBounds(self.scorer)
        users = torch.randperm(self.scorer.nb_users, generator=torch.Generator().manual_seed(0))
        users = users[:BOUNDS_TRIAL_USERS].to(self.scorer.mf_items.device)
        excluded = self.trained.mask(users, self.scorer.nb_items)
        pruned = bounded_topk.bounded_top_items(self.scorer, bounds, users, excluded, 10)
        return None if pruned is None else bounds

    def _key(self, original_id):
        """An original id as the id map holds it: text ids as str; integer ids as int, from
        text too (the command line gives text)."""
        if self.text_ids:
            return str(original_id)
        if isinstance(original_id, str) and _WHOLE_NUMBER.fullmatch(original_id.strip()):
            return int(original_id)
        return original_id

    def dense_user(self, original_id):
        """The dense id of an original user id, None when the data does not hold that user."""
        return self.position.get(self._key(original_id))

    def dense_users(self, original_ids):
        """Dense ids of the given original user ids, refusing any that the data does not hold."""
        # "7" and "007" are one user
        original_ids = list(dict.fromkeys(self._key(user) for user in original_ids))
        unknown = [user for user in original_ids if user not in self.position]
        if unknown:
            raise cli.UserError(
                f"--users: unknown user id {unknown[0]}: not among the {len(self.user_ids)} users "
                f"of {self.data_dir} (convert.py drops users with fewer than --min_ratings "
                f"ratings); pass ids of users kept there")
        return torch.tensor([self.position[user] for user in original_ids], dtype=torch.int64)

    def top_items(self, users, topk):
        """(dense items, sigmoid scores), [len(users), k] each, best first; a user with fewer
        than k untrained items has its last entries' items set to -1."""
        users = users.to(self.device)
        excluded = self.trained.mask(users, len(self.item_ids))
        items, logits = best_items(self.scorer, self.shortlist_scorer, users, excluded, topk,
                                   self.bounds)
        return items.cpu(), torch.sigmoid(logits).cpu()

    def users_per_batch(self):
        """Users per call of top_items or table that keeps its [users, items] matrices small."""
        return batch_users(self.scorer, self.shortlist_scorer, self.bounds)

    def popular_items(self, topk):
        """(dense items, training ratings of each) of the k most-rated items, most first: the
        answer for a user the model does not know."""
        items = self.most_rated[:topk]
        return items, self.ratings[items]

    def table(self, users, topk):
        """One row per recommendation: user (named user_column), rank (from 1), item (named
        item_column), score."""
        items, scores = self.top_items(users, topk)
        kept = items >= 0
        rows, columns = kept.nonzero(as_tuple=True)
        return pd.DataFrame({
            self.user_column: self.user_ids[users[rows].numpy()],
            "rank": (columns + 1).numpy(),
            self.item_column: self.item_ids[items[kept].numpy()],
            "score": scores[kept].numpy(),
        })


def id_columns(metadata):
    """(user column, item column) of answers: the names of the columns convert.py read the ids
    from, as metadata.json records them (user_column, item_column); MovieLens's where it
    records none, or names that would clash with each other or another field of an answer."""
    names = tuple((metadata or {}).get(key) for key in ("user_column", "item_column"))
    if (all(isinstance(name, str) and name for name in names) and names[0] != names[1]
            and not set(names) & set(ANSWER_FIELDS)):
        return names
    return DEFAULT_ID_COLUMNS


def native_bf16(device):
    """Whether the device runs bfloat16 products natively (a CPU with AMX or AVX512_BF16, a CUDA
    device with bf16): emulated, on an AVX2-only CPU, they run slower than float32."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return train.cpu_has_native_bf16()


def shortlist_wanted(precision, device):
    """Whether --precision (PRECISIONS) takes the bfloat16 shortlist where it applies: bf16
    always, auto where the device has native bf16, fp32 never."""
    return precision == "bf16" or precision == "auto" and native_bf16(device)


def load_id_map(data_dir, name):
    """(path, ids) of the id map NAME that convert.py wrote: NAME.json (a list of str, for text
    ids) when there is one, else NAME.pt (int64)."""
    path = os.path.join(data_dir, f"{name}.json")
    if not os.path.exists(path):
        return (os.path.join(data_dir, f"{name}.pt"),
                dataloading.load_tensor(data_dir, f"{name}.pt", 1).numpy())
    try:
        with open(path, "rb") as handle:
            ids = json.load(handle)
    except (OSError, ValueError) as error:
        raise cli.UserError(f"{path}: cannot be read ({type(error).__name__}); re-run "
                            "convert.py to rewrite it") from None
    if not isinstance(ids, list) or not all(isinstance(value, str) for value in ids):
        raise cli.UserError(f"{path}: not a JSON list of text ids; re-run convert.py to "
                            "rewrite it")
    return path, np.array(ids, dtype=object)


def batch_users(scorer, shortlist_scorer, bounds):
    """Users per best_items call that keeps its [users, items] matrices small."""
    if bounds is not None:
        return bounded_topk.bounded_users_per_batch(scorer.nb_items)
    return scoring.users_per_batch(scorer.nb_items, (shortlist_scorer or scorer).chunk_pairs)


def best_items(scorer, shortlist_scorer, users, excluded, topk, bounds=None):
    """(dense items, float32 logits), [len(users), k] each, of each user's best items that
    `excluded` [len(users), nb_items] does not hide; -1 items where fewer are left.

    With bounds (a bounded_topk.ItemBounds of scorer), only the items that can be among the best
    are scored (bounded_topk.bounded_top_items), unless the bounds keep too many; then every item
    is. With a shortlist_scorer (a bfloat16 FactoredScorer), that picks max(SHORTLIST_MIN,
    SHORTLIST_PER_K * k) items and the float32 scorer orders those: the answer differs from
    float32 over all items only where bfloat16 rounding drops a top-k item from the shortlist.
    """
    with torch.inference_mode():
        if bounds is not None:
            best = bounded_topk.bounded_top_items(scorer, bounds, users, excluded, topk)
            if best is not None:
                return best
        if shortlist_scorer is None:
            return scoring.top_items(scorer(users), excluded, topk)
        size = min(scorer.nb_items, max(SHORTLIST_MIN, SHORTLIST_PER_K * topk))
        shortlist, _ = scoring.top_items(shortlist_scorer(users), excluded, size)
        logits = scorer.candidates(users, shortlist.clamp(min=0))
        picked, logits = scoring.top_items(logits, shortlist < 0, topk)
        return shortlist.gather(1, picked.clamp(min=0)).masked_fill(picked < 0, -1), logits


def titles_note(titles, item_ids, path):
    """A note for when no movieId of `titles` (load_titles) is an item of the data, whose titles
    would all come out blank; None when some match, or without titles."""
    if titles is None or pd.Index(item_ids).isin(titles.index).any():
        return None
    return (f"note: --movies {path}: none of its movieIds is an item of the data; titles stay "
            f"blank (pass the movies file of the ratings that convert.py read)")


def _dat_fields(line):
    """(movie id, title) of a movies.dat line, MovieID::Title::Genres; None if it is not one. A
    title may hold ':' (`Star Wars: Episode IV`), so only the first and last '::' separate."""
    movie, _, rest = line.partition("::")
    title, separator, _ = rest.rpartition("::")
    return (movie, title) if separator else None


def _item_fields(line):
    """(movie id, title) of a u.item line, movie id|title|release date|...; None if it is not
    one."""
    fields = line.split("|")
    return (fields[0], fields[1]) if len(fields) > 2 else None


# The headerless title files, by name as load.py tells ratings files apart: how a line splits,
# and what it holds.
_TITLE_FILES = {
    "movies.dat": (_dat_fields, "MovieID::Title::Genres (ml-1m, ml-10m)"),
    "u.item": (_item_fields, "movie id|title|release date|... (ml-100k)"),
}


def load_titles(path):
    """movieId -> title from MovieLens titles, told apart by file name as the ratings are:
    ml-100k's u.item, ml-1m's and ml-10m's movies.dat, or else a movies.csv with columns movieId
    and title."""
    if not os.path.isfile(path):
        raise cli.UserError(f"--movies {path}: not found; pass MovieLens movies.csv, movies.dat "
                            f"or u.item")
    name = os.path.basename(path)
    if name in _TITLE_FILES:
        return _headerless_titles(path, *_TITLE_FILES[name])
    try:
        movies = pd.read_csv(path, usecols=["movieId", "title"])
    except (ValueError, pd.errors.ParserError) as error:
        reason = str(error).splitlines()[0]
        raise cli.UserError(f"--movies {path}: expected MovieLens movies.csv with columns "
                            f"movieId,title ({reason}); pass that file, or u.item or movies.dat "
                            f"under its own name") from None
    except OSError as error:
        raise cli.UserError(f"--movies {path}: cannot read ({error.strerror}); pass a "
                            f"readable movies.csv") from None
    return movies.drop_duplicates("movieId").set_index("movieId")["title"]


def _headerless_titles(path, fields, layout):
    """load_titles of a u.item or movies.dat: `fields` splits a line, `layout` names it."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise cli.UserError(f"--movies {path}: cannot read ({error.strerror}); pass a "
                            f"readable file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # ml-100k's u.item and ml-1m's movies.dat are latin-1 (ml-10m's is UTF-8): latin-1 text
        # with accents is never valid UTF-8.
        text = raw.decode("latin-1")
    movies, titles = [], []
    # split("\n"), not splitlines(): that also splits at latin-1's NEL (0x85), part of a title.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line:
            continue
        parsed = fields(line)
        if (parsed is None or not _WHOLE_NUMBER.fullmatch(parsed[0])
                or not -2 ** 63 <= int(parsed[0]) < 2 ** 63):
            raise cli.UserError(f"--movies {path}: line {number} is not {layout}; pass that "
                                f"file as MovieLens ships it")
        movies.append(int(parsed[0]))
        titles.append(parsed[1])
    titles = pd.Series(titles, index=pd.Index(movies, dtype="int64", name="movieId"),
                       name="title", dtype=object)
    return titles[~titles.index.duplicated()]
