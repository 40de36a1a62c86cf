"""Train and evaluate NeuMF on a dataset written by convert.py (NVIDIA's NCF recipe).

    python ncf.py --data DIR                      # train; best weights -> CHECKPOINT_DIR/model.pth
    python ncf.py --data DIR --mode test --load_checkpoint_path model.pth
    torchrun --nproc_per_node=N ncf.py --data DIR # one process per GPU (NCCL) or CPU share (gloo)
"""
import datetime
import math
import os
import re
import sys
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
import dataloading
import evaluation
from checkpoint import (CheckpointError, atomic_save, check_matches, check_training_state,
                        load_checkpoint, load_model, load_state, model_state)
from fileio import DirectoryLocked, held_directory
from logger import PARAMETER, JsonLogger
from neumf import MODELS, build, load_pretrained, parameter_count

# Harmless to change on --resume (a warning); anything else that differs changes the model or
# the data an epoch is made of, so the run could not equal an uninterrupted one (a refusal).
# --topk is not among them: the saved best HR is at the saved cut-off, and new epochs would be
# compared with it.
RESUME_HARMLESS_ARGS = {"epochs", "threshold", "log_path", "checkpoint_dir", "valid_batch_size",
                        "resume", "local_rank", "mode", "load_checkpoint_path", "data",
                        "full_ranking", "report_topk", "pretrained_gmf", "pretrained_mlp",
                        "alpha"}
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)
# Counts above this are typing mistakes that would otherwise fail deep inside torch.
MAX_COUNT = 2 ** 31 - 1
# Flags that only some runs use, with the defaults cli.fill_defaults sets after check_args.
DEFAULTS_AFTER_CHECKS = {"beta1": 0.25, "beta2": 0.5, "eps": 1e-8, "alpha": 0.5, "factors": 64,
                         "layers": [256, 256, 128, 64]}


class RunError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="ncf.py",
                           description="Train a Neural Collaborative Filtering model")
    parser.add_argument("--data", type=str, required=True,
                        help="directory with the files convert.py writes")
    parser.add_argument("-e", "--epochs", type=int, default=30)
    parser.add_argument("-b", "--batch_size", type=int, default=2 ** 20,
                        help="samples per batch, summed over all processes (an optimiser step "
                             "takes --grads_accumulated batches)")
    parser.add_argument("--valid_batch_size", type=int, default=2 ** 20)
    parser.add_argument("--model", choices=MODELS, default="neumf",
                        help="neumf: the original's model; gmf or mlp: one of its two branches "
                             "alone, whose model.pth can start a NeuMF (--pretrained_gmf/_mlp)")
    parser.add_argument("--pretrained_gmf", type=str, default=None,
                        help="with --pretrained_mlp: start NeuMF from the model.pth of a "
                             "--model gmf run and one of a --model mlp run, as the paper does")
    parser.add_argument("--pretrained_mlp", type=str, default=None)
    parser.add_argument("--alpha", type=float,
                        help="weight of the GMF output layer in the pretrained NeuMF's final "
                             "layer, 1 - alpha that of the MLP's (default 0.5)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                        help="adam: the original's; sgd: plain SGD at --learning_rate (the "
                             "paper's for fine-tuning a pretrained NeuMF)")
    parser.add_argument("-f", "--factors", type=int, help="MF embedding width (default 64)")
    parser.add_argument("--layers", nargs="+", type=int,
                        help="MLP layer sizes; the first is split between user and item "
                             "(default 256 256 128 64)")
    parser.add_argument("-n", "--negative_samples", type=int, default=4)
    parser.add_argument("-l", "--learning_rate", type=float, default=0.0045)
    parser.add_argument("-k", "--topk", type=int, default=10)
    parser.add_argument("--report_topk", nargs="+", type=int, default=[], metavar="K",
                        help="also report HR and NDCG at these cut-offs, and MRR (-k/--topk "
                             "alone selects the best model and meets --threshold)")
    parser.add_argument("-s", "--seed", type=int, default=1)
    parser.add_argument("-t", "--threshold", type=float, default=1.0,
                        help="stop once HR@k reaches this")
    parser.add_argument("-b1", "--beta1", type=float, help="Adam's (default 0.25)")
    parser.add_argument("-b2", "--beta2", type=float, help="Adam's (default 0.5)")
    parser.add_argument("--eps", type=float, help="Adam's (default 1e-8)")
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--checkpoint_dir", type=str, default="/data/checkpoints/",
                        help="where model.pth (best weights) and last.pth (the training state, "
                             "rewritten every epoch: about 380 MB at ml-20m) go; '' saves "
                             "neither")
    parser.add_argument("--load_checkpoint_path", type=str, default=None,
                        help="weights to evaluate (--mode test; none: the untrained model) or "
                             "to start training from (ignored with --resume)")
    parser.add_argument("--mode", choices=["train", "test"], default="train")
    parser.add_argument("--grads_accumulated", type=int, default=1,
                        help="batches per optimiser step")
    parser.add_argument("--opt_level", choices=["O0", "O2"], default="O2",
                        help="O2: mixed precision on CUDA; O0: float32")
    parser.add_argument("--amp", action="store_true", help="mixed precision (same as O2)")
    parser.add_argument("--log_path", type=str, default="log.json")
    parser.add_argument("--full_ranking", action="store_true",
                        help="also rank each test positive against every item its user has not "
                             "trained on (HR/NDCG beside the sampled ones; slow at ml-20m on CPU)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from CHECKPOINT_DIR/last.pth")
    # torch.distributed.launch passes --local-rank=N (newer) or --local_rank N (older).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def check_args(args, parser):
    # Before the defaults are filled in, which would hide whether these were given.
    if args.optimizer == "sgd":
        adams = [flag for flag in ("beta1", "beta2", "eps") if getattr(args, flag) is not None]
        if adams:
            parser.error(f"--{adams[0]} is a setting of Adam; --optimizer sgd has none, drop "
                         f"--{adams[0]}")
    if args.alpha is not None and not args.pretrained_gmf:
        parser.error("--alpha weighs the two halves of --pretrained_gmf and --pretrained_mlp; "
                     "pass both, or drop --alpha")
    cli.refuse_unused_shape_flag(parser, args, args.model)
    cli.fill_defaults(args, DEFAULTS_AFTER_CHECKS)
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


@dataclass
class Context:
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    # None trains in float32; float16 (CUDA, with loss scaling) or bfloat16 (a CPU with
    # native bf16 units) trains under autocast in that type.
    autocast_dtype: torch.dtype | None = None

    @property
    def precision(self):
        """The name checkpoints and logs record: float32, float16 or bfloat16."""
        return str(self.autocast_dtype or torch.float32).removeprefix("torch.")


def init_distributed(args):
    """Pick the device once: LOCAL_RANK's GPU + NCCL, else the GPU, else the CPU + gloo."""
    world_size = cli.world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank))
    # A single process is rank 0 whichever GPU --local_rank picks; it must print and save.
    rank = int(os.environ.get("RANK", local_rank if world_size > 1 else 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RunError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
                           f"visible); start at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        # A CPU process has no device to pick: a local rank beyond the processes is a mistake
        # that would leave it scoring nobody's share (or printing nothing as a non-main rank).
        if local_rank >= world_size:
            raise RunError(f"--local_rank {local_rank}: only {world_size} process(es) on this "
                           f"machine and no GPU; leave --local_rank to the launcher")
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    return Context(device, rank, world_size, rank == 0, mixed_precision_dtype(args, device))


def wants_mixed_precision(args):
    return args.amp or args.opt_level == "O2"


def mixed_precision_dtype(args, device):
    """The autocast dtype --opt_level/--amp asks for on `device`; None is float32."""
    if not wants_mixed_precision(args):
        return None
    if device.type == "cuda":
        return torch.float16
    # bf16 emulated on a CPU without bf16 units (AVX2 only) ran about 20x slower than float32.
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16():
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def log_line(ctx, message):
    if ctx.is_main:
        try:
            print(message, flush=True)
        except BrokenPipeError:
            # The run goes on training and saving, and prints into /dev/null from now on.
            cli.discard_stdout()


def prepare_checkpoint_dir(path, held):
    """Lock `path` for this run, until `held` (its ExitStack) closes; a directory created here
    is removed again when the run fails having saved nothing in it (fileio.held_directory)."""
    try:
        held.enter_context(held_directory(path))
    except DirectoryLocked as locked:
        raise RunError(f"--checkpoint_dir {path}: in use by another training (pid "
                       f"{locked.holder or 'unknown'}); wait for it to end or pass another "
                       f"--checkpoint_dir") from None
    except OSError as error:
        raise RunError(f"--checkpoint_dir {path}: cannot write there ({error.strerror}); "
                       f"pass --checkpoint_dir with a writable directory") from None


def build_model(args, nb_users, nb_items, ctx):
    check_model_fits(args, nb_users, nb_items, ctx)
    torch.manual_seed(args.seed)
    try:
        model = build(args.model, nb_users, nb_items, args.factors, args.layers,
                      dropout=args.dropout)
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "alloc" not in str(error):
            raise
        raise RunError(f"--factors {args.factors} --layers {' '.join(map(str, args.layers))}: "
                       f"the model cannot be allocated; use smaller sizes") from None
    model = model.to(ctx.device)
    if ctx.world_size > 1:
        return model, torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model, model


def check_model_fits(args, nb_users, nb_items, ctx):
    """Refuse model sizes whose training state cannot fit, before torch tries to allocate it.

    Training holds four float32 copies of the parameters (weights, gradients, Adam's two
    moments); a size past the machine's memory would otherwise end in a traceback or the
    kernel's OOM killer rather than a message.
    """
    needed = 4 * 4 * parameter_count(nb_users, nb_items, args.factors, args.layers, args.model)
    if ctx.device.type == "cuda":
        available = torch.cuda.get_device_properties(ctx.device).total_memory
    else:
        available = cli.physical_memory()
    if needed > available:
        raise RunError(f"--factors {args.factors} --layers {' '.join(map(str, args.layers))}: "
                       f"training this model needs about {needed / 2 ** 30:,.0f} GiB, the "
                       f"{ctx.device.type} has {available / 2 ** 30:,.0f} GiB; use smaller sizes")


def build_optimizer(args, model):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.learning_rate, fused=True)
    # fused Adam computes the same update as the loop version, in one kernel per step.
    return torch.optim.Adam(model.parameters(), lr=args.learning_rate,
                            betas=(args.beta1, args.beta2), eps=args.eps, fused=True)


def epoch_generator(seed, epoch, device):
    """The generator an epoch's negatives and shuffle are drawn from.

    Seeded from (seed, epoch) rather than carried over, so every rank draws the same negatives
    whatever its share size, and a resumed run needs no saved data-generator state.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return generator


def samples_per_epoch(nb_positives, args):
    return nb_positives * (1 + args.negative_samples)


def steps_per_epoch(nb_samples, args, ctx):
    """Optimiser steps every rank takes: from the smallest share, so no rank waits on another."""
    local_batch = args.batch_size // ctx.world_size
    full_batches = (nb_samples // ctx.world_size) // local_batch
    return full_batches // args.grads_accumulated


def check_epoch_holds_a_step(nb_positives, args, ctx):
    nb_samples = samples_per_epoch(nb_positives, args)
    if args.batch_size < ctx.world_size:
        raise RunError(f"--batch_size {args.batch_size} is smaller than the {ctx.world_size} "
                       f"processes; each process needs at least one sample per batch")
    if steps_per_epoch(nb_samples, args, ctx) == 0:
        fitting = 2 ** int(math.log2(max(1, nb_samples // args.grads_accumulated)))
        raise RunError(
            f"--batch_size {args.batch_size} x --grads_accumulated {args.grads_accumulated} "
            f"exceeds an epoch of {nb_samples:,} samples ({nb_positives:,} positives x "
            f"(1 + {args.negative_samples} negatives)), so no full batch would be trained; "
            f"use -b {fitting} or smaller")


def grad_scaler(ctx):
    """Dynamic loss scaling where float16's range needs it; bfloat16 has float32's range."""
    return torch.amp.GradScaler(ctx.device.type, enabled=ctx.autocast_dtype == torch.float16)


def train_epoch(ddp_model, optimizer, scaler, train_users, train_items, nb_items, epoch, args,
                ctx):
    """One epoch; returns the mean training loss over all ranks."""
    ddp_model.train()
    generator = epoch_generator(args.seed, epoch, ctx.device)
    users, items, labels = dataloading.epoch_samples(
        train_users, train_items, nb_items, args.negative_samples, ctx.world_size, ctx.rank,
        generator)
    local_batch = args.batch_size // ctx.world_size
    steps = steps_per_epoch(samples_per_epoch(len(train_users), args), args, ctx)
    epoch_batches = dataloading.batches(users, items, labels, local_batch)
    loss_sum = torch.zeros((), device=ctx.device)
    for _ in progress(range(steps), ctx, f"epoch {epoch}"):
        pieces = [piece for _, batch in zip(range(args.grads_accumulated), epoch_batches)
                  for piece in chunks(batch, ctx)]
        for index, (user, item, label, weight) in enumerate(pieces):
            # DDP all-reduces gradients only on the piece that completes a step.
            last_piece = index == len(pieces) - 1
            sync = nullcontext() if last_piece or ctx.world_size == 1 else ddp_model.no_sync()
            with sync:
                with torch.autocast(ctx.device.type, dtype=ctx.autocast_dtype,
                                    enabled=ctx.autocast_dtype is not None):
                    logits = ddp_model(user, item).view(-1)
                    loss = F.binary_cross_entropy_with_logits(logits.float(), label.float())
                    loss = loss * weight
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if ctx.world_size > 1:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / max(1, steps * args.grads_accumulated * ctx.world_size)


def chunks(batch, ctx):
    """A batch as pieces of at most dataloading.CPU_CHUNK samples on a CPU, weighted to sum to
    its mean loss.

    The gradient is the batch's (each piece's mean loss is weighted by its share of the batch),
    but a CPU holds the activations of one piece (about 0.4 GB) rather than of the default
    batch of a million samples (about 6 GB), and runs faster for it. Much smaller pieces are
    slower again: each pays for dense embedding gradients of the full tables. A GPU takes the
    batch whole.
    """
    user, item, label = batch
    piece = dataloading.CPU_CHUNK
    if ctx.device.type == "cuda" or len(user) <= piece:
        return [(user, item, label, 1.0)]
    return [(user[start:start + piece], item[start:start + piece], label[start:start + piece],
             min(piece, len(user) - start) / len(user))
            for start in range(0, len(user), piece)]


def progress(iterable, ctx, description):
    """A progress bar on an interactive terminal (main rank only); the bare iterable otherwise."""
    if not (ctx.is_main and sys.stdout.isatty()):
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


def synchronize(ctx):
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def load_data(args, ctx):
    """What training and the test split need (see load_splits)."""
    return load_splits(args, ctx)[0]


def load_splits(args, ctx):
    """(nb_users, nb_items, train_users, train_items, test_users, test_items, duplicate_mask),
    and the validation split's (users, items, duplicate_mask), or None without one."""
    dataset = dataloading.open_dataset(args.data)
    if dataset.metadata is None:
        log_line(ctx, f"note: {args.data} has no {dataloading.METADATA}: taken as converted by "
                      f"the original convert.py (its tensors passed the same checks)")
    # Saved with the training state so that --resume can refuse other data.
    args.data_fingerprint = dataset.fingerprint
    train, test, negatives, nb_users, nb_items = dataset[:5]
    # int32 ids halve the memory of an epoch's samples; embeddings accept them directly.
    id_dtype = torch.int32 if max(nb_users, nb_items) < 2 ** 31 else torch.int64
    train_users = train[:, 0].to(ctx.device, id_dtype)
    train_items = train[:, 1].to(ctx.device, id_dtype)
    test_users, test_items, duplicate_mask = candidates_on_device(test, negatives, id_dtype, ctx)
    validation_data = None
    if dataset.validation is not None:
        validation_data = candidates_on_device(dataset.validation, dataset.validation_negatives,
                                               id_dtype, ctx)
    return (nb_users, nb_items, train_users, train_items, test_users, test_items,
            duplicate_mask), validation_data


def candidates_on_device(pairs, negatives, id_dtype, ctx):
    """create_test_data's (users, items, duplicate_mask) on the device, ids in id_dtype."""
    users, items, duplicate_mask = (
        tensor.to(ctx.device) for tensor in dataloading.create_test_data(pairs, negatives))
    return users.to(id_dtype), items.to(id_dtype), duplicate_mask


def save_checkpoint(path, model, optimizer, scaler, history, best, args, ctx, nb_users, nb_items,
                    nb_train):
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": history[-1]["epoch"] + 1,
        "best": best,
        "history": history,
        "args": vars(args),
        "precision": ctx.precision,
        "data": {"nb_users": nb_users, "nb_items": nb_items, "nb_train": nb_train,
                 "fingerprint": args.data_fingerprint},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
    }
    atomic_save(state, path)


def check_resume_args(saved_args, args, path):
    current = vars(args)
    # The shape flag the model has no use for (--layers of a GMF) is a default now, and may be
    # anything in a last.pth written before it was refused.
    unused = cli.UNUSED_SHAPE_FLAGS.get(args.model, ("",))[0].removeprefix("--")
    differing = sorted(key for key in current if key in saved_args and key != unused and
                       current[key] != saved_args[key])
    refused = [f"{key} ({saved_args[key]} -> {current[key]})" for key in differing
               if key not in RESUME_HARMLESS_ARGS]
    if refused:
        verb = "differs" if len(refused) == 1 else "differ"
        raise RunError(f"{path}: cannot resume: {', '.join(refused)} {verb} from the saved run, "
                       f"which would change the model, its data or how the best epoch is chosen; "
                       f"start a new run in another --checkpoint_dir, or resume with the saved "
                       f"values")
    return [f"--{key} {saved_args[key]} -> {current[key]}" for key in differing
            if key not in ("resume", "local_rank", "data")]


def resume_state(args, ctx, model, optimizer, scaler, nb_users, nb_items, nb_train):
    path = os.path.join(args.checkpoint_dir, "last.pth")
    state = load_checkpoint(path)
    weights = check_training_state(state, path)
    if state["precision"] != ctx.precision:
        raise RunError(f"{path}: the saved run trained in {state['precision']}, this one would "
                       f"train in {ctx.precision} (on {ctx.device.type}); resume on the same kind "
                       f"of device (CUDA, CPU with or without bf16 units) with the same "
                       f"--opt_level/--amp")
    saved_data = state["data"]
    check_matches(weights, path, nb_users, nb_items)
    if saved_data["nb_train"] != nb_train:
        raise RunError(f"{path}: checkpoint was trained on {saved_data['nb_train']} training "
                       f"positives, --data has {nb_train}; resume with the same data")
    if saved_data.get("fingerprint") != args.data_fingerprint:
        raise RunError(f"{path}: the saved run's data fingerprint differs from that of --data "
                       f"{args.data} (same counts, other content: converted with another "
                       f"--seed, say; or saved before fingerprints); resume with the same data "
                       f"or start a new run")
    if state["args"]["data"] != args.data:
        log_line(ctx, f"warning: resuming with --data {args.data} instead of "
                      f"{state['args']['data']}, which holds the same data")
    changes = check_resume_args(state["args"], args, path)
    for change in changes:
        log_line(ctx, f"warning: resuming with a changed setting: {change}")
    # After the settings: a run saved before --model existed records no kind to compare.
    check_matches(weights, path, nb_users, nb_items, kind=args.model)
    load_state(model, weights, path)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], ctx.device)
    log_line(ctx, f"Resuming from {path}: {state['epoch']} epochs done, best HR@{args.topk} "
                  f"{state['best']['hr']:.4f} at epoch {state['best']['epoch']}")
    return state["epoch"], state["best"], state["history"]


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


def run_test(args, ctx, model, data, validation_data, logger):
    nb_users, nb_items, train_users, train_items, *test_data = data
    synchronize(ctx)
    start = time.time()
    metrics, validation_loss, candidates = evaluation.sampled_evaluation(
        model, test_data, validation_data, args, ctx)
    synchronize(ctx)
    val_time = time.time() - start
    throughput = candidates / val_time
    line = (f"{evaluation.metrics_text(metrics)}, val_time = {val_time:.2f}, eval_throughput = "
            f"{throughput:.0f} samples/s, validation_loss = {validation_loss:.4f}")
    record = {**metrics, "eval_throughput": throughput, "validation_loss": validation_loss,
              "validation_epoch_time": val_time}
    if args.full_ranking:
        full = evaluation.full_ranking_evaluation(model, train_users, train_items, test_data,
                                                  validation_data, args, ctx)
        metrics.update(full)
        record.update(full)
        line += f", {evaluation.metrics_text(full)}"
    log_line(ctx, line)
    logger.log((), record)
    result = {"hr": metrics[f"hr@{args.topk}"], "ndcg": metrics[f"ndcg@{args.topk}"],
              "eval_throughput": throughput, "validation_loss": validation_loss,
              "metrics": metrics}
    if args.full_ranking:
        result.update(full_hr=metrics[f"full_hr@{args.topk}"],
                      full_ndcg=metrics[f"full_ndcg@{args.topk}"])
    return result


def parameters_are_finite(model):
    return all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters())


def train(args, ctx, model, ddp_model, data, validation_data, logger, run_start):
    nb_users, nb_items, train_users, train_items, *test_data = data
    nb_samples = samples_per_epoch(len(train_users), args)
    optimizer = build_optimizer(args, model)
    scaler = grad_scaler(ctx)
    first_epoch, best = 0, {"hr": 0.0, "ndcg": 0.0, "epoch": -1, "train_seconds": 0.0,
                            "run_seconds": 0.0, "time_to_best": None, "time_to_target": None,
                            "train_time_to_best": None, "train_time_to_target": None}
    history = []
    if args.resume:
        first_epoch, best, history = resume_state(args, ctx, model, optimizer, scaler, nb_users,
                                                  nb_items, len(train_users))
    # Wall-clock seconds as the original counts them (loading and evaluation included), carried
    # over from the processes a resumed run was made of, up to their last saved epoch.
    seconds_before = best["run_seconds"]
    logger.log(PARAMETER, {"first_epoch": first_epoch, "resumed": args.resume})
    last_path = os.path.join(args.checkpoint_dir, "last.pth")
    # The log key prefix of the split that selects the model and meets --threshold.
    selecting = "" if validation_data is None else "val_"
    for epoch in range(first_epoch, args.epochs):
        synchronize(ctx)
        start = time.time()
        train_loss = train_epoch(ddp_model, optimizer, scaler, train_users, train_items,
                                 nb_items, epoch, args, ctx)
        synchronize(ctx)
        train_time = time.time() - start
        # Under float16 loss scaling an overflowing step is skipped by the scaler, so only
        # weights gone non-finite mean the run is lost; otherwise a non-finite loss already does.
        if not parameters_are_finite(model) or (not scaler.is_enabled()
                                                and not math.isfinite(train_loss)):
            kept = (f"{last_path} still holds epoch {epoch - 1}" if args.checkpoint_dir and
                    epoch > first_epoch else "nothing of this run was saved")
            raise RunError(f"epoch {epoch}: training diverged (loss {train_loss}); {kept}; "
                           f"lower -l/--learning_rate")
        metrics, validation_loss, candidates = evaluation.sampled_evaluation(
            model, test_data, validation_data, args, ctx)
        synchronize(ctx)
        val_time = time.time() - start - train_time
        best["train_seconds"] += train_time
        best["run_seconds"] = seconds_before + time.time() - run_start
        record = {"epoch": epoch, **metrics,
                  "train_loss": train_loss, "validation_loss": validation_loss,
                  "train_throughput": nb_samples / train_time,
                  "eval_throughput": candidates / val_time,
                  "train_epoch_time": train_time, "validation_epoch_time": val_time}
        line = (f"Epoch {epoch}: {evaluation.metrics_text(metrics)}, "
                f"train_loss = {train_loss:.4f}, validation_loss = {validation_loss:.4f}, "
                f"train_time = {train_time:.2f}, val_time = {val_time:.2f}")
        if args.full_ranking:
            full = evaluation.full_ranking_evaluation(model, train_users, train_items,
                                                      test_data, validation_data, args, ctx)
            metrics.update(full)
            record.update(full)
            line += f", {evaluation.metrics_text(full)}"
        history.append(record)
        log_line(ctx, line)
        logger.log((epoch,), record)
        # The validation split, where there is one, picks the model and stops the run, so
        # that the test figures reported for it were not used to choose it.
        hr = metrics[f"{selecting}hr@{args.topk}"]
        # The first epoch counts as an improvement even at HR 0 (the original's first save needs
        # HR > 0), so model.pth always holds this run's weights, never an older run's.
        if best["epoch"] < 0 or hr > selected_metrics(history, best).get(
                f"{selecting}hr@{args.topk}", best["hr"]):
            best.update(hr=metrics[f"hr@{args.topk}"], ndcg=metrics[f"ndcg@{args.topk}"],
                        epoch=epoch, time_to_best=best["run_seconds"],
                        train_time_to_best=best["train_seconds"])
            if args.checkpoint_dir:
                model_path = os.path.join(args.checkpoint_dir, "model.pth")
                log_line(ctx, f"New best hr! Saving the model to: {model_path}")
                if ctx.is_main:
                    atomic_save(model.state_dict(), model_path)
        reached = hr >= args.threshold
        if reached and best["time_to_target"] is None:
            best.update(time_to_target=best["run_seconds"],
                        train_time_to_target=best["train_seconds"])
        if ctx.is_main and args.checkpoint_dir:
            save_checkpoint(last_path, model, optimizer, scaler, history, best, args, ctx,
                            nb_users, nb_items, len(train_users))
        if reached:
            log_line(ctx, f"{'validation ' if selecting else ''}HR@{args.topk} {hr:.4f} "
                          f"reached --threshold {args.threshold}; stopping")
            break
    return summarize(history, best, args, ctx, logger, seconds_before + time.time() - run_start,
                     validation_data is not None)


def summarize(history, best, args, ctx, logger, run_seconds, validated):
    """The run's summary; time_to_target is the whole run's time when the target was missed,
    as in the original.

    best_accuracy and best_ndcg are the selected model's test HR@k and NDCG@k; `validated`:
    the validation split selected it (selected_by), not the test split as in the original.
    Its other metrics (validation, full ranking, --report_topk) are logged as best_KEY.
    """
    reached = best["time_to_target"] is not None
    summary = {"best_accuracy": best["hr"], "best_ndcg": best["ndcg"],
               "best_epoch": best["epoch"],
               "time_to_target": best["time_to_target"] if reached else run_seconds,
               "target_reached": reached, "time_to_best_model": best["time_to_best"],
               "train_time_to_target": best["train_time_to_target"],
               "train_time_to_best_model": best["train_time_to_best"],
               "epochs_run": len(history)}
    main_keys = (f"hr@{args.topk}", f"ndcg@{args.topk}")
    selected = selected_metrics(history, best)
    others = {key: value for key, value in selected.items() if key not in main_keys}
    summary.update({f"best_{key}": value for key, value in others.items()})
    if validated:
        summary["selected_by"] = "validation"
    if history:
        train_rates = [record["train_throughput"] for record in history]
        eval_rates = [record["eval_throughput"] for record in history]
        summary.update(best_train_throughput=max(train_rates),
                       best_eval_throughput=max(eval_rates),
                       mean_train_throughput=float(np.mean(train_rates)),
                       mean_eval_throughput=float(np.mean(eval_rates)))
        test_figures = (f"HR@{args.topk} = {best['hr']:.4f} (NDCG@{args.topk} = "
                        f"{best['ndcg']:.4f})")
        if validated:
            selection = (f"Best validation HR@{args.topk} = "
                         f"{selected.get(f'val_hr@{args.topk}', 0.0):.4f} at epoch "
                         f"{best['epoch']}, selected model's test {test_figures}")
        else:
            selection = f"Best {test_figures} at epoch {best['epoch']}"
        log_line(ctx, f"{selection}; best train throughput "
                      f"{summary['best_train_throughput']:.0f} samples/s, best eval throughput "
                      f"{summary['best_eval_throughput']:.0f} samples/s")
        if others:
            log_line(ctx, f"Selected model (epoch {best['epoch']}): "
                          f"{evaluation.metrics_text(others)}")
    log_line(ctx, f"time_to_target = {summary['time_to_target']:.2f} s"
                  f"{'' if reached else ' (--threshold not reached: the run time)'}, "
                  f"time_to_best_model = {summary['time_to_best_model'] or 0.0:.2f} s")
    logger.log((), summary)
    return summary


def selected_metrics(history, best):
    """The metrics (keys as `reported` and `metrics_text` make them) of the selected epoch's
    record; none before an epoch is selected."""
    record = next((record for record in history if record["epoch"] == best["epoch"]), {})
    metrics = {}
    for key, value in record.items():
        name = key
        for prefix, _ in evaluation.SPLIT_LABELS:
            name = name.removeprefix(prefix)
        if name.partition("@")[0] in ("hr", "ndcg", "mrr"):
            metrics[key] = value
    return metrics


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
        raise RunError(f"--log_path {args.log_path}: cannot write there ({error.strerror}); "
                       f"pass --log_path with a writable file") from None


def run(args):
    run_start = time.time()
    ctx = init_distributed(args)
    with ExitStack() as held:
        held.callback(end_process_group, ctx)
        if args.mode == "train" and not args.checkpoint_dir:
            log_line(ctx, "note: --checkpoint_dir '': model.pth and last.pth are not saved")
        if args.mode == "train" and ctx.is_main and args.checkpoint_dir:
            # Held until run() returns, so two runs never share one directory; the OS
            # releases it if the process dies.
            prepare_checkpoint_dir(args.checkpoint_dir, held)
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
        data, validation_data = load_splits(args, ctx)
        nb_users, nb_items = data[0], data[1]
        model, ddp_model = build_model(args, nb_users, nb_items, ctx)
        log_line(ctx, str(model))
        log_line(ctx, f"{sum(parameter.numel() for parameter in model.parameters())} parameters")
        load_starting_weights(args, ctx, model, nb_users, nb_items)
        if args.mode == "train":
            # Before the log is opened, which would empty an existing one.
            check_epoch_holds_a_step(len(data[2]), args, ctx)
        logger = open_logger(args, ctx)
        with logger.write_failures_as(RunError, "the checkpoints saved so far are complete"):
            logger.log(PARAMETER, {**vars(args), "world_size": ctx.world_size,
                                   "device": str(ctx.device), "precision": ctx.precision,
                                   "nb_users": nb_users, "nb_items": nb_items})
            log_metric_metadata(logger, args)
            if args.mode == "test":
                return run_test(args, ctx, model, data, validation_data, logger)
            # Saved with the training state so --resume can refuse a different world size.
            args.world_size = ctx.world_size
            return train(args, ctx, model, ddp_model, data, validation_data, logger, run_start)


def end_process_group(ctx):
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    cli.reuse_freed_memory()
    try:
        return run(args)
    except (RunError, dataloading.DataError, CheckpointError) as error:
        fail(error)
    except torch.cuda.OutOfMemoryError:
        fail("out of GPU memory; lower -b/--batch_size or --valid_batch_size, or use more GPUs")
    except RuntimeError as error:
        if cli.is_cpu_out_of_memory(error):
            fail("out of memory; lower -b/--batch_size or --valid_batch_size")
        lost = lost_peer(error)
        if lost is None:
            raise
        fail(f"another process of this run stopped ({lost}); its own error line, here or in "
             f"its node's log, says why")


def lost_peer(error):
    """What gloo said when a collective lost another process (it failed or was killed), or
    None for any other error.

    The surviving process would otherwise end in a traceback that buries the failed one's
    message. gloo raises a plain RuntimeError whose text starts with its source location.
    """
    text = str(error).strip()
    if cli.world_size() == 1 or "gloo/transport" not in text:
        return None
    said = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0]
    return f"gloo: {said}"


def fail(message):
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and cli.world_size() > 1 else ""
    print(f"{prefix}ncf.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*torch.distributed.launch.*")
    cli.run_as_process(main)
