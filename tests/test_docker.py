"""The Dockerfile without a Docker engine: what it copies and runs is in the repository and
reaches the image, and pip inside it keeps the image's CUDA build of torch."""

import glob
import os
import re
import shlex

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torch as each NGC PyTorch release ships it (its release notes; `pip list` in the image).
NGC_TORCH = {"24.05": "2.4.0a0+07cecf4168.nv24.05"}
# What a user runs inside the container (README) and what that imports or calls.
IMAGE_NEEDS = ("*.py", "*.sh", "requirements*.txt", "Makefile", "logger/*.py", "scripts/*",
               "tests/*.py")
# Build-context ballast that must stay out: environments, history, data, outputs, caches.
CONTEXT_BALLAST = (".git/HEAD", ".venv/bin/python", "__pycache__/ncf.cpython-311.pyc",
                   "logger/__pycache__/__init__.cpython-311.pyc", "tests/__pycache__/x.pyc",
                   ".pytest_cache/v/cache/lastfailed", "data/ml-20m.zip",
                   "data/cache/ml-20m/train_ratings.pt", "runs/demo/checkpoints/model.pth",
                   "checkpoints/last.pth", "gpu_check_out/gpu_check.json", "log.json")


def instructions(text):
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    result = []
    for line in joined:
        keyword, _, arguments = line.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def words(arguments):
    """Arguments of COPY/ADD/CMD/ENTRYPOINT, exec (JSON) or shell form, options dropped."""
    if arguments.startswith("["):
        parts = re.findall(r'"((?:[^"\\]|\\.)*)"', arguments)
    else:
        parts = shlex.split(arguments)
    return [part for part in parts if not part.startswith("--")]


def ignore_rules(text):
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        rules.append((negated, to_regex(pattern.strip().lstrip("/").removeprefix("./"))))
    return rules


def to_regex(pattern):
    """A .dockerignore pattern (Go filepath.Match plus **) as a regular expression."""
    out, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out, index = out + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            out, index = out + ".*", index + 2
        elif pattern[index] == "*":
            out, index = out + "[^/]*", index + 1
        elif pattern[index] == "?":
            out, index = out + "[^/]", index + 1
        else:
            out, index = out + re.escape(pattern[index]), index + 1
    return re.compile(out.rstrip("/"))


def excluded(path, rules):
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    verdict = False
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            verdict = not negated
    return verdict


def read(name):
    with open(os.path.join(ROOT, name)) as handle:
        return handle.read()


@pytest.fixture(scope="module")
def dockerfile():
    return instructions(read("Dockerfile"))


@pytest.fixture(scope="module")
def rules():
    return ignore_rules(read(".dockerignore"))


def repo_files_needed():
    found = set()
    for pattern in IMAGE_NEEDS:
        found.update(os.path.relpath(path, ROOT)
                     for path in glob.glob(os.path.join(ROOT, pattern)) if os.path.isfile(path))
    return sorted(found)


def test_ignore_matcher_follows_docker_rules():
    assert excluded("ncf.py", ignore_rules("ncf.py"))
    assert not excluded("ncf.py", ignore_rules("*.py\n!ncf.py"))
    assert excluded("logger/__init__.py", ignore_rules("logger"))
    assert not excluded("a/b.pyc", ignore_rules("*.pyc"))
    assert excluded("a/b.pyc", ignore_rules("**/*.pyc"))
    assert excluded("b.pyc", ignore_rules("**/*.pyc"))
    assert not excluded("dataloading.py", ignore_rules("data"))


def test_base_image_is_an_ngc_pytorch_release(dockerfile):
    args = dict(arguments.partition("=")[::2] for keyword, arguments in dockerfile
                if keyword == "ARG")
    image = [arguments for keyword, arguments in dockerfile if keyword == "FROM"]
    assert image == ["${FROM_IMAGE_NAME}"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args["FROM_IMAGE_NAME"])


def test_workdir_is_the_originals(dockerfile):
    # The original's README and scripts run from /workspace/recommendation inside the container.
    assert [arguments for keyword, arguments in dockerfile if keyword == "WORKDIR"] == \
        ["/workspace/recommendation"]


def test_every_copied_path_exists(dockerfile):
    copies = [words(arguments) for keyword, arguments in dockerfile if keyword in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for sources_and_destination in copies:
        for source in sources_and_destination[:-1]:
            assert glob.glob(os.path.join(ROOT, source)), f"COPY/ADD source {source} not in repo"


def test_every_file_a_command_uses_is_copied_before_it(dockerfile, rules):
    """Relative paths that RUN, CMD or ENTRYPOINT name (scripts, `pip -r` files) must be in the
    working directory by then: copied by an earlier COPY and not dropped by .dockerignore."""
    copied, checked = set(), []
    for keyword, arguments in dockerfile:
        if keyword in ("COPY", "ADD"):
            *sources, destination = words(arguments)
            assert destination in (".", "./"), f"{keyword} {arguments}: test handles only '.'"
            for source in sources:
                names = repo_files_needed() if source == "." else [source]
                copied.update(name for name in names if not excluded(name, rules))
        elif keyword in ("RUN", "CMD", "ENTRYPOINT"):
            tokens = words(arguments) if keyword != "RUN" else shlex.split(arguments)
            used = [token for previous, token in zip([""] + tokens, tokens)
                    if previous in ("-r", "--requirement") or token.endswith((".sh", ".py"))]
            for path in used:
                path = path.removeprefix("./")
                if path.startswith("/"):
                    continue
                assert os.path.isfile(os.path.join(ROOT, path)), f"{keyword} uses {path}: not in repo"
                assert path in copied, f"{keyword} uses {path} before it is copied"
                checked.append(path)
    assert "requirements.txt" in checked


def test_dockerignore_keeps_what_the_image_needs(rules):
    needed = repo_files_needed()
    for name in ("ncf.py", "requirements.txt", "prepare_dataset.sh", "convert.py",
                 "logger/__init__.py", "scripts/gpu_check.py"):
        assert name in needed
    assert [name for name in needed if excluded(name, rules)] == []


def test_dockerignore_drops_environments_data_and_outputs(rules):
    assert [path for path in CONTEXT_BALLAST if not excluded(path, rules)] == []


def test_requirements_keep_the_images_cuda_torch(dockerfile):
    lines = [line.split("#")[0].strip() for line in read("requirements.txt").splitlines()]
    lines = [line for line in lines if line]
    # An index or wheel option could point pip at CPU-only wheels.
    assert not [line for line in lines if line.startswith("-")]
    torch_lines = [Requirement(line) for line in lines if Requirement(line).name == "torch"]
    assert len(torch_lines) == 1
    specifier = torch_lines[0].specifier
    assert "+cpu" not in str(specifier)
    assert not any(spec.operator in ("==", "===") for spec in specifier), \
        "an exact pin makes pip replace the image's own torch build"
    tag = dict(arguments.partition("=")[::2] for keyword, arguments in dockerfile
               if keyword == "ARG")["FROM_IMAGE_NAME"].split(":")[1].removesuffix("-py3")
    assert tag in NGC_TORCH, f"add the torch version of NGC {tag} to NGC_TORCH"
    # pip keeps an installed version that meets the specifier, pre-releases included.
    assert specifier.contains(NGC_TORCH[tag], prereleases=True)
