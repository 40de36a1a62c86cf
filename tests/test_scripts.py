"""The dataset shell helpers, run offline: curl and wget are replaced by stubs on PATH."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("download_dataset.sh", "verify_dataset.sh", "prepare_dataset.sh")
ML20M_MD5 = "cd245b17a1ae2cc31bb14903e1204af3"

# Serves the file named by $FAKE_DOWNLOAD for any URL (to -o FILE, else to stdout) and logs
# the URL; fails without it.
FAKE_CURL = """#!/usr/bin/env bash
out=/dev/stdout; url=
while [ $# -gt 0 ]; do
    case "$1" in -o) out=$2; shift ;; -*) ;; *) url=$1 ;; esac
    shift
done
echo "$url" >> "$FAKE_LOG"
[ -n "${FAKE_DOWNLOAD:-}" ] && cat "$FAKE_DOWNLOAD" > "$out"
"""


@pytest.fixture
def offline(tmp_path):
    """Environment whose curl and wget never touch the network."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("curl", FAKE_CURL), ("wget", "#!/bin/sh\nexit 4\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
               FAKE_LOG=str(tmp_path / "urls.log"))
    env.pop("FAKE_DOWNLOAD", None)
    return env


def run(script, *args, env, cwd=ROOT, workdir=None):
    return subprocess.run(["bash", str(Path(cwd) / script), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=workdir)


def one_line_error(done, *fragments):
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_usage(script, offline):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
    done = run(script, "-h", env=offline)
    assert done.returncode == 0 and done.stdout.startswith(f"Usage: {script}")


@pytest.mark.parametrize("script,args", [
    ("download_dataset.sh", ["ml-1b"]),
    ("verify_dataset.sh", ["ml-1b", "x.zip"]),
    ("prepare_dataset.sh", ["ml-1b", "{raw}"]),
])
def test_unknown_dataset_lists_the_known_ones(script, args, offline, tmp_path):
    done = run(script, *(arg.format(raw=tmp_path / "raw") for arg in args), env=offline)
    one_line_error(done, "unknown dataset 'ml-1b'", "ml-100k", "ml-20m", "ml-latest-small")
    if script == "prepare_dataset.sh":
        # read as the 2023 original reads other datasets, from a ratings.csv it did not find
        assert (f"neither {tmp_path}/raw/ratings.csv nor {tmp_path}/raw/ml-1b/ratings.csv to read "
                f"it from; put its ratings there, or name one of") in done.stderr


def test_wrong_arguments_exit_2(offline):
    for script, args in [("download_dataset.sh", []), ("verify_dataset.sh", []),
                         ("verify_dataset.sh", ["ml-20m", "a.zip", "b.zip"]),
                         ("prepare_dataset.sh", ["a", "b", "c", "d"])]:
        done = run(script, *args, env=offline)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (script, done.stderr)


def test_verify_rejects_a_wrong_archive(offline, tmp_path):
    fake = tmp_path / "ml-20m.zip"
    fake.write_bytes(b"not the real ml-20m")
    one_line_error(run("verify_dataset.sh", "ml-20m", fake, env=offline),
                   str(fake), "does not match", ML20M_MD5)
    one_line_error(run("verify_dataset.sh", "ml-20m", tmp_path / "none.zip", env=offline),
                   "no such file")
    assert not (tmp_path / "urls.log").exists()


def test_verify_without_a_built_in_sum_needs_the_network(offline, tmp_path):
    fake = tmp_path / "ml-32m.zip"
    fake.write_bytes(b"zip")
    one_line_error(run("verify_dataset.sh", "ml-32m", fake, env=offline),
                   "cannot fetch the published MD5")
    assert (tmp_path / "urls.log").read_text() == (
        "https://files.grouplens.org/datasets/movielens/ml-32m.zip.md5\n")


def test_verify_with_the_dataset_alone_prints_passed_or_failed(offline, tmp_path):
    """The original's form: DATASET.zip in the current directory."""
    (tmp_path / "ml-20m.zip").write_bytes(b"not the real ml-20m")
    done = run("verify_dataset.sh", "ml-20m", env=offline, workdir=tmp_path)
    assert done.stdout == "FAILED\n"
    one_line_error(done, "ml-20m.zip: MD5", "does not match")
    (tmp_path / "ml-20m.zip").unlink()
    done = run("verify_dataset.sh", "ml-20m", env=offline, workdir=tmp_path)
    assert done.stdout == "FAILED\n"
    one_line_error(done, "ml-20m.zip: no such file")
    # ml-32m's sum is fetched: the stub serves one that matches
    (tmp_path / "ml-32m.zip").write_bytes(b"archive")
    published = tmp_path / "ml-32m.zip.md5"
    published.write_text(f"MD5 (ml-32m.zip) = {hashlib.md5(b'archive').hexdigest()}\n")
    done = run("verify_dataset.sh", "ml-32m", env=dict(offline, FAKE_DOWNLOAD=str(published)),
               workdir=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "PASSED\n", "")
    done = run("verify_dataset.sh", "ml-32m", env=offline, workdir=tmp_path)
    assert done.stdout == "FAILED\n"
    one_line_error(done, "cannot fetch the published MD5")


def test_download_renames_only_a_complete_file(offline, tmp_path):
    raw = tmp_path / "raw"
    one_line_error(run("download_dataset.sh", "ml-1m", raw, env=offline), "download of")
    assert list(raw.iterdir()) == []
    served = tmp_path / "served.zip"
    served.write_bytes(b"archive")
    done = run("download_dataset.sh", "ml-1m", raw, env=dict(offline, FAKE_DOWNLOAD=str(served)))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in raw.iterdir()] == ["ml-1m.zip"]
    assert (raw / "ml-1m.zip").read_bytes() == b"archive"
    assert (tmp_path / "urls.log").read_text().splitlines()[-1] == (
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip")
    assert "already downloaded" in run("download_dataset.sh", "ml-1m", raw, env=offline).stdout


@pytest.fixture
def stubbed(tmp_path):
    """A copy of the scripts whose convert.py only records its arguments (and verify passes)."""
    home = tmp_path / "repo"
    home.mkdir()
    for script in SCRIPTS:
        shutil.copy(ROOT / script, home / script)
    (home / "verify_dataset.sh").write_text("#!/bin/sh\necho verified \"$@\"\n")
    (home / "convert.py").write_text(
        "import json, os, sys\n"
        "out = sys.argv[sys.argv.index('--output') + 1]\n"
        "os.makedirs(out, exist_ok=True)\n"
        "json.dump(sys.argv[1:], open(os.path.join(out, 'metadata.json'), 'w'))\n")
    return home


def test_prepare_downloads_unpacks_converts_then_reuses(stubbed, offline, tmp_path):
    served = tmp_path / "ml-10m.zip"
    with zipfile.ZipFile(served, "w") as archive:
        archive.writestr("ml-10M100K/ratings.dat", "1::2::5::978300760\n")
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    env = dict(offline, FAKE_DOWNLOAD=str(served))
    done = run("prepare_dataset.sh", "ml-10m", raw, cache, env=env, cwd=stubbed)
    assert done.returncode == 0, done.stderr
    assert "verified ml-10m" in done.stdout
    assert sorted(p.name for p in raw.iterdir()) == ["ml-10M100K", "ml-10m.zip"]
    assert (cache / "metadata.json").read_text() == (
        f'["--path", "{raw}/ml-10M100K/ratings.dat", "--output", "{cache}"]')
    again = run("prepare_dataset.sh", "ml-10m", raw, cache, env=offline, cwd=stubbed)
    assert again.returncode == 0 and again.stdout == f"using cache {cache}\n"


def test_prepare_stops_on_a_bad_archive(stubbed, offline, tmp_path):
    shutil.copy(ROOT / "verify_dataset.sh", stubbed / "verify_dataset.sh")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ml-20m.zip").write_bytes(b"truncated")
    done = run("prepare_dataset.sh", "ml-20m", raw, env=offline, cwd=stubbed)
    one_line_error(done, "does not match")
    assert [p.name for p in raw.iterdir()] == ["ml-20m.zip"]
    assert not (tmp_path / "urls.log").exists()


def test_prepare_synthetic_end_to_end(offline, tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    done = run("prepare_dataset.sh", "synthetic-small", raw, cache, env=offline)
    assert done.returncode == 0, done.stderr
    assert (raw / "synthetic-small" / "ratings.csv").is_file()
    for name in ("train_ratings.pt", "test_ratings.pt", "test_negatives.pt", "metadata.json"):
        assert (cache / name).is_file(), name
    again = run("prepare_dataset.sh", "synthetic-small", raw, cache, env=offline)
    assert again.returncode == 0 and again.stdout == f"using cache {cache}\n"
    assert not (tmp_path / "urls.log").exists()


ORIGINAL_FILES = ["test_negatives.pt", "test_ratings.pt", "train_ratings.pt"]


@pytest.mark.parametrize("files,reused,message", [
    (ORIGINAL_FILES, True, "using cache {cache} (no metadata.json: converted by the original "
                           "convert.py)"),
    (ORIGINAL_FILES + ["metadata.json", "user_ids.pt"], True, "using cache {cache}"),
    (ORIGINAL_FILES + ["metadata.json", ".converting"], False,
     "{cache}: an earlier conversion did not finish; converting again"),
    (ORIGINAL_FILES + [".converting"], False, "did not finish; converting again"),
    (ORIGINAL_FILES + ["user_ids.pt"], False, "prepared {cache}"),
    (ORIGINAL_FILES + ["item_ids.pt"], False, "prepared {cache}"),
    (ORIGINAL_FILES[1:], False, "prepared {cache}"),
    ([], False, "prepared {cache}"),
])
def test_prepare_reuses_only_a_finished_cache(stubbed, offline, tmp_path, files, reused, message):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    (raw / "ml-1m").mkdir(parents=True)
    (raw / "ml-1m" / "ratings.dat").write_text("1::2::5::978300760\n")
    cache.mkdir()
    for name in files:
        (cache / name).write_text("kept")
    done = run("prepare_dataset.sh", "ml-1m", raw, cache, env=offline, cwd=stubbed)
    assert done.returncode == 0, done.stderr
    assert message.format(cache=cache) in done.stdout
    # the stub convert.py writes its arguments into metadata.json
    metadata = cache / "metadata.json"
    assert (metadata.exists() and "--output" in metadata.read_text()) != reused
    assert all((cache / name).read_text() == "kept" for name in files if name != "metadata.json")


def published_md5_file(tmp_path, text):
    published = tmp_path / "published.md5"
    published.write_text(text)
    return published


def test_verify_reads_names_md5sum_would_mangle(offline, tmp_path):
    """md5sum takes "-x.zip" for an option and prefixes the sum of a name with a backslash
    with "\\": both good archives were refused."""
    digest = hashlib.md5(b"archive").hexdigest()
    published = published_md5_file(tmp_path, f"MD5 (ml-32m.zip) = {digest}\n")
    env = dict(offline, FAKE_DOWNLOAD=str(published))
    for name in ("-x.zip", "back\\slash.zip"):
        (tmp_path / name).write_bytes(b"archive")
        done = run("verify_dataset.sh", "ml-32m", name, env=env, workdir=tmp_path)
        assert (done.returncode, done.stdout, done.stderr) == (
            0, f"{name}: MD5 matches the published one for ml-32m\n", ""), name


@pytest.mark.parametrize("template", [
    "MD5 (ml-32m.zip) = {}\n",
    "{}  ml-32m.zip\n",
    "MD5 (ml-32m.zip) = {} \r\n",
    "{}",
])
def test_verify_finds_the_published_sum_in_either_format(offline, tmp_path, template):
    (tmp_path / "ml-32m.zip").write_bytes(b"archive")
    digest = hashlib.md5(b"archive").hexdigest().upper()
    published = published_md5_file(tmp_path, template.format(digest))
    done = run("verify_dataset.sh", "ml-32m", env=dict(offline, FAKE_DOWNLOAD=str(published)),
               workdir=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "PASSED\n", "")


def test_verify_refuses_a_published_file_without_a_sum(offline, tmp_path):
    (tmp_path / "ml-32m.zip").write_bytes(b"archive")
    published = published_md5_file(tmp_path, "<html>Not Found</html>\n")
    done = run("verify_dataset.sh", "ml-32m", env=dict(offline, FAKE_DOWNLOAD=str(published)),
               workdir=tmp_path)
    assert done.stdout == "FAILED\n"
    one_line_error(done, "no MD5 in the file published for ml-32m")


def test_download_into_an_impossible_folder_is_one_line(offline, tmp_path):
    (tmp_path / "file").write_text("")
    raw = tmp_path / "file" / "raw"
    done = run("download_dataset.sh", "ml-1m", raw, env=dict(offline, LC_ALL="C"))
    assert done.stderr == f"download_dataset.sh: cannot create {raw}: Not a directory\n"
    assert done.returncode == 1 and not (tmp_path / "urls.log").exists()


def served_ml10m(tmp_path):
    served = tmp_path / "served.zip"
    with zipfile.ZipFile(served, "w") as archive:
        archive.writestr("ml-10M100K/ratings.dat", "1::2::5::978300760\n")
    return served


def test_prepare_without_unzip_says_so_before_downloading(stubbed, offline, tmp_path):
    """Without unzip the archive was downloaded and verified, then the user was told to delete
    it and download it again."""
    bin_dir = tmp_path / "bin"
    for tool in ("bash", "basename", "dirname", "mkdir", "mktemp", "mv", "rm", "cat", "cut",
                 "tr", "md5sum"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    raw = tmp_path / "raw"
    env = dict(offline, PATH=str(bin_dir), FAKE_DOWNLOAD=str(served_ml10m(tmp_path)))
    done = run("prepare_dataset.sh", "ml-10m", raw, env=env, cwd=stubbed)
    one_line_error(done, f"needs unzip to unpack {raw}/ml-10m.zip; install it")
    assert not raw.exists() and not (tmp_path / "urls.log").exists()


# Leaves a partial ratings file where it was asked to unpack, then fails as $FAKE_UNZIP_STATUS
# says, with unzip's kind of messages; records what its stdin is.
FAKE_UNZIP = """#!/usr/bin/env bash
readlink /proc/self/fd/0 > "$FAKE_UNZIP_STDIN"
mkdir -p "$4/ml-10M100K"
echo "1::2::5" > "$4/ml-10M100K/ratings.dat"
echo "$4/ml-10M100K/ratings.dat:  write error (disk full?).  Continue? (y/n/^C) "
echo "warning:  $4/ml-10M100K/ratings.dat is probably truncated" >&2
exit "$FAKE_UNZIP_STATUS"
"""


@pytest.mark.parametrize("status,message", [
    (50, "disk full while unpacking {zip} into {raw}; free space there and rerun"),
    (2, "cannot unpack {zip} into {raw} (unzip: {raw}/.unzip."),
])
def test_prepare_unzip_failure_is_one_line_and_leaves_nothing(stubbed, offline, tmp_path,
                                                              status, message):
    """The archive has matched its MD5, so the old advice to delete it was wrong; unzip's
    prompt and warnings came before it."""
    unzip = Path(offline["PATH"].split(":")[0]) / "unzip"
    unzip.write_text(FAKE_UNZIP)
    unzip.chmod(0o755)
    raw = tmp_path / "raw"
    env = dict(offline, FAKE_DOWNLOAD=str(served_ml10m(tmp_path)),
               FAKE_UNZIP_STATUS=str(status), FAKE_UNZIP_STDIN=str(tmp_path / "stdin"))
    done = run("prepare_dataset.sh", "ml-10m", raw, tmp_path / "cache", env=env, cwd=stubbed)
    one_line_error(done, message.format(zip=raw / "ml-10m.zip", raw=raw))
    assert "delete" not in done.stderr
    assert (tmp_path / "stdin").read_text() == "/dev/null\n"
    assert [p.name for p in raw.iterdir()] == ["ml-10m.zip"]
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def make_copy(tmp_path):
    """The Makefile in a folder of its own, set up already, with a python that records its
    arguments: its recipes run without touching the repository."""
    home = tmp_path / "make"
    home.mkdir()
    shutil.copy(ROOT / "Makefile", home / "Makefile")
    for name in ("requirements.txt", "requirements-test.txt", "requirements-optional.txt"):
        (home / name).write_text("")
    (home / ".venv" / "bin").mkdir(parents=True)
    recorder = home / ".venv" / "bin" / "python"
    recorder.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                        "print(json.dumps(sys.argv[1:]), file=open('calls.log', 'a'))\n")
    recorder.chmod(0o755)
    stamp = home / ".venv" / ".installed"
    stamp.touch()
    later = os.stat(home / "Makefile").st_mtime + 10
    os.utime(stamp, (later, later))
    return home


def make(home, *args):
    return subprocess.run(["make", "-s", *args], cwd=home, capture_output=True, text=True)


def test_make_demo_and_clean_keep_a_demo_dir_with_a_space_whole(make_copy):
    done = make(make_copy, "demo", "DEMO_DIR=my demo", "DEMO_EPOCHS=1")
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (make_copy / "calls.log").read_text().splitlines()]
    assert calls == [
        ["generate.py", "--preset", "small", "--output", "my demo/raw/ratings.csv"],
        ["convert.py", "--path", "my demo/raw/ratings.csv", "--output", "my demo/data"],
        ["ncf.py", "--data", "my demo/data", "--epochs", "1", "-b", "16384",
         "--checkpoint_dir", "my demo/checkpoints", "--log_path", "my demo/log.json"],
    ]
    for name in ("my", "demo", "my demo"):
        (make_copy / name).mkdir()
    assert make(make_copy, "clean", "DEMO_DIR=my demo").returncode == 0
    assert (make_copy / "my").is_dir() and (make_copy / "demo").is_dir()
    assert not (make_copy / "my demo").exists()


def test_gpu_check_names_its_time_limit(offline, tmp_path):
    """timeout kills a hung run with no word: the user saw only the exit status 124."""
    fake = Path(offline["PATH"].split(":")[0]) / "timeout"
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$FAKE_TIMEOUT_ARGS\"\nexit 124\n")
    fake.chmod(0o755)
    env = dict(offline, FAKE_TIMEOUT_ARGS=str(tmp_path / "args"))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", "x"],
                          capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (124, "")
    assert done.stderr == ("gpu_check.sh: stopped after 8 minutes (a hung GPU kernel?); what it "
                           "measured by then is in gpu_check.md under --out\n")
    assert (tmp_path / "args").read_text() == (
        f"480 {sys.executable} {ROOT}/scripts/gpu_check.py --out x\n")


def test_make_setup_pins_the_cpu_torch_before_the_requirements(make_copy):
    """requirements.txt's torch range alone would fetch PyPI's multi-GB CUDA build."""
    (make_copy / ".venv" / ".installed").unlink()
    done = make(make_copy, "-n", "setup")
    assert done.returncode == 0, done.stderr
    installs = [line for line in done.stdout.splitlines() if " pip install " in line]
    assert installs == [
        ".venv/bin/python -m pip install -q --upgrade pip",
        ".venv/bin/python -m pip install -q torch==2.13.0",
        ".venv/bin/python -m pip install -q -r requirements-test.txt -r requirements-optional.txt",
    ]


def recorded_arguments(cache):
    """What the stub convert.py was run with (it writes them into metadata.json)."""
    return json.loads((cache / "metadata.json").read_text())


@pytest.mark.parametrize("place, header, flags", [
    ("raw", "user,item,time", ["--first_columns"]),
    ("raw/mine", "0, 17, 38308", ["--first_columns"]),
    ("raw", "\ufeffuserId,movieId,rating,timestamp", []),
    ("raw/mine", '"userId","movieId","rating","timestamp"', []),
    ("raw", "userId, movieId, rating, timestamp", ["--first_columns"]),
    ("raw", "userId,userId,userId", ["--first_columns"]),
], ids=["RAW_DIR, other header", "RAW_DIR/DATASET, like_movielens", "MovieLens header",
        "MovieLens header quoted", "names with spaces, as load.py reads them",
        "one name three times"])
def test_prepare_reads_an_unknown_dataset_as_the_2023_original(stubbed, offline, tmp_path, place,
                                                               header, flags):
    """It refused any name it did not know; the 2023 original reads RAW_DATADIR/ratings.csv
    (default /data/DATASET) by its first three columns."""
    ratings = tmp_path / place / "ratings.csv"
    ratings.parent.mkdir(parents=True)
    ratings.write_text(f"{header}\n1,2,3\n", encoding="utf-8")
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    done = run("prepare_dataset.sh", "mine", raw, cache, env=offline, cwd=stubbed)
    assert done.returncode == 0, done.stderr
    how = ("by its MovieLens header (userId, movieId, timestamp)" if not flags else
           "as the 2023 original reads an unknown dataset: user, item, timestamp in its first "
           "three columns after a header line")
    assert done.stderr == (f"prepare_dataset.sh: note: unknown dataset 'mine': converting "
                           f"{ratings}, read {how}\n")
    assert recorded_arguments(cache) == ["--path", str(ratings), "--output", str(cache), *flags]
    assert done.stdout == f"prepared {cache}\n"
    again = run("prepare_dataset.sh", "mine", raw, cache, env=offline, cwd=stubbed)
    assert again.returncode == 0 and again.stdout == f"using cache {cache}\n"


def test_prepare_converts_an_unknown_dataset_end_to_end(offline, tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    raw.mkdir()
    (raw / "ratings.csv").write_text("customer,product,when\n" + "".join(
        f"{user},{(user * 3 + step) % 40},{step}\n" for user in range(5) for step in range(25)))
    done = run("prepare_dataset.sh", "shop", raw, cache, env=offline)
    assert done.returncode == 0, done.stderr
    metadata = json.loads((cache / "metadata.json").read_text())
    assert (metadata["reader"], metadata["users"], metadata["user_column"]) == (
        "csv-first-columns", 5, "customer")


def ml20m_archive(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ml-20m/ratings.csv", "userId,movieId,rating,timestamp\n1,2,5,3\n")
    return path


def test_prepare_takes_the_archive_where_the_2023_readme_puts_it(stubbed, offline, tmp_path):
    """Its step 4 puts ml-20m.zip in /data/ml-20m, which stopped us: `/data/ml-20m exists but
    holds no ratings.csv`. It is unpacked there, as the 2023 original does."""
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    (raw / "ml-20m").mkdir(parents=True)
    ml20m_archive(raw / "ml-20m" / "ml-20m.zip")
    done = run("prepare_dataset.sh", "ml-20m", raw, cache, env=offline, cwd=stubbed)
    assert done.returncode == 0, done.stderr
    assert f"verified ml-20m {raw}/ml-20m/ml-20m.zip" in done.stdout
    ratings = raw / "ml-20m" / "ml-20m" / "ratings.csv"
    assert ratings.is_file() and sorted(p.name for p in (raw / "ml-20m").iterdir()) == [
        "ml-20m", "ml-20m.zip"]
    assert recorded_arguments(cache) == ["--path", str(ratings), "--output", str(cache)]
    assert not (tmp_path / "urls.log").exists()
    # unpacked there already: used as it is
    (cache / "metadata.json").unlink()
    again = run("prepare_dataset.sh", "ml-20m", raw, cache, env=offline, cwd=stubbed)
    assert again.returncode == 0 and f"using {ratings}\n" in again.stdout


def test_prepare_prefers_the_archive_in_raw_dir(stubbed, offline, tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    (raw / "ml-20m").mkdir(parents=True)
    ml20m_archive(raw / "ml-20m.zip")
    (raw / "ml-20m" / "ml-20m.zip").write_bytes(b"another copy")
    done = run("prepare_dataset.sh", "ml-20m", raw, cache, env=offline, cwd=stubbed)
    one_line_error(done, f"{raw}/ml-20m exists but holds no ratings.csv; move it away")
    (raw / "ml-20m" / "ml-20m.zip").unlink()
    (raw / "ml-20m").rmdir()
    done = run("prepare_dataset.sh", "ml-20m", raw, cache, env=offline, cwd=stubbed)
    assert done.returncode == 0, done.stderr
    assert recorded_arguments(cache)[1] == str(raw / "ml-20m" / "ratings.csv")


def test_prepare_reuses_a_cache_of_the_2023_original(stubbed, offline, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "feature_spec.yaml").write_text("kept")
    done = run("prepare_dataset.sh", "ml-1m", tmp_path / "raw", cache, env=offline, cwd=stubbed)
    assert (done.returncode, done.stdout) == (0, f"using cache {cache} (feature_spec.yaml, no "
                                                 f"metadata.json: converted by the 2023 "
                                                 f"original)\n")
    assert os.listdir(cache) == ["feature_spec.yaml"]
