"""Load test of serve.py on loopback: requests/s and latency percentiles of GET /recommend.

    python bench/serve_bench.py [--shapes ml-latest-small ml-20m] [--requests 2000]
                                [--clients 1 4] [--topk 10] [--precision fp32 bf16]

Per shape, a NeuMF with random weights (--factors 64, --layers 256 256 128 64) and random
training data of the dataset's size (users, items, ratings) are written to a temporary
directory; serve.py serves them on 127.0.0.1 in its own process, once per --precision. Random
weights leave the item bounds unable to rule items out, so serve.py drops them and scores every
item: in float32 (fp32), or with the bfloat16 shortlist (bf16; auto where bf16 is native). Then
for each client count, that many threads, each on its own keep-alive connection, send a fixed
total of --requests single-user requests for random known users, one after another (after 20
warm-up requests a client). Latency is per request, as the client sees it; requests/s is the
total over the wall time. Every answer is checked (status 200, k items, no fallback). A last
run per server asks GET /health from one client: the cost of the HTTP server alone, without the
model. The server's CPU time per request (user + system, from /proc) is reported too: on a
machine that other work keeps busy the rate and latencies fall with the share of the CPU left
over, that figure much less.
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402
from inference import cpu_model  # noqa: E402
from neumf import NeuMF  # noqa: E402

# (users, items, ratings) as convert.py reports them for each MovieLens release.
SHAPES = {"ml-latest-small": (610, 9_724, 100_836), "ml-20m": (138_493, 26_744, 20_000_263)}
WARMUP_PER_CLIENT = 20
STARTUP_SECONDS = 600
HEALTH_RETRY_SECONDS = 0.5  # between tries of GET /health while serve.py starts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4],
                        help="concurrent clients, one run each")
    parser.add_argument("-k", "--topk", type=int, default=10)
    parser.add_argument("--precision", nargs="+", choices=["auto", "bf16", "fp32"],
                        default=["fp32", "bf16"], help="serve.py --precision, one server each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.requests < 1 or min(args.clients) < 1 or args.topk < 1:
        parser.error("--requests, --clients and --topk must be at least 1")
    return args


def write_shape(directory, users, items, ratings, seed):
    """A converted dataset of that size (every user and item occurs) and a model.pth for it."""
    generator = torch.Generator().manual_seed(seed)
    train_users = torch.arange(ratings - users) % users
    train_items = torch.randint(0, items, (ratings - users,), generator=generator)
    train_items[-1] = items - 1
    test = torch.stack((torch.arange(users), torch.randint(0, items, (users,),
                                                            generator=generator)), dim=1)
    tensors = {"train_ratings": torch.stack((train_users, train_items), dim=1),
               "test_ratings": test,
               "test_negatives": torch.randint(0, items, (users, 100), generator=generator),
               "user_ids": torch.arange(users) + 1, "item_ids": torch.arange(items) + 1}
    for name, tensor in tensors.items():
        torch.save(tensor, os.path.join(directory, f"{name}.pt"))
    torch.manual_seed(seed)
    checkpoint = os.path.join(directory, "model.pth")
    torch.save(NeuMF(users, items, 64, [256, 256, 128, 64]).state_dict(), checkpoint)
    return checkpoint


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(process, port):
    """Return once serve.py answers GET /health with 200; exit with one line if it ends first
    or has not within STARTUP_SECONDS. Any other answer (from whatever else took the port, say)
    is tried again after a pause, as a refused connection is, and each try's connection is
    closed: the wait neither spins a core nor piles up open sockets."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            raise cli.UserError(f"serve.py exited with status {process.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/health")
            status = connection.getresponse().status
            if status == 200:
                return
            last = f"status {status}"
        except OSError as error:  # not listening yet
            last = str(error)
        finally:
            connection.close()
        if time.monotonic() >= deadline:
            raise cli.UserError(f"serve.py did not answer /health with status 200 in "
                                f"{STARTUP_SECONDS} s (last try: {last})")
        time.sleep(HEALTH_RETRY_SECONDS)


def cpu_seconds(pid):
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name in parentheses may hold spaces; the fields after it do not.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(port, users, topk, latencies, failures):
    """Requests for `users` one after another on one connection; user None asks /health."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for index, user in enumerate(users):
            path = "/health" if user is None else f"/recommend?user={user}&k={topk}"
            start = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - start
            answer = json.loads(body)
            if response.status != 200 or (user is not None and (
                    len(answer["items"]) != topk or answer["fallback"])):
                failures.append(f"{path}: status {response.status}, {body[:200]!r}")
            if index >= WARMUP_PER_CLIENT:
                latencies.append(elapsed)
    finally:
        connection.close()


def load(port, nb_users, clients, requests, topk, generator, health=False):
    """(requests sent, requests/s, p50 ms, p99 ms) of `requests` timed requests from `clients`
    threads; with health, of GET /health, which costs the HTTP server alone."""
    per_client = [requests // clients + (index < requests % clients) for index in range(clients)]
    latencies, failures = [], []
    users = [[None] * (WARMUP_PER_CLIENT + count) if health else
             (torch.randint(0, nb_users, (WARMUP_PER_CLIENT + count,), generator=generator) + 1)
             .tolist() for count in per_client]
    threads = [threading.Thread(target=client, args=(port, ids, topk, latencies, failures))
               for ids in users]
    # The rate counts warm-up requests as the wall time does; the percentiles leave them out.
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise cli.UserError(f"{len(failures)} wrong answers, first: {failures[0]}")
    total = sum(per_client) + WARMUP_PER_CLIENT * clients
    milliseconds = np.array(latencies) * 1000
    return total, total / wall, np.percentile(milliseconds, 50), np.percentile(milliseconds, 99)


def main(argv=None):
    args = parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"serve.py on loopback, {cpu_model()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; GET /recommend?k={args.topk}")
    print("| shape | users x items | precision | clients | requests | requests/s | p50 ms | "
          "p99 ms | server CPU ms/request |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for shape in args.shapes:
        users, items, ratings = SHAPES[shape]
        with tempfile.TemporaryDirectory(prefix="serve_bench_") as directory:
            checkpoint = write_shape(directory, users, items, ratings, args.seed)
            for precision in args.precision:
                serve(args, shape, directory, checkpoint, precision, generator)


def serve(args, shape, directory, checkpoint, precision, generator):
    """One serve.py process and a load run per client count against it."""
    users, items, _ = SHAPES[shape]
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "serve.py"), "--data", directory,
         "--load_checkpoint_path", checkpoint, "--port", str(port), "--device", "cpu",
         "--precision", precision], stdout=subprocess.DEVNULL)
    try:
        wait_for_health(process, port)
        for clients, health in [(count, False) for count in args.clients] + [(1, True)]:
            cpu_before = cpu_seconds(process.pid)
            sent, rate, p50, p99 = load(port, users, clients, args.requests, args.topk,
                                        generator, health)
            cpu = (cpu_seconds(process.pid) - cpu_before) * 1000 / sent
            what = f"{precision}, GET /health" if health else precision
            print(f"| {shape} | {users:,} x {items:,} | {what} | {clients} | "
                  f"{args.requests:,} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {cpu:.2f} |",
                  flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    cli.run(main)
