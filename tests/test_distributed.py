"""Multi-process runs through PyTorch's own launcher (torchrun), on CPU with gloo."""
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

import dataloading
import ncf
import train
from logger import log_records, read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, timeout=180, **launcher):
    options = {"nproc_per_node": 2, **launcher}
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += [f"--{key}={value}" for key, value in options.items()]
    if "rdzv_endpoint" not in options:
        command += ["--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command + ["ncf.py", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def epoch_lines(output):
    return [line for line in output.splitlines() if line.startswith("Epoch ")]


def result_line(output):
    match = re.search(r"HR@10 = ([0-9.]+), NDCG@10 = ([0-9.]+), val_time.*"
                      r"full HR@10 = ([0-9.]+), full NDCG@10 = ([0-9.]+)", output)
    assert match, output
    return match.groups()


@pytest.fixture(scope="module")
def two_process_run(clustered_data, tmp_path_factory):
    """(a 2-process training run of 3 epochs, its directory)."""
    directory = tmp_path_factory.mktemp("two")
    run = torchrun(*TRAINING, "--data", clustered_data, "--checkpoint_dir",
                   str(directory / "ck"), "--log_path", str(directory / "log.json"))
    return run, directory


TRAINING = ["-e", "3", "-b", "2048"]


def test_two_processes_train_one_model_and_match_single_process_evaluation(clustered_data,
                                                                           two_process_run,
                                                                           tmp_path):
    run, directory = two_process_run
    checkpoints = directory / "ck"
    assert run.returncode == 0, run.stderr
    lines = epoch_lines(run.stdout)
    assert [line.split(":")[0] for line in lines] == ["Epoch 0", "Epoch 1", "Epoch 2"]
    best = max(float(re.search(r"HR@10 = ([0-9.]+)", line).group(1)) for line in lines)
    assert best > 0.5
    assert sorted(os.listdir(checkpoints)) == [".lock", "last.pth", "model.pth"]
    state = torch.load(checkpoints / "model.pth", weights_only=True)
    assert not any(key.startswith("module.") for key in state)

    model = str(checkpoints / "model.pth")
    test_flags = ["--data", clustered_data, "--mode", "test", "--load_checkpoint_path", model,
                  "--valid_batch_size", "3000", "--full_ranking"]
    two = torchrun(*test_flags, "--log_path", str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stderr
    # A subprocess with one thread, as each of torchrun's: the same scoring kernels.
    one = subprocess.run([sys.executable, "ncf.py", *test_flags, "--log_path",
                          str(tmp_path / "one.json")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert one.returncode == 0, one.stderr
    assert result_line(two.stdout) == result_line(one.stdout)
    assert float(result_line(one.stdout)[0]) == best
    (one_record,) = log_records(read_log(tmp_path / "one.json"), "summary")
    (two_record,) = log_records(read_log(tmp_path / "two.json"), "summary")
    assert one_record["hr@10"] == two_record["hr@10"]
    assert one_record["ndcg@10"] == two_record["ndcg@10"]
    # Per-user sums in one order, as the ranks; what remains is the float32 rounding of the
    # logits, which varies with the shape of a scoring batch (the shares cut rows differently).
    assert one_record["validation_loss"] == pytest.approx(two_record["validation_loss"],
                                                          rel=1e-6)


def test_same_seed_gives_the_same_curve(clustered_data, two_process_run, tmp_path):
    curves = []
    for run in (two_process_run[0],
                torchrun(*TRAINING, "--data", clustered_data, "--checkpoint_dir",
                         str(tmp_path / "ck"), "--log_path", str(tmp_path / "log.json"))):
        assert run.returncode == 0, run.stderr
        curves.append([line.split(", train_time")[0] for line in epoch_lines(run.stdout)])
    assert curves[0] == curves[1] and len(curves[0]) == 3


def gradients_after_an_epoch(rank, data, store, answers):
    """A process of two: one epoch of train_epoch with two pieces a step, then what its
    parameters' gradients are."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    try:
        ctx = train.Context(torch.device("cpu"), rank, 2, rank == 0)
        args = ncf.parse_args(["--data", data, "-b", "2048", "--grads_accumulated", "2"])
        splits = dataloading.load_splits(data, ctx.device)
        model, training_loss = train.build_model(args, splits.nb_users, splits.nb_items, ctx)
        train.train_epoch(training_loss, train.build_optimizer(args, model),
                          train.grad_scaler(ctx), splits.positives, splits.nb_items, 0, args,
                          ctx)
        grads = [parameter.grad for parameter in model.parameters()]
        answers.put((rank, [None if grad is None else (grad.untyped_storage().data_ptr(),
                                                       bool(grad.eq(0).all())) for grad in grads]))
    finally:
        torch.distributed.destroy_process_group()


def test_gradients_stay_views_of_the_all_reduce_buckets(clustered_data, tmp_path):
    """Set to None between steps, a step's first piece would allocate a gradient beside DDP's
    buckets: a third table-sized buffer a process."""
    context = torch.multiprocessing.get_context("spawn")
    answers = context.Queue()
    workers = [context.Process(target=gradients_after_an_epoch,
                               args=(rank, clustered_data, str(tmp_path / "store"), answers))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    try:
        found = dict(answers.get(timeout=120) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
    for rank, grads in found.items():
        assert None not in grads, rank
        assert all(zeroed for _, zeroed in grads), rank
        # Views of a few buckets, not a storage a parameter.
        assert len({storage for storage, _ in grads}) < len(grads), rank


def test_a_failing_rank_ends_the_run_promptly_with_its_message(clustered_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    start = time.time()
    run = torchrun("--data", clustered_data, "-e", "3", "-b", "2048", "--checkpoint_dir",
                   str(blocker / "ck"), "--log_path", str(tmp_path / "log.json"), timeout=120)
    assert run.returncode != 0
    assert time.time() - start < 60
    assert "[rank 0] ncf.py: error: --checkpoint_dir" in run.stderr
    assert "Epoch" not in run.stdout


def test_a_refused_run_leaves_no_checkpoint_dir_it_created(tmp_path):
    # Rank 0 alone creates and locks the directory, so it alone must remove it again.
    run = torchrun("--data", str(tmp_path / "missing"), "--checkpoint_dir",
                   str(tmp_path / "new" / "ck"), "--log_path", str(tmp_path / "log.json"),
                   timeout=120)
    assert run.returncode != 0
    assert "[rank 0] ncf.py: error: " in run.stderr and "train_ratings.pt: not found" in run.stderr
    assert os.listdir(tmp_path) == []


def test_the_rank_that_loses_a_failed_one_ends_in_one_line(clustered_data, tmp_path):
    # Two nodes, so no launcher kills the survivor first: it learns of the failure from gloo,
    # in the collective after rank 0 failed to save model.pth (a directory stands there).
    (tmp_path / "ck0" / "model.pth").mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "ncf.py",
         "--data", clustered_data, "-e", "3", "-b", "2048", "--checkpoint_dir",
         str(tmp_path / f"ck{node}"), "--log_path", str(tmp_path / f"log{node}.json")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in range(2)]
    errors = [node.communicate(timeout=180)[1] for node in nodes]
    assert [node.returncode != 0 for node in nodes] == [True, True]
    assert [line for line in errors[0].splitlines() if "ncf.py: error:" in line] == [
        f"[rank 0] ncf.py: error: {tmp_path / 'ck0' / 'model.pth'}: cannot be saved (Is a "
        f"directory); the previous file, if any, is unchanged; free space on that disk or "
        f"write elsewhere"]
    survivor = [line for line in errors[1].splitlines() if line.startswith("[rank")]
    assert len(survivor) == 1, errors[1]
    assert re.fullmatch(r"\[rank 1\] ncf\.py: error: another process of this run stopped "
                        r"\(gloo: [^()]*\); its own error line, here or in its node's log, "
                        r"says why", survivor[0]), survivor[0]


def test_two_nodes_rendezvous_over_loopback(clustered_data, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
         "--rdzv_id=ncf-test", "ncf.py", "--data", clustered_data, "-e", "2", "-b", "2048",
         "--checkpoint_dir", str(tmp_path / f"ck{node}"), "--log_path",
         str(tmp_path / f"log{node}.json")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in range(2)]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    printed = [len(epoch_lines(out)) for out, _ in outputs]
    assert sorted(printed) == [0, 2]
    saved = [os.path.exists(tmp_path / f"ck{node}" / "model.pth") for node in range(2)]
    assert sorted(saved) == [False, True]


def test_legacy_launcher_passes_local_rank_as_an_argument(clustered_data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2",
               "--master_port", str(free_port()), "ncf.py", "--data", clustered_data, "-e", "1",
               "-b", "2048", "--checkpoint_dir", str(tmp_path / "ck"), "--log_path",
               str(tmp_path / "log.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert len(epoch_lines(run.stdout)) == 1
    assert os.path.exists(tmp_path / "ck" / "model.pth")


@pytest.mark.parametrize("world_size, finalized", [("2", False), ("1", True)])
def test_an_unexpected_error_of_one_of_several_processes_skips_finalization(world_size,
                                                                            finalized):
    # Finalization is where gloo's worker threads abort a process (cli.run), so a
    # traceback of one of several processes is printed, then the process leaves without it.
    program = ("import atexit, cli; atexit.register(print, 'finalized'); "
               "cli.run(lambda argv: {}['missing'])")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "WORLD_SIZE": world_size}, timeout=60)
    assert done.returncode == 1
    assert done.stderr.rstrip().endswith("KeyError: 'missing'")
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stdout == ("finalized\n" if finalized else "")


@pytest.mark.parametrize("message, said", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
     "[127.0.0.1]:25093. More text", "gloo: Connection closed by peer [127.0.0.1]:25093"),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
     "1800000ms for recv operation to complete",
     "gloo: Timed out waiting 1800000ms for recv operation to complete"),
    ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:268, remote process "
     "exited or there was a network error, NCCL version 2.21.5\nncclRemoteError: A call "
     "failed", "nccl: remote process exited or there was a network error"),
    ("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1275, internal error, "
     "NCCL version 2.14.3\nncclInternalError: Internal check failed.", "nccl: internal error"),
    ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
     "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=900000) ran for 900102 "
     "milliseconds before timing out.",
     "nccl: timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, "
     "Timeout(ms)=900000) ran for 900102 milliseconds before timing out."),
    ("CUDA out of memory", None),
    ("", None),
])
def test_a_lost_peer_is_named_by_its_backend(monkeypatch, message, said):
    import ncf
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ncf.lost_peer(RuntimeError(message)) == said
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ncf.lost_peer(RuntimeError(message)) is None
