"""Forward-pass benchmark of NeuMF: throughput and latency over a list of batch sizes.

    python inference.py                                   # ml-20m-sized model, fp32 and amp
    python inference.py --load_checkpoint_path model.pth --batch_sizes 1024 65536
    python inference.py --device cpu --precision fp32 --batch_sizes 1024 --num_batches 5
    python inference.py --opt_level O2 --batch_sizes 1,4,16   # the original's spellings

amp is autocast: float16 on CUDA, bfloat16 on the CPU (the only reduced precision CPU autocast
offers). Ids are drawn before timing, so only the forward pass is measured. Throughput is
samples over the summed time of all timed passes, as the 2023 original's mean throughput; the
2019 original reports its best pass (batch size / fastest pass), printed and logged beside it
as best_inference_throughput. The log ends with the 2023 original's record of the run
(batch_{size}_mean_throughput, batch_{size}_mean_latency, _p90_, _p95_, _p99_ in seconds),
which its qa/inference_table.py reads; --dropout is taken and, the model being in eval mode,
changes nothing, as in both originals.
"""
import argparse
import os
import platform
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

import cli
from checkpoint import CheckpointError, load_model
from logger import PARAMETER, JsonLogger
from neumf import MODELS, build, parameter_count

ML20M_USERS = 138493
ML20M_ITEMS = 26744
DEFAULT_FACTORS = 64
DEFAULT_LAYERS = [256, 256, 128, 64]
# The 2023 original's list, which holds the 2019 one's single default (1).
DEFAULT_BATCH_SIZES = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]
AUTOCAST_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}
SHORT_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
OPT_LEVEL_PRECISION = {"O0": "fp32", "O2": "amp"}
PERCENTILES = (90, 95, 99)
# float32 values a forward pass keeps per sample, times this, bounds its activations: autocast
# adds half-precision copies and ReLU's outputs sit beside their inputs.
ACTIVATION_COPIES = 3


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="inference.py",
                                description="Benchmark NeuMF inference (forward pass)")
    # Shape flags default to None so that, with a checkpoint, an explicit value that
    # contradicts the checkpoint can be refused instead of silently ignored.
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="the kind of model, as ncf.py's --model (default neumf)")
    parser.add_argument("--n_users", type=int, default=None,
                        help=f"users in the model (default {ML20M_USERS}, ml-20m)")
    parser.add_argument("--n_items", type=int, default=None,
                        help=f"items in the model (default {ML20M_ITEMS}, ml-20m)")
    parser.add_argument("-f", "--factors", type=int, default=None,
                        help=f"MF embedding width (default {DEFAULT_FACTORS})")
    parser.add_argument("--layers", nargs="+", type=int, default=None,
                        help=f"MLP layer sizes (default {' '.join(map(str, DEFAULT_LAYERS))})")
    parser.add_argument("--dropout", type=float, default=0.5,
                        help="taken as both originals take it; no effect: the model runs in eval "
                             "mode")
    parser.add_argument("--load_checkpoint_path", type=str, default=None,
                        help="model.pth or last.pth; the model's shape is read from it")
    parser.add_argument("--batch_sizes", nargs="+", type=batch_size_list, default=None,
                        help="every size is run for every --precision; space- or "
                             "comma-separated (the original's 1,4,16) (default "
                             f"{','.join(map(str, DEFAULT_BATCH_SIZES))})")
    parser.add_argument("--num_batches", type=int, default=20,
                        help="timed forward passes per batch size")
    parser.add_argument("--warmup_batches", type=int, default=3,
                        help="untimed forward passes before the timed ones")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--precision", nargs="+", choices=["fp32", "amp"],
                           default=["fp32", "amp"],
                           help="amp: autocast float16 on CUDA, bfloat16 on the CPU")
    precision.add_argument("--opt_level", choices=sorted(OPT_LEVEL_PRECISION),
                           help="the original's flag: O0 is --precision fp32, O2 --precision amp")
    precision.add_argument("--fp16", action="store_true",
                           help="the original's flag: --precision amp")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("-s", "--seed", type=int, default=1)
    parser.add_argument("--log_path", type=str, default="log.json",
                        help="dllogger-format log: the settings, one record per (precision, "
                             "batch size), then the 2023 original's record of them all, last, "
                             "for its qa/inference_table.py (default log.json)")
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def batch_size_list(word):
    """The sizes in one --batch_sizes word: 1024, or the original's comma list 1,4,16."""
    try:
        return [int(size) for size in word.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers such as 1024 or 1,4,16, "
                                         f"got {word!r}") from None


def check_args(args, parser):
    args.batch_sizes = ([size for word in args.batch_sizes for size in word]
                        if args.batch_sizes is not None else DEFAULT_BATCH_SIZES)
    if args.opt_level is not None:
        args.precision = [OPT_LEVEL_PRECISION[args.opt_level]]
    if args.fp16:
        args.precision = ["amp"]
    for flag, value in {"--n_users": args.n_users, "--n_items": args.n_items,
                        "--factors": args.factors, "--num_batches": args.num_batches}.items():
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.warmup_batches < 0:
        parser.error(f"--warmup_batches must be 0 or more, got {args.warmup_batches}")
    small = [size for size in args.batch_sizes if size < 1]
    if small:
        parser.error(f"--batch_sizes must all be at least 1, got {small[0]}")
    if args.layers is not None and (any(size < 1 for size in args.layers) or args.layers[0] % 2):
        parser.error(f"--layers must be positive and the first even (it is split between "
                     f"user and item embeddings), got {' '.join(map(str, args.layers))}")
    # Shape flags default to None: a value means the flag was given.
    cli.refuse_unused_shape_flag(
        parser, {name for name in ("factors", "layers") if getattr(args, name) is not None},
        args.model)
    cli.check_seed(parser, args.seed)
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

    Returns throughput (samples/s), the original's best-pass throughput, and latency mean and
    percentiles (ms) per forward pass.
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
              "best_inference_throughput": batch_size / min(latencies),
              "latency_mean_ms": float(latencies_ms.mean())}
    for percentile, value in zip(PERCENTILES, percentiles):
        result[f"latency_p{percentile}_ms"] = float(value)
    return result


def free_memory(device):
    """Bytes that can still be allocated on `device`; None where that is unknown."""
    if device.type == "cuda":
        # Blocks PyTorch has cached for reuse look taken to the driver but are free to us.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return cli.available_memory()


def model_bytes(nb_users, nb_items, factors, layers, kind="neumf"):
    """The float32 parameters of the model `kind` of this shape."""
    return 4 * parameter_count(nb_users, nb_items, factors, layers, kind)


def benchmark_bytes(model, batch_size, passes):
    """What benchmark() allocates: every pass's ids, drawn up front, and one pass's activations."""
    values_per_sample = 4 * model.mf_dim + 2 * sum(model.mlp_layer_sizes) + 1
    return passes * batch_size * 2 * 8 + ACTIVATION_COPIES * 4 * values_per_sample * batch_size


def check_fits(needed, device, name, flags, advice):
    """Refuse up front what cannot fit: an allocation that fails mid-run is a traceback, or on
    an overcommitting Linux the kernel's out-of-memory killer with no message at all."""
    free = free_memory(device)
    if free is not None and needed > free:
        raise cli.UserError(f"{flags}: needs {needed / 2**30:,.1f} GiB, more than the "
                            f"{free / 2**30:,.1f} GiB free on {name}; {advice}")


@contextmanager
def refusing_out_of_memory(flags, name, advice):
    """An allocation that fails anyway (the estimate is rough, and others share the device)
    becomes the one-line error: CUDA's OutOfMemoryError or the CPU allocator's RuntimeError."""
    try:
        yield
    except RuntimeError as error:
        if not (isinstance(error, torch.OutOfMemoryError) or cli.is_cpu_out_of_memory(error)):
            raise
        raise cli.UserError(f"{flags}: does not fit in the memory of {name}; {advice}") from None


def build_model(args, device):
    if args.load_checkpoint_path is None:
        torch.manual_seed(args.seed)
        return build(args.model or "neumf", args.n_users or ML20M_USERS,
                     args.n_items or ML20M_ITEMS, args.factors or DEFAULT_FACTORS,
                     args.layers or DEFAULT_LAYERS, args.dropout).to(device)
    path = args.load_checkpoint_path
    model = load_model(path, device)
    saved = {"--model": model.kind, "--n_users": model.nb_users, "--n_items": model.nb_items,
             "--factors": model.mf_dim, "--layers": model.mlp_layer_sizes}
    asked = {"--model": args.model, "--n_users": args.n_users, "--n_items": args.n_items,
             "--factors": args.factors, "--layers": args.layers}
    unused, part = cli.UNUSED_SHAPE_FLAGS.get(model.kind, (None, None))
    for flag, value in asked.items():
        if value is not None and flag == unused:
            raise CheckpointError(f"{path}: checkpoint holds a {model.kind} model, which has no "
                                  f"{part}; drop {flag}")
        if value is not None and value != saved[flag]:
            raise CheckpointError(f"{path}: checkpoint has {flag} {_flag_text(saved[flag])}, "
                                  f"run asks for {_flag_text(value)}; drop {flag}")
    return model


def _flag_text(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def print_header(name, model):
    print(f"Device: {name}")
    sizes = ([f"factors {model.mf_dim}"] * (model.kind != "mlp")
             + [f"layers {_flag_text(model.mlp_layer_sizes)}"] * (model.kind != "gmf"))
    print(f"Model: {model.kind}, {model.nb_users:,} users, {model.nb_items:,} items, "
          f"{', '.join(sizes)}")
    print(f"{'precision':<12}{'batch size':>12}{'samples/s':>16}{'best samples/s':>16}"
          f"{'mean ms':>12}{'p90 ms':>12}{'p95 ms':>12}{'p99 ms':>12}", flush=True)


def print_row(result):
    precision = result["precision"]
    if precision == "amp":
        precision += f" ({SHORT_DTYPE_NAMES[result['dtype']]})"
    print(f"{precision:<12}{result['batch_size']:>12,}{result['throughput']:>16,.0f}"
          f"{result['best_inference_throughput']:>16,.0f}"
          f"{result['latency_mean_ms']:>12.3f}{result['latency_p90_ms']:>12.3f}"
          f"{result['latency_p95_ms']:>12.3f}{result['latency_p99_ms']:>12.3f}", flush=True)


def run(args):
    device = resolve_device(args.device)
    name = device_name(device)
    shape = {"--n_users": args.n_users or ML20M_USERS,
             "--n_items": args.n_items or ML20M_ITEMS,
             "--factors": args.factors or DEFAULT_FACTORS,
             "--layers": args.layers or DEFAULT_LAYERS}
    shape_flags = " ".join(f"{flag} {_flag_text(value)}" for flag, value in shape.items())
    if args.load_checkpoint_path is None:
        check_fits(model_bytes(*shape.values(), args.model or "neumf"), device, name,
                   shape_flags, "pass a smaller model")
    with refusing_out_of_memory(args.load_checkpoint_path or shape_flags, name,
                                "pass a smaller model"):
        model = build_model(args, device)
    passes = args.warmup_batches + args.num_batches
    advice = "pass smaller --batch_sizes or --num_batches"

    def batch_flags(batch_size):
        return f"--batch_sizes {batch_size} (with --num_batches + --warmup_batches {passes})"

    # All sizes before the first run, so a run does not fail only after its long first part.
    for batch_size in args.batch_sizes:
        check_fits(benchmark_bytes(model, batch_size, passes), device, name,
                   batch_flags(batch_size), advice)
    try:
        logger = JsonLogger(args.log_path)
    except OSError as error:
        raise cli.UserError(f"--log_path {args.log_path}: cannot write there "
                            f"({error.strerror}); pass --log_path with a writable file"
                             ) from None
    results = []
    runs = len(args.precision) * len(args.batch_sizes)
    with logger.write_failures_reported(
            lambda: what_the_log_keeps(args.log_path, results, runs)):
        logger.log(PARAMETER, vars(args))
        print_header(name, model)
        for precision in args.precision:
            for batch_size in args.batch_sizes:
                with refusing_out_of_memory(batch_flags(batch_size), name, advice):
                    result = benchmark(model, batch_size, args.num_batches, precision, device,
                                       args.warmup_batches, args.seed)
                result.update(device=str(device), device_name=name, model=model.kind,
                              n_users=model.nb_users,
                              n_items=model.nb_items, factors=model.mf_dim,
                              layers=model.mlp_layer_sizes)
                # Logged first: should stdout's reader go away, the log keeps every result.
                logger.log((), result)
                print_row(result)
                results.append(result)
        log_2023_record(logger, results)
    return results


def record_2023(results):
    """The 2023 original's record of a run: per batch size its mean throughput (samples/s)
    and mean, p90, p95 and p99 latency (s), under its key names; each key starts with the
    precision where a run has several (the original runs one a log)."""
    several = len({result["precision"] for result in results}) > 1
    record = {}
    for result in results:
        key = f"{result['precision'] + '_' if several else ''}batch_{result['batch_size']}"
        record[f"{key}_mean_throughput"] = result["throughput"]
        record[f"{key}_mean_latency"] = result["latency_mean_ms"] / 1000.0
        for percentile in PERCENTILES:
            record[f"{key}_p{percentile}_latency"] = result[f"latency_p{percentile}_ms"] / 1000.0
    return record


def log_2023_record(logger, results):
    """The units of record_2023's keys, then the record itself, last in the log, where the
    2023 original's qa/inference_table.py reads it."""
    record = record_2023(results)
    for key in record:
        logger.metadata(key, {"unit": "samples/s" if key.endswith("_throughput") else "s"})
    logger.log((), record)


def what_the_log_keeps(path, results, runs):
    """What a log whose write failed holds, said truly: whole records only, and none at all
    where JsonLogger removed the log it had started."""
    if not os.path.exists(path):
        return "nothing was logged, and the empty log is removed"
    if len(results) < runs:
        return (f"it holds the settings and the {len(results)} row(s) printed above, of the "
                f"{runs} asked for")
    return "it holds the settings and every row printed above, not the 2023 record of them all"


def main(argv=None):
    args = parse_args(argv)
    cli.reuse_freed_memory()
    return run(args)


if __name__ == "__main__":
    cli.run(main)
