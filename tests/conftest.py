import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Real MovieLens ml-latest-small, for the tests that measure on it: its ratings.csv, as
# `./prepare_dataset.sh ml-latest-small` leaves it (/data/ml-latest-small/ratings.csv).
REAL_DATA = os.environ.get("NCF_REAL_DATA", "")


def write_clustered_dataset(directory, nb_users=300, nb_items=200, clusters=10,
                            per_user=20, negatives=100, seed=0):
    """A converted dataset (the three .pt files) with planted taste clusters.

    User u likes the items of cluster u % clusters: 80 % of its positives, the test positive
    included, come from that cluster, the rest are uniform. A model that learns the clusters
    ranks the test positive high; chance is 10 / (negatives + 1).
    """
    generator = torch.Generator().manual_seed(seed)
    cluster_items = [torch.arange(c, nb_items, clusters) for c in range(clusters)]
    train_rows, test_rows, negative_rows = [], [], []
    for user in range(nb_users):
        own = cluster_items[user % clusters]
        picks = own[torch.randperm(len(own), generator=generator)[:per_user + 1]]
        noise = torch.randint(0, nb_items, (per_user // 4,), generator=generator)
        items = torch.unique(torch.cat((picks[:-1], noise)))
        items = items[items != picks[-1]]
        train_rows += [(user, int(item)) for item in items]
        test_rows.append((user, int(picks[-1])))
        allowed = torch.ones(nb_items, dtype=torch.bool)
        allowed[items] = False
        pool = allowed.nonzero().view(-1)
        negative_rows.append(pool[torch.randint(0, len(pool), (negatives,), generator=generator)])
    os.makedirs(directory, exist_ok=True)
    torch.save(torch.tensor(train_rows, dtype=torch.int64), os.path.join(directory, "train_ratings.pt"))
    torch.save(torch.tensor(test_rows, dtype=torch.int64), os.path.join(directory, "test_ratings.pt"))
    torch.save(torch.stack(negative_rows).to(torch.int64), os.path.join(directory, "test_negatives.pt"))
    return directory


@pytest.fixture(scope="session")
def clustered_data(tmp_path_factory):
    return write_clustered_dataset(str(tmp_path_factory.mktemp("clustered")))


TINY_USERS, TINY_ITEMS = 30, 20


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 30-user, 20-item clustered directory with id maps (recommend.py reads the original
    ids: users 100.., items 500..)."""
    directory = write_clustered_dataset(str(tmp_path_factory.mktemp("tiny")),
                                        nb_users=TINY_USERS, nb_items=TINY_ITEMS, clusters=4,
                                        per_user=8, negatives=10)
    torch.save(torch.arange(TINY_USERS) + 100, os.path.join(directory, "user_ids.pt"))
    torch.save(torch.arange(TINY_ITEMS) + 500, os.path.join(directory, "item_ids.pt"))
    return directory


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, or a skip where mounting is not permitted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def full_disk(small_disk):
    """small_disk filled to its last block by a file named filler."""
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb", buffering=0) as filler:
        while True:
            filler.write(b"x" * 4096)
    return small_disk
