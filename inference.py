"""Forward-pass benchmark of NeuMF: throughput and latency over a list of batch sizes.

    python inference.py                                   # ml-20m-sized model, fp32 and amp
    python inference.py --load_checkpoint_path model.pth --batch_sizes 1024 65536
    python inference.py --device cpu --precision fp32 --batch_sizes 1024 --num_batches 5

amp is autocast: float16 on CUDA, bfloat16 on the CPU (the only reduced precision CPU autocast
offers). Ids are drawn before timing, so only the forward pass is measured.
"""
import argparse
import platform
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from checkpoint import CheckpointError, load_model
from logger import JsonLogger
from neumf import NeuMF

ML20M_USERS = 138493
ML20M_ITEMS = 26744
DEFAULT_FACTORS = 64
DEFAULT_LAYERS = [256, 256, 128, 64]
DEFAULT_BATCH_SIZES = [1, 64, 1024, 16384, 65536, 262144, 1048576]
AUTOCAST_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}
SHORT_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PERCENTILES = (90, 95, 99)


class BenchmarkError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark NeuMF inference (forward pass)")
    # Shape flags default to None so that, with a checkpoint, an explicit value that
    # contradicts the checkpoint can be refused instead of silently ignored.
    parser.add_argument("--n_users", type=int, default=None,
                        help=f"users in the model (default {ML20M_USERS}, ml-20m)")
    parser.add_argument("--n_items", type=int, default=None,
                        help=f"items in the model (default {ML20M_ITEMS}, ml-20m)")
    parser.add_argument("-f", "--factors", type=int, default=None,
                        help=f"MF embedding width (default {DEFAULT_FACTORS})")
    parser.add_argument("--layers", nargs="+", type=int, default=None,
                        help=f"MLP layer sizes (default {' '.join(map(str, DEFAULT_LAYERS))})")
    parser.add_argument("--load_checkpoint_path", type=str, default=None,
                        help="model.pth or last.pth; the model's shape is read from it")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=DEFAULT_BATCH_SIZES,
                        help="every size is run for every --precision")
    parser.add_argument("--num_batches", type=int, default=20,
                        help="timed forward passes per batch size")
    parser.add_argument("--warmup_batches", type=int, default=3,
                        help="untimed forward passes before the timed ones")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "amp"],
                        default=["fp32", "amp"],
                        help="amp: autocast float16 on CUDA, bfloat16 on the CPU")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("-s", "--seed", type=int, default=1)
    parser.add_argument("--log_path", type=str, default=None,
                        help="also write one JSON line per (precision, batch size) here")
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def check_args(args, parser):
    for flag, value in {"--n_users": args.n_users, "--n_items": args.n_items,
                        "--factors": args.factors, "--num_batches": args.num_batches}.items():
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.warmup_batches < 0:
        parser.error(f"--warmup_batches must be 0 or more, got {args.warmup_batches}")
    small = [size for size in args.batch_sizes if size < 1]
    if small:
        parser.error(f"--batch_sizes must all be at least 1, got {small[0]}")
    if args.layers is not None and (any(size < 1 for size in args.layers) or args.layers[0] % 2):
        parser.error(f"--layers must be positive and the first even (it is split between "
                     f"user and item embeddings), got {' '.join(map(str, args.layers))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_model():
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()}, {threads} thread{'' if threads == 1 else 's'}"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(model, batch_size, num_batches, precision, device, warmup_batches=3, seed=1):
    """Time `num_batches` forward passes of `batch_size` random (user, item) pairs.

    Returns throughput (samples/s) and latency mean and percentiles (ms) per forward pass.
    """
    device = torch.device(device)
    autocast_dtype = AUTOCAST_DTYPES[device.type] if precision == "amp" else None
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (warmup_batches + num_batches, batch_size)
    users = torch.randint(0, model.nb_users, shape, device=device, generator=generator)
    items = torch.randint(0, model.nb_items, shape, device=device, generator=generator)
    model.eval()
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    latencies = []
    with torch.inference_mode(), autocast:
        for index in range(warmup_batches):
            model(users[index], items[index])
        synchronize(device)
        for index in range(warmup_batches, warmup_batches + num_batches):
            start = time.perf_counter()
            model(users[index], items[index])
            synchronize(device)
            latencies.append(time.perf_counter() - start)
    latencies_ms = np.array(latencies) * 1000.0
    percentiles = np.percentile(latencies_ms, PERCENTILES)
    result = {"precision": precision,
              "dtype": str(autocast_dtype or torch.float32).removeprefix("torch."),
              "batch_size": batch_size, "num_batches": num_batches,
              "throughput": batch_size * num_batches / float(np.sum(latencies)),
              "latency_mean_ms": float(latencies_ms.mean())}
    for percentile, value in zip(PERCENTILES, percentiles):
        result[f"latency_p{percentile}_ms"] = float(value)
    return result


def build_model(args, device):
    if args.load_checkpoint_path is None:
        torch.manual_seed(args.seed)
        return NeuMF(args.n_users or ML20M_USERS, args.n_items or ML20M_ITEMS,
                     args.factors or DEFAULT_FACTORS, args.layers or DEFAULT_LAYERS).to(device)
    path = args.load_checkpoint_path
    model = load_model(path, device)
    saved = {"--n_users": model.nb_users, "--n_items": model.nb_items,
             "--factors": model.mf_dim, "--layers": model.mlp_layer_sizes}
    asked = {"--n_users": args.n_users, "--n_items": args.n_items,
             "--factors": args.factors, "--layers": args.layers}
    for flag, value in asked.items():
        if value is not None and value != saved[flag]:
            raise CheckpointError(f"{path}: checkpoint has {flag} {_flag_text(saved[flag])}, "
                                  f"run asks for {_flag_text(value)}; drop {flag}")
    return model


def _flag_text(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def print_header(name, model):
    print(f"Device: {name}")
    print(f"Model: {model.nb_users:,} users, {model.nb_items:,} items, factors {model.mf_dim}, "
          f"layers {_flag_text(model.mlp_layer_sizes)}")
    print(f"{'precision':<12}{'batch size':>12}{'samples/s':>16}"
          f"{'mean ms':>12}{'p90 ms':>12}{'p95 ms':>12}{'p99 ms':>12}", flush=True)


def print_row(result):
    precision = result["precision"]
    if precision == "amp":
        precision += f" ({SHORT_DTYPE_NAMES[result['dtype']]})"
    print(f"{precision:<12}{result['batch_size']:>12,}{result['throughput']:>16,.0f}"
          f"{result['latency_mean_ms']:>12.3f}{result['latency_p90_ms']:>12.3f}"
          f"{result['latency_p95_ms']:>12.3f}{result['latency_p99_ms']:>12.3f}", flush=True)


def run(args):
    device = resolve_device(args.device)
    model = build_model(args, device)
    name = device_name(device)
    try:
        logger = JsonLogger(args.log_path)
    except OSError as error:
        raise BenchmarkError(f"--log_path {args.log_path}: cannot write there "
                             f"({error.strerror})") from None
    print_header(name, model)
    results = []
    for precision in args.precision:
        for batch_size in args.batch_sizes:
            try:
                result = benchmark(model, batch_size, args.num_batches, precision, device,
                                   args.warmup_batches, args.seed)
            except torch.cuda.OutOfMemoryError:
                raise BenchmarkError(
                    f"--batch_sizes {batch_size}: does not fit in the memory of {name}; "
                    f"pass smaller --batch_sizes") from None
            result.update(device=str(device), device_name=name, n_users=model.nb_users,
                          n_items=model.nb_items, factors=model.mf_dim,
                          layers=model.mlp_layer_sizes)
            print_row(result)
            logger.log((), result)
            results.append(result)
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (BenchmarkError, CheckpointError) as error:
        print(f"inference.py: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
