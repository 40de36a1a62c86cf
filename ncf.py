"""Train and evaluate NeuMF on a dataset written by convert.py (NVIDIA's NCF recipe).

    python ncf.py --data DIR                      # train; best weights -> CHECKPOINT_DIR/model.pth
    python ncf.py --data DIR --mode test --load_checkpoint_path model.pth
    torchrun --nproc_per_node=N ncf.py --data DIR # one process per GPU (NCCL) or CPU share (gloo)

This file is the command line: flags, the device, the run's setup. Training itself is in
train.py, evaluation in evaluation.py. docs/behaviour.md describes resume, the checkpoint
directory's lock and what a failed run leaves.
"""
import datetime
import math
import os
import re
import time
import warnings
from contextlib import ExitStack

import torch
import torch.distributed as dist

import cli
import dataloading
import evaluation
import scoring
import train
from checkpoint import check_matches, load_checkpoint, load_model, load_state, model_state
from fileio import DirectoryLocked, held_directory
from logger import PARAMETER, JsonLogger
from neumf import MODELS, load_pretrained
from progress import format_seconds
from train import ORIGINAL, Context, log_line

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)
# Counts above this are typing mistakes that would otherwise fail deep inside torch.
MAX_COUNT = 2 ** 31 - 1
# Flags that only some runs may give: refused where the run has no use for them.
ADAM_FLAGS = ("beta1", "beta2", "eps")


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="ncf.py",
                                description="Train a Neural Collaborative Filtering model")
    parser.add_argument("--data", type=str, required=True,
                        help="directory with the files convert.py writes")
    parser.add_argument("--feature_spec_file", type=str, default=dataloading.FEATURE_SPEC,
                        help="the 2023 layout's feature spec in --data, as the 2023 original's "
                             "flag (a directory without it is read in the 2019 layout)")
    parser.add_argument("-e", "--epochs", type=int, default=30, help="epochs to train")
    parser.add_argument("-b", "--batch_size", type=int, default=ORIGINAL.batch_size,
                        help="samples per batch, summed over all processes (an optimiser step "
                             "takes --grads_accumulated batches)")
    parser.add_argument("--valid_batch_size", type=int, default=ORIGINAL.valid_batch_size,
                        help="candidates scored at once in evaluation")
    parser.add_argument("--model", choices=MODELS, default=ORIGINAL.model,
                        help="neumf: the original's model; gmf or mlp: one of its two branches "
                             "alone, whose model.pth can start a NeuMF (--pretrained_gmf/_mlp)")
    parser.add_argument("--pretrained_gmf", type=str, default=None,
                        help="with --pretrained_mlp: start NeuMF from the model.pth of a "
                             "--model gmf run and one of a --model mlp run, as the paper does")
    parser.add_argument("--pretrained_mlp", type=str, default=None,
                        help="the model.pth of a --model mlp run (see --pretrained_gmf)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the GMF output layer in the pretrained NeuMF's final "
                             "layer, 1 - alpha that of the MLP's")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default=ORIGINAL.optimizer,
                        help="adam: the original's; sgd: plain SGD at --learning_rate (the "
                             "paper's for fine-tuning a pretrained NeuMF)")
    parser.add_argument("-f", "--factors", type=int, default=ORIGINAL.factors,
                        help="MF embedding width")
    parser.add_argument("--layers", nargs="+", type=int, default=ORIGINAL.layers,
                        help="MLP layer sizes; the first is split between user and item")
    parser.add_argument("-n", "--negative_samples", type=int, default=ORIGINAL.negative_samples,
                        help="negatives drawn per training positive each epoch")
    parser.add_argument("-l", "--learning_rate", type=float, default=ORIGINAL.learning_rate,
                        help="the optimiser's step size")
    parser.add_argument("-k", "--topk", type=int, default=ORIGINAL.topk,
                        help="the cut-off of HR@k and NDCG@k")
    parser.add_argument("--report_topk", nargs="+", type=int, default=[], metavar="K",
                        help="also report HR and NDCG at these cut-offs, and MRR (-k/--topk "
                             "alone selects the best model and meets --threshold)")
    parser.add_argument("-s", "--seed", type=int, default=ORIGINAL.seed,
                        help="seeds the initial weights and every epoch's negatives")
    parser.add_argument("-t", "--threshold", type=float, default=1.0,
                        help="stop once HR@k reaches this")
    parser.add_argument("-b1", "--beta1", type=float, default=ORIGINAL.beta1, help="Adam's")
    parser.add_argument("-b2", "--beta2", type=float, default=ORIGINAL.beta2, help="Adam's")
    parser.add_argument("--eps", type=float, default=ORIGINAL.eps, help="Adam's")
    parser.add_argument("--dropout", type=float, default=ORIGINAL.dropout,
                        help="dropout after each hidden MLP layer")
    parser.add_argument("--checkpoint_dir", type=str, default="/data/checkpoints/",
                        help="where model.pth (best weights) and last.pth (the training state, "
                             "rewritten every epoch: about 380 MB at ml-20m) go; '' saves "
                             "neither")
    parser.add_argument("--load_checkpoint_path", type=str, default=None,
                        help="weights to evaluate (--mode test; none: the untrained model) or "
                             "to start training from (ignored with --resume)")
    parser.add_argument("--mode", choices=["train", "test"], default="train",
                        help="test: one evaluation of --load_checkpoint_path")
    parser.add_argument("--grads_accumulated", type=int, default=ORIGINAL.grads_accumulated,
                        help="batches per optimiser step")
    parser.add_argument("--opt_level", choices=["O0", "O2"], default="O2",
                        help="O2: mixed precision (float16 on CUDA, bfloat16 on a CPU with bf16 "
                             "units); O0: float32")
    parser.add_argument("--amp", action="store_true", help="mixed precision (same as O2)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model and its loss for training (fuses their "
                             "elementwise passes; meant for GPUs: slower than eager on the CPUs "
                             "measured; the first epoch compiles; a CPU needs a C++ compiler)")
    parser.add_argument("--no_tf32", action="store_true",
                        help="float32 matrix products in IEEE float32 on an Ampere or newer GPU, "
                             "where O0 otherwise runs them in TF32 as the original's figures")
    parser.add_argument("--log_path", type=str, default="log.json",
                        help="the dllogger-format JSON log")
    parser.add_argument("--full_ranking", action="store_true",
                        help="also rank each test positive against every item its user has not "
                             "trained on (HR/NDCG beside the sampled ones; slow at ml-20m on CPU)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from CHECKPOINT_DIR/last.pth")
    # torch.distributed.launch passes --local-rank=N (newer) or --local_rank N (older).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help="set by the legacy launcher; torchrun sets LOCAL_RANK instead")
    args = parser.parse_args(argv)
    check_args(args, parser, parser.given(argv, ("alpha", "factors", "layers") + ADAM_FLAGS))
    return args


def check_args(args, parser, given):
    """parser.error for flags that cannot go together or out of range; `given`: the names of
    the flags among those that only some runs use which the command line gives."""
    if args.optimizer == "sgd":
        adams = [flag for flag in ADAM_FLAGS if flag in given]
        if adams:
            parser.error(f"--{adams[0]} is a setting of Adam; --optimizer sgd has none, drop "
                         f"--{adams[0]}")
    if "alpha" in given and not args.pretrained_gmf:
        parser.error("--alpha weighs the two halves of --pretrained_gmf and --pretrained_mlp; "
                     "pass both, or drop --alpha")
    cli.refuse_unused_shape_flag(parser, given, args.model)
    counts = {"--epochs": (args.epochs, 1), "--batch_size": (args.batch_size, 1),
              "--valid_batch_size": (args.valid_batch_size, 1), "--factors": (args.factors, 1),
              "--topk": (args.topk, 1), "--grads_accumulated": (args.grads_accumulated, 1),
              "--negative_samples": (args.negative_samples, 0),
              "--local_rank": (args.local_rank, 0)}
    for flag, (value, lowest) in counts.items():
        if not lowest <= value <= MAX_COUNT:
            parser.error(f"{flag} must be in [{lowest}, {MAX_COUNT}], got {value}")
    if any(not 1 <= cutoff <= MAX_COUNT for cutoff in args.report_topk):
        parser.error(f"--report_topk cut-offs must be in [1, {MAX_COUNT}], got "
                     f"{' '.join(map(str, args.report_topk))}")
    cli.check_seed(parser, args.seed)
    for flag in ("learning_rate", "threshold", "beta1", "beta2", "eps", "dropout", "alpha"):
        if not math.isfinite(getattr(args, flag)):
            parser.error(f"--{flag} must be a finite number, got {getattr(args, flag)}")
    if any(not 1 <= size <= MAX_COUNT for size in args.layers) or args.layers[0] % 2:
        parser.error(f"--layers must be positive and the first even (it is split between "
                     f"user and item embeddings), got {' '.join(map(str, args.layers))}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.learning_rate <= 0 or args.eps <= 0:
        parser.error("--learning_rate and --eps must be positive")
    if not (0.0 <= args.beta1 < 1.0 and 0.0 <= args.beta2 < 1.0):
        parser.error("--beta1 and --beta2 must be in [0, 1)")
    pretrained = [flag for flag in ("pretrained_gmf", "pretrained_mlp") if getattr(args, flag)]
    if pretrained and args.model != "neumf":
        parser.error(f"--{pretrained[0]} starts a NeuMF, not --model {args.model}; drop it or "
                     f"pass --model neumf")
    if len(pretrained) == 1:
        parser.error(f"--{pretrained[0]} needs its other half: pass both --pretrained_gmf and "
                     f"--pretrained_mlp")
    if pretrained and args.load_checkpoint_path:
        parser.error("--load_checkpoint_path and --pretrained_gmf/--pretrained_mlp are two "
                     "starting points; pass one of them")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.resume and args.mode == "test":
        parser.error("--resume continues training; to evaluate a run's best weights pass "
                     "--mode test --load_checkpoint_path CHECKPOINT_DIR/model.pth")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume continues CHECKPOINT_DIR/last.pth, and --checkpoint_dir '' saves "
                     "none; pass the --checkpoint_dir of the run to resume")


def init_distributed(args):
    """Pick the device once: LOCAL_RANK's GPU + NCCL, else the GPU, else the CPU + gloo."""
    world_size = cli.world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank))
    # A single process is rank 0 whichever GPU --local_rank picks; it must print and save.
    rank = int(os.environ.get("RANK", local_rank if world_size > 1 else 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        backend = "nccl"
        if world_size > 1:
            print(f"[rank {rank}] {device} ({torch.cuda.get_device_name(device)})", flush=True)
    else:
        # A CPU process has no device to pick: a local rank beyond the processes is a mistake
        # that would leave it scoring nobody's share (or printing nothing as a non-main rank).
        if local_rank >= world_size:
            raise cli.UserError(f"--local_rank {local_rank}: only {world_size} process(es) on "
                                f"this machine and no GPU; leave --local_rank to the launcher")
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    return Context(device, rank, world_size, rank == 0, mixed_precision_dtype(args, device),
                   set_tf32(args, device))


def set_tf32(args, device):
    """Decide TF32 for float32 matrix products on `device` explicitly (PyTorch's default has
    been IEEE float32 since 1.12, the original's figures ran TF32, NGC images force it by
    environment) and return whether it is in effect."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    active = scoring.tf32_active(device)
    if args.no_tf32 and active:
        raise cli.UserError("--no_tf32: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 in the environment (NGC "
                            "images set it) makes cuBLAS use TF32 whatever torch allows; run with "
                            "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0 for IEEE float32")
    return active


def cuda_index(local_rank, visible):
    """The GPU a process of local rank `local_rank` takes among the `visible` ones.

    A launcher that gives each process only its own GPU (SLURM's --gpus-per-task=1, a
    CUDA_VISIBLE_DEVICES per rank) leaves one visible whatever the rank: that one is this
    process's. Otherwise local rank N takes GPU N; two processes never share one, which NCCL
    refuses (one GPU visible and no CUDA_VISIBLE_DEVICES: every process sees the same one).
    """
    if visible == 1 and (local_rank == 0 or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return 0
    if local_rank >= visible:
        raise cli.UserError(f"local rank {local_rank} has no GPU ({visible} visible); start at "
                            f"most one process per GPU")
    return local_rank


def wants_mixed_precision(args):
    return args.amp or args.opt_level == "O2"


def mixed_precision_dtype(args, device):
    """The autocast dtype --opt_level/--amp asks for on `device`; None is float32."""
    if not wants_mixed_precision(args):
        return None
    if device.type == "cuda":
        return torch.float16
    # bf16 emulated on a CPU without bf16 units (AVX2 only) ran about 20x slower than float32.
    return torch.bfloat16 if train.cpu_has_native_bf16() else None


def prepare_checkpoint_dir(path, held):
    """Lock `path` for this run, until `held` (its ExitStack) closes; a directory created here
    is removed again when the run fails having saved nothing in it (fileio.held_directory)."""
    try:
        held.enter_context(held_directory(path))
    except DirectoryLocked as locked:
        raise cli.UserError(f"--checkpoint_dir {path}: in use by another training (pid "
                            f"{locked.holder or 'unknown'}); wait for it to end or pass another "
                            f"--checkpoint_dir") from None
    except OSError as error:
        raise cli.UserError(f"--checkpoint_dir {path}: cannot write there ({error.strerror}); "
                            f"pass --checkpoint_dir with a writable directory") from None


def load_splits(args, ctx):
    splits = dataloading.load_splits(args.data, ctx.device, args.feature_spec_file)
    if splits.metadata is None:
        log_line(ctx, f"note: {args.data} has no {dataloading.METADATA}: taken as converted by "
                      f"an original's convert.py or transcode.py (its tensors passed the same "
                      f"checks)")
    return splits


def load_starting_weights(args, ctx, model, nb_users, nb_items):
    """The weights a run starts from: --load_checkpoint_path, checked as strictly in both modes.

    Loaded before the log is opened, so a refused file leaves the previous log be. With
    --resume, last.pth holds the model and the warm-start file would be overwritten anyway.
    """
    path = args.load_checkpoint_path
    if args.mode == "train" and args.resume:
        if path or args.pretrained_gmf:
            flags = (f"--load_checkpoint_path {path} is" if path else
                     "--pretrained_gmf and --pretrained_mlp are")
            log_line(ctx, f"note: --resume continues "
                          f"{os.path.join(args.checkpoint_dir, 'last.pth')}; "
                          f"{flags} not used")
        return
    if args.pretrained_gmf:
        halves = {}
        for kind, flag in (("gmf", "--pretrained_gmf"), ("mlp", "--pretrained_mlp")):
            half_path = getattr(args, flag.removeprefix("--"))
            half = load_model(half_path, ctx.device)
            check_matches(half.state_dict(), half_path, nb_users, nb_items, args.factors,
                          args.layers, kind=kind, kind_flag=flag)
            halves[kind] = half
        load_pretrained(model, halves["gmf"], halves["mlp"], args.alpha)
        log_line(ctx, f"Starting NeuMF from {args.pretrained_gmf} and {args.pretrained_mlp} "
                      f"(alpha {args.alpha})")
        return
    if not path:
        if args.mode == "test":
            log_line(ctx, "note: no --load_checkpoint_path: evaluating the untrained model "
                          "(a chance-level baseline)")
        return
    state = model_state(load_checkpoint(path), path)
    check_matches(state, path, nb_users, nb_items, args.factors, args.layers, kind=args.model)
    load_state(model, state, path)
    log_line(ctx, f"{'Evaluating' if args.mode == 'test' else 'Starting training from'} {path}")


def note_full_ranking_cost(args, ctx, model, splits):
    """Say what --full_ranking will cost before paying it: it scores every item for every user,
    after every epoch (at five ml-20m copies about 4 hours on the 2-core VM)."""
    seconds = evaluation.full_ranking_seconds(model, splits, ctx)
    every = " after every epoch" if args.mode == "train" else ""
    log_line(ctx, f"note: --full_ranking scores all {splits.nb_items:,} items for every user: "
                  f"about {format_seconds(seconds)}{every} on this {ctx.device.type} (timed on "
                  f"the first users)" + ("; drop it to train without" if seconds > 3600 else ""))


def log_metric_metadata(logger, args):
    """dllogger METADATA records describing the metrics, as the 2023 original writes them."""
    k = args.topk
    for metric, metadata in ((f"hr@{k}", {"unit": None, "format": ":.5f"}),
                             (f"ndcg@{k}", {"unit": None, "format": ":.5f"}),
                             ("validation_loss", {"unit": None, "format": ":.5f"}),
                             ("train_throughput", {"unit": "samples/s", "format": ":.3e"}),
                             ("eval_throughput", {"unit": "samples/s", "format": ":.3e"}),
                             ("time_to_target", {"unit": "s", "format": ":.2f"}),
                             ("time_to_best_model", {"unit": "s", "format": ":.2f"})):
        logger.metadata(metric, metadata)


def open_logger(args, ctx):
    # Opened only once the data has loaded, so a mistyped --data leaves an existing log be.
    try:
        return JsonLogger(args.log_path if ctx.is_main else None, append=args.resume)
    except OSError as error:
        raise cli.UserError(f"--log_path {args.log_path}: cannot write there "
                            f"({error.strerror}); pass --log_path with a writable file") from None


def print_notes(args, ctx):
    """What the run will not do that a user may expect of it."""
    if args.mode == "train" and not args.checkpoint_dir:
        log_line(ctx, "note: --checkpoint_dir '': model.pth and last.pth are not saved")
    if args.mode == "train" and not args.resume and args.checkpoint_dir:
        last = os.path.join(args.checkpoint_dir, "last.pth")
        if ctx.is_main and os.path.exists(last):
            log_line(ctx, f"note: {last} exists and will be replaced; pass --resume to "
                          f"continue it instead")
    if wants_mixed_precision(args) and ctx.autocast_dtype is None:
        log_line(ctx, "note: mixed precision (--opt_level O2, --amp) needs CUDA or a CPU with "
                      "bf16 units (AMX, AVX512_BF16); training in float32 on this CPU")
    elif ctx.autocast_dtype == torch.bfloat16 and args.mode == "train":
        log_line(ctx, "note: training under bfloat16 autocast (--opt_level O2 on a CPU with "
                      "bf16 units); --opt_level O0 trains in float32")
    if ctx.precision == "tf32" and args.mode == "train":
        log_line(ctx, "note: float32 matrix products run in TF32 on this GPU, as the original's "
                      "O0 figures; --no_tf32 keeps them IEEE float32")


def run(args):
    run_start = time.time()
    ctx = init_distributed(args)
    with ExitStack() as held:
        held.callback(end_process_group, ctx)
        if args.mode == "train" and ctx.is_main and args.checkpoint_dir:
            # Held until run() returns, so two runs never share one directory; the OS
            # releases it if the process dies.
            prepare_checkpoint_dir(args.checkpoint_dir, held)
        print_notes(args, ctx)
        splits = load_splits(args, ctx)
        # Not before: loading peaks 2 GB above what it keeps at five times ml-20m, and the
        # C allocator would keep that for the rest of the run, in every process.
        cli.reuse_freed_memory()
        # Before the model is built and the log opened (which would empty an existing one).
        evaluation.check_cutoffs(args, splits.test.items.shape[1])
        if args.mode == "train":
            train.check_epoch_holds_a_step(len(splits.positives), args, ctx)
        model, training_loss = train.build_model(args, splits.nb_users, splits.nb_items, ctx)
        log_line(ctx, str(model))
        log_line(ctx, f"{sum(parameter.numel() for parameter in model.parameters())} parameters")
        load_starting_weights(args, ctx, model, splits.nb_users, splits.nb_items)
        if args.full_ranking:
            note_full_ranking_cost(args, ctx, model, splits)
        logger = open_logger(args, ctx)
        with logger.write_failures_reported("the checkpoints saved so far are complete"):
            logger.log(PARAMETER, {**vars(args), "world_size": ctx.world_size,
                                   "device": str(ctx.device), "precision": ctx.precision,
                                   "nb_users": splits.nb_users, "nb_items": splits.nb_items})
            log_metric_metadata(logger, args)
            if args.mode == "test":
                return train.test(args, ctx, model, splits, logger)
            return train.train(args, ctx, model, training_loss, splits, logger, run_start)


def end_process_group(ctx):
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except torch.cuda.OutOfMemoryError:
        raise cli.UserError("out of GPU memory; lower -b/--batch_size or --valid_batch_size, or "
                            "use more GPUs") from None
    except RuntimeError as error:
        if cli.is_cpu_out_of_memory(error):
            raise cli.UserError("out of memory; lower -b/--batch_size or --valid_batch_size"
                                ) from None
        lost = lost_peer(error)
        if lost is None:
            raise
        raise cli.UserError(f"another process of this run stopped ({lost}); its own error "
                            f"line, here or in its node's log, says why") from None


# What a collective raises when it lost another process (failed, killed, timed out): the
# backend, and the part of its message's first line to keep. gloo raises a RuntimeError that
# starts with its source location; NCCL a DistBackendError naming its source, then the reason.
LOST_PEER_MESSAGES = (
    ("gloo", re.compile(r"\[[^\]]*gloo/transport[^\]]*\]\s*(.*?)(?:\. .*)?$")),
    ("nccl", re.compile(r"NCCL error in: [^,]*, (.*?)(?:, NCCL version [\w.]+)?$")),
    ("nccl", re.compile(r".*Watchdog caught collective operation (timeout: .*)$")),
)


def lost_peer(error):
    """What the backend said when a collective lost another process, or None for any other
    error. The surviving process would otherwise end in a traceback that buries the failed
    one's message."""
    lines = str(error).strip().splitlines()
    if cli.world_size() == 1 or not lines:
        return None
    for backend, pattern in LOST_PEER_MESSAGES:
        said = pattern.match(lines[0])
        if said:
            return f"{backend}: {said.group(1)}"
    return None


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*torch.distributed.launch.*")
    cli.run(main)
