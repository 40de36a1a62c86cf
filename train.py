"""Training NeuMF as ncf.py runs it: the model and optimiser, the epoch loop, checkpoints and
resume, the run's summary.

ncf.py is the command line over this module (flags, device, `run`); benchmarks and
scripts/gpu_check.py call its functions directly. Functions take the run's settings as `args`:
ncf.py's parsed flags, or a `Recipe` carrying the same names. Resume and the checkpoint files
are described in docs/behaviour.md.
"""
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
import dataloading
import evaluation
from checkpoint import atomic_save, check_matches, check_training_state, load_checkpoint, load_state
from neumf import build, parameter_count
from progress import Progress

# Harmless to change on --resume (a warning); anything else that differs changes the model or
# the data an epoch is made of, so the run could not equal an uninterrupted one (a refusal).
# --topk is not among them: the saved best HR is at the saved cut-off, and new epochs would be
# compared with it.
RESUME_HARMLESS_ARGS = {"epochs", "threshold", "log_path", "checkpoint_dir", "valid_batch_size",
                        "resume", "local_rank", "mode", "load_checkpoint_path", "data",
                        "full_ranking", "report_topk", "pretrained_gmf", "pretrained_mlp",
                        "alpha", "compile", "feature_spec_file"}
# Samples a CPU trains at once (chunks) where the tables take their rows in place: a piece then
# costs nothing table-sized. At ml-20m's shape and five times its users (2-core Sapphire
# Rapids, pieces of 2**14, 2**15 and 2**16) the step times stayed within 2-3 % in float32 and
# bfloat16 while the peak RSS fell by 0.6-1.2 GB with each halving down to 2**14. Under
# --compile the stock backward makes each piece pay two passes over every table, and
# dataloading.CPU_CHUNK is the size it trained fastest at.
CPU_PIECE = 2 ** 14


@dataclass
class Recipe:
    """The settings the functions of this module read, with the original's defaults; ncf.py's
    flags of the same names set them for a run."""
    model: str = "neumf"
    factors: int = 64
    layers: list = field(default_factory=lambda: [256, 256, 128, 64])
    dropout: float = 0.5
    negative_samples: int = 4
    batch_size: int = 2 ** 20
    valid_batch_size: int = 2 ** 20
    grads_accumulated: int = 1
    optimizer: str = "adam"
    learning_rate: float = 0.0045
    beta1: float = 0.25
    beta2: float = 0.5
    eps: float = 1e-8
    seed: int = 1
    topk: int = 10
    report_topk: list = field(default_factory=list)
    compile: bool = False


ORIGINAL = Recipe()


@dataclass
class Context:
    """Where this process runs: its device, its rank among world_size processes, whether it
    prints and saves (is_main), and the autocast dtype it trains in."""
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    # None trains in float32; float16 (CUDA, with loss scaling) or bfloat16 (a CPU with
    # native bf16 units) trains under autocast in that type.
    autocast_dtype: torch.dtype | None = None
    # Whether float32 matrix products run in TF32 (scoring.tf32_active).
    tf32: bool = False

    @property
    def precision(self):
        """The name checkpoints and logs record: float32, tf32, float16 or bfloat16."""
        if self.autocast_dtype is None and self.tf32:
            return "tf32"
        return str(self.autocast_dtype or torch.float32).removeprefix("torch.")


@dataclass
class Best:
    """The selected epoch's test HR/NDCG and the run's clocks, as last.pth saves them (asdict).

    The *_seconds clocks count this run and the processes a resumed run was made of; the times
    to best and to target are the clocks' values when that epoch ended (None: not yet).
    """
    hr: float = 0.0
    ndcg: float = 0.0
    epoch: int = -1
    train_seconds: float = 0.0
    run_seconds: float = 0.0
    time_to_best: float | None = None
    time_to_target: float | None = None
    train_time_to_best: float | None = None
    train_time_to_target: float | None = None


def log_line(ctx, message):
    if ctx.is_main:
        try:
            print(message, flush=True)
        except BrokenPipeError:
            # The run goes on training and saving, and prints into /dev/null from now on.
            cli.discard_stdout()


def cpu_has_native_bf16():
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


class TrainingLoss(torch.nn.Module):
    """The model's mean BCE-with-logits on a batch: what DDP wraps and --compile compiles, so
    that the loss's elementwise passes fuse with the last layer's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, user, item, label):
        logits = self.model(user, item).view(-1)
        return F.binary_cross_entropy_with_logits(logits.float(), label.float())


def build_model(args, nb_users, nb_items, ctx):
    """(model, its TrainingLoss: DDP-wrapped across several processes, compiled with
    --compile); checkpoints and evaluation use the model, training the loss."""
    check_model_fits(args, nb_users, nb_items, ctx)
    torch.manual_seed(args.seed)
    try:
        model = build(args.model, nb_users, nb_items, args.factors, args.layers,
                      dropout=args.dropout)
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "alloc" not in str(error):
            raise
        raise cli.UserError(f"--factors {args.factors} --layers "
                            f"{' '.join(map(str, args.layers))}: the model cannot be allocated; "
                            f"use smaller sizes") from None
    model = model.to(ctx.device)
    model.rows_into_grad = rows_into_grad(args, ctx)
    loss = TrainingLoss(model)
    if ctx.world_size > 1:
        # Gradients as views of DDP's all-reduce buckets: one gradient copy per process, not
        # two (0.55 GB a process at five times ml-20m's users).
        loss = torch.nn.parallel.DistributedDataParallel(
            loss, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    if args.compile:
        check_compiler(ctx)
        loss = torch.compile(loss)
    return model, loss


def rows_into_grad(args, ctx):
    """Whether the tables add their rows' gradients into .grad in place (neumf._RowsIntoGrad):
    where a CPU trains a batch in pieces. Not under --compile, which would break its graph at
    every table lookup (five graphs instead of one)."""
    return ctx.device.type == "cpu" and not args.compile


def check_compiler(ctx):
    """Refuse --compile where torch.compile could not build its CPU kernels: it needs a C++
    compiler at run time, and would otherwise fail at the first step with a long traceback."""
    compiler = os.environ.get("CXX") or "g++"
    if ctx.device.type == "cpu" and shutil.which(compiler) is None:
        raise cli.UserError(f"--compile: torch.compile builds CPU kernels with a C++ compiler "
                            f"and {compiler} is not on PATH; install one (g++) or set CXX, or "
                            f"drop --compile")


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
        raise cli.UserError(
            f"--factors {args.factors} --layers {' '.join(map(str, args.layers))}: training "
            f"this model needs about {needed / 2 ** 30:,.0f} GiB, the {ctx.device.type} has "
            f"{available / 2 ** 30:,.0f} GiB; use smaller sizes")


def build_optimizer(args, model):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.learning_rate, fused=True)
    # fused Adam computes the same update as the loop version, in one kernel per step.
    return torch.optim.Adam(model.parameters(), lr=args.learning_rate,
                            betas=(args.beta1, args.beta2), eps=args.eps, fused=True)


def grad_scaler(ctx):
    """Dynamic loss scaling where float16's range needs it; bfloat16 has float32's range."""
    return torch.amp.GradScaler(ctx.device.type, enabled=ctx.autocast_dtype == torch.float16)


def samples_per_epoch(nb_positives, args):
    return nb_positives * (1 + args.negative_samples)


def steps_per_epoch(nb_samples, args, ctx):
    """Optimiser steps every rank takes: from the smallest share, so no rank waits on another."""
    return optimiser_steps(nb_samples, args.batch_size, args.grads_accumulated, ctx.world_size)


def optimiser_steps(nb_samples, batch_size, grads_accumulated, world_size):
    local_batch = batch_size // world_size
    return (nb_samples // world_size) // local_batch // grads_accumulated


# The fewest optimiser steps an epoch that check_epoch_holds_a_step's suggested batch gives:
# enough for Adam to move the model each epoch (-b 8192 on ml-latest-small: 61).
USEFUL_STEPS = 50


def check_epoch_holds_a_step(nb_positives, args, ctx):
    """Refuse a batch that leaves an epoch without one optimiser step (the original silently
    trains on nothing there), suggesting the largest power of two giving USEFUL_STEPS."""
    nb_samples = samples_per_epoch(nb_positives, args)
    if args.batch_size < ctx.world_size:
        raise cli.UserError(f"--batch_size {args.batch_size} is smaller than the "
                            f"{ctx.world_size} processes; each process needs at least one "
                            f"sample per batch")
    if steps_per_epoch(nb_samples, args, ctx) > 0:
        return
    steps = {batch: optimiser_steps(nb_samples, batch, args.grads_accumulated, ctx.world_size)
             for batch in (2 ** exponent for exponent in range(int(math.log2(nb_samples)) + 1))
             if batch >= ctx.world_size}
    fitting = [batch for batch, count in steps.items() if count > 0]
    if not fitting:
        raise cli.UserError(f"--grads_accumulated {args.grads_accumulated}: an epoch of "
                            f"{nb_samples:,} samples cannot fill that many batches of one "
                            f"sample per process; lower --grads_accumulated")
    suggested = max([batch for batch in fitting if steps[batch] >= USEFUL_STEPS] or fitting[:1])
    raise cli.UserError(
        f"--batch_size {args.batch_size} x --grads_accumulated {args.grads_accumulated} "
        f"exceeds an epoch of {nb_samples:,} samples ({nb_positives:,} positives x "
        f"(1 + {args.negative_samples} negatives)), so no full batch would be trained; try "
        f"-b {suggested}: {steps[suggested]} optimiser steps an epoch (the largest power of two "
        f"giving at least {USEFUL_STEPS}; -b {max(fitting)} is the largest that trains at all)")


def train_epoch(training_loss, optimizer, scaler, positives, nb_items, epoch, args, ctx):
    """One epoch of build_model's `training_loss` on `positives` (dataloading.Positives);
    returns the mean loss over all ranks."""
    training_loss.train()
    samples = dataloading.Epoch(positives, nb_items, args.negative_samples, ctx.world_size,
                                ctx.rank, dataloading.epoch_keys(args.seed, epoch))
    steps = steps_per_epoch(samples_per_epoch(len(positives), args), args, ctx)
    epoch_batches = samples.batches(args.batch_size // ctx.world_size)
    loss_sum = torch.zeros((), device=ctx.device)
    shown = Progress(steps, f"epoch {epoch}", "step", stream=sys.stdout, enabled=ctx.is_main)
    for _ in range(steps):
        pieces = [piece for _, batch in zip(range(args.grads_accumulated), epoch_batches)
                  for piece in chunks(batch, args, ctx)]
        for index, (user, item, label, weight) in enumerate(pieces):
            # DDP all-reduces gradients only on the piece that completes a step.
            last_piece = index == len(pieces) - 1
            sync = (nullcontext() if last_piece or ctx.world_size == 1 else
                    training_loss.no_sync())
            with sync:
                with torch.autocast(ctx.device.type, dtype=ctx.autocast_dtype,
                                    enabled=ctx.autocast_dtype is not None):
                    loss = training_loss(user, item, label) * weight
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.step(optimizer)
        scaler.update()
        # Under DDP the gradients stay the views of its all-reduce buckets, zeroed: set to None,
        # a step's first piece would allocate a gradient of its own beside the buckets until the
        # all-reduce copies it in (a third table-sized buffer, 0.55 GB at five times ml-20m).
        optimizer.zero_grad(set_to_none=ctx.world_size == 1)
        shown.update()
    shown.close()
    if ctx.world_size > 1:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / max(1, steps * args.grads_accumulated * ctx.world_size)


def chunks(batch, args, ctx):
    """A batch as pieces a CPU trains one at a time, weighted to sum to its mean loss.

    The gradient is the batch's (each piece's mean loss is weighted by its share of the batch),
    but a CPU holds the activations of one piece rather than of the default batch of a million
    samples (about 6 GB), and runs faster for it. A GPU takes the batch whole.
    """
    user, item, label = batch
    piece = CPU_PIECE if rows_into_grad(args, ctx) else dataloading.CPU_CHUNK
    if ctx.device.type == "cuda" or len(user) <= piece:
        return [(user, item, label, 1.0)]
    return [(user[start:start + piece], item[start:start + piece], label[start:start + piece],
             min(piece, len(user) - start) / len(user))
            for start in range(0, len(user), piece)]


def synchronize(ctx):
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def parameters_are_finite(model):
    return all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters())


def train(args, ctx, model, training_loss, splits, logger, run_start):
    """The epochs from the first not yet run (0, or last.pth's with --resume) to --epochs or
    --threshold; returns the summary (see summarize)."""
    nb_samples = samples_per_epoch(len(splits.positives), args)
    optimizer = build_optimizer(args, model)
    scaler = grad_scaler(ctx)
    first_epoch, best, history = 0, Best(), []
    if args.resume:
        first_epoch, best, history = resume_state(args, ctx, model, optimizer, scaler, splits)
    # Wall-clock seconds as the original counts them (loading and evaluation included), carried
    # over from the processes a resumed run was made of, up to their last saved epoch.
    seconds_before = best.run_seconds
    last_path = os.path.join(args.checkpoint_dir, "last.pth")
    # The log key prefix of the split that selects the model and meets --threshold.
    selecting = "" if splits.validation is None else "val_"
    for epoch in range(first_epoch, args.epochs):
        synchronize(ctx)
        start = time.time()
        train_loss = train_epoch(training_loss, optimizer, scaler, splits.positives,
                                 splits.nb_items, epoch, args, ctx)
        synchronize(ctx)
        train_time = time.time() - start
        # Under float16 loss scaling an overflowing step is skipped by the scaler, so only
        # weights gone non-finite mean the run is lost; otherwise a non-finite loss already does.
        if not parameters_are_finite(model) or (not scaler.is_enabled()
                                                and not math.isfinite(train_loss)):
            kept = (f"{last_path} still holds epoch {epoch - 1}" if args.checkpoint_dir and
                    epoch > first_epoch else "nothing of this run was saved")
            raise cli.UserError(f"epoch {epoch}: training diverged (loss {train_loss}); {kept}; "
                                f"lower -l/--learning_rate")
        metrics, validation_loss, candidates = evaluation.sampled_evaluation(model, splits,
                                                                             args, ctx)
        synchronize(ctx)
        val_time = time.time() - start - train_time
        best.train_seconds += train_time
        best.run_seconds = seconds_before + time.time() - run_start
        record = {"epoch": epoch, **metrics,
                  "train_loss": train_loss, "validation_loss": validation_loss,
                  "train_throughput": nb_samples / train_time,
                  "eval_throughput": candidates / val_time,
                  "train_epoch_time": train_time, "validation_epoch_time": val_time}
        if args.full_ranking:
            full = evaluation.full_ranking_evaluation(model, splits, args, ctx)
            metrics.update(full)
            record.update(full)
        history.append(record)
        log_line(ctx, epoch_line(epoch, record, args, splits.validation is not None))
        logger.log((epoch,), record)
        # The validation split, where there is one, picks the model and stops the run, so
        # that the test figures reported for it were not used to choose it.
        hr = metrics[f"{selecting}hr@{args.topk}"]
        # The first epoch counts as an improvement even at HR 0 (the original's first save needs
        # HR > 0), so model.pth always holds this run's weights, never an older run's.
        if best.epoch < 0 or hr > evaluation.selected_metrics(history, best.epoch).get(
                f"{selecting}hr@{args.topk}", best.hr):
            best.hr, best.ndcg = metrics[f"hr@{args.topk}"], metrics[f"ndcg@{args.topk}"]
            best.epoch = epoch
            best.time_to_best, best.train_time_to_best = best.run_seconds, best.train_seconds
            if args.checkpoint_dir:
                model_path = os.path.join(args.checkpoint_dir, "model.pth")
                log_line(ctx, f"New best hr! Saving the model to: {model_path}")
                if ctx.is_main:
                    atomic_save(model.state_dict(), model_path)
        reached = hr >= args.threshold
        if reached and best.time_to_target is None:
            best.time_to_target, best.train_time_to_target = best.run_seconds, best.train_seconds
        if ctx.is_main and args.checkpoint_dir:
            save_checkpoint(last_path, model, optimizer, scaler, history, best, args, ctx, splits)
        if reached:
            log_line(ctx, f"Hit threshold of {args.threshold}" + (
                f" (validation HR@{args.topk} {hr:.4f})" if selecting else ""))
            break
    return summarize(history, best, args, ctx, logger, seconds_before + time.time() - run_start,
                     splits.validation is not None)


def epoch_line(epoch, record, args, validated):
    """The original's `Epoch N: HR@10 = x, NDCG@10 = y, train_time = s, val_time = s`, so that
    its parsers keep working, then the losses and any further metrics.

    The original's validation_loss is the loss on the test candidates: beside a validation
    split's metrics the line calls it test_loss (the log keeps the original's key).
    """
    hr, ndcg = f"hr@{args.topk}", f"ndcg@{args.topk}"
    further = {key: value for key, value in record.items()
               if key not in (hr, ndcg) and key in evaluation.selected_metrics([record], epoch)}
    loss_name = "test_loss" if validated else "validation_loss"
    line = (f"Epoch {epoch}: {evaluation.metrics_text({hr: record[hr], ndcg: record[ndcg]})}, "
            f"train_time = {record['train_epoch_time']:.2f}, "
            f"val_time = {record['validation_epoch_time']:.2f}, "
            f"train_loss = {record['train_loss']:.4f}, "
            f"{loss_name} = {record['validation_loss']:.4f}")
    return line + (f", {evaluation.metrics_text(further)}" if further else "")


def summarize(history, best, args, ctx, logger, run_seconds, validated):
    """The run's summary; time_to_target is the whole run's time when the target was missed,
    as in the original.

    best_accuracy and best_ndcg are the selected model's test HR@k and NDCG@k; `validated`:
    the validation split selected it (selected_by), not the test split as in the original.
    Its other metrics (validation, full ranking, --report_topk) are logged as best_KEY, and its
    losses as train_loss and validation_loss (the 2023 original's summary keys).
    """
    reached = best.time_to_target is not None
    summary = {"best_accuracy": best.hr, "best_ndcg": best.ndcg, "best_epoch": best.epoch,
               "time_to_target": best.time_to_target if reached else run_seconds,
               "target_reached": reached, "time_to_best_model": best.time_to_best,
               "train_time_to_target": best.train_time_to_target,
               "train_time_to_best_model": best.train_time_to_best,
               "epochs_run": len(history)}
    main_keys = (f"hr@{args.topk}", f"ndcg@{args.topk}")
    selected = evaluation.selected_metrics(history, best.epoch)
    others = {key: value for key, value in selected.items() if key not in main_keys}
    summary.update({f"best_{key}": value for key, value in others.items()})
    if validated:
        summary["selected_by"] = "validation"
    if history:
        selected_record = next(record for record in history if record["epoch"] == best.epoch)
        summary.update({key: selected_record[key] for key in ("train_loss", "validation_loss")
                        if key in selected_record})
        train_rates = [record["train_throughput"] for record in history]
        eval_rates = [record["eval_throughput"] for record in history]
        summary.update(best_train_throughput=max(train_rates),
                       best_eval_throughput=max(eval_rates),
                       mean_train_throughput=float(np.mean(train_rates)),
                       mean_eval_throughput=float(np.mean(eval_rates)))
        test_figures = f"HR@{args.topk} = {best.hr:.4f} (NDCG@{args.topk} = {best.ndcg:.4f})"
        if validated:
            selection = (f"Best validation HR@{args.topk} = "
                         f"{selected.get(f'val_hr@{args.topk}', 0.0):.4f} at epoch "
                         f"{best.epoch}, selected model's test {test_figures}")
        else:
            selection = f"Best {test_figures} at epoch {best.epoch}"
        log_line(ctx, f"{selection}; best train throughput "
                      f"{summary['best_train_throughput']:.0f} samples/s, best eval throughput "
                      f"{summary['best_eval_throughput']:.0f} samples/s")
        if others:
            log_line(ctx, f"Selected model (epoch {best.epoch}): "
                          f"{evaluation.metrics_text(others)}")
    log_line(ctx, f"time_to_target = {summary['time_to_target']:.2f} s"
                  f"{'' if reached else ' (--threshold not reached: the run time)'}, "
                  f"time_to_best_model = {summary['time_to_best_model'] or 0.0:.2f} s")
    logger.log((), summary)
    return summary


def test(args, ctx, model, splits, logger):
    """One evaluation of `model` (--mode test); returns its figures."""
    synchronize(ctx)
    start = time.time()
    metrics, validation_loss, candidates = evaluation.sampled_evaluation(model, splits, args, ctx)
    synchronize(ctx)
    val_time = time.time() - start
    throughput = candidates / val_time
    line = (f"{evaluation.metrics_text(metrics)}, val_time = {val_time:.2f}, eval_throughput = "
            f"{throughput:.0f} samples/s, validation_loss = {validation_loss:.4f}")
    # best_eval_throughput: the key both originals log for test mode's one evaluation.
    record = {**metrics, "eval_throughput": throughput, "best_eval_throughput": throughput,
              "validation_loss": validation_loss, "validation_epoch_time": val_time}
    if args.full_ranking:
        full = evaluation.full_ranking_evaluation(model, splits, args, ctx)
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


def saved_args(args, ctx):
    """The flags last.pth records, with the number of processes: --resume refuses another."""
    return {**vars(args), "world_size": ctx.world_size}


def save_checkpoint(path, model, optimizer, scaler, history, best, args, ctx, splits):
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": history[-1]["epoch"] + 1,
        "best": asdict(best),
        "history": history,
        "args": saved_args(args, ctx),
        "precision": ctx.precision,
        "data": {"nb_users": splits.nb_users, "nb_items": splits.nb_items,
                 "nb_train": len(splits.positives), "fingerprint": splits.fingerprint},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
    }
    atomic_save(state, path)


def check_resume_args(saved, current, model_kind, path):
    """Refuse a resume whose flags change the run (see RESUME_HARMLESS_ARGS); the harmless
    changes, as warnings to print."""
    # The shape flag the model has no use for (--layers of a GMF) is a default now, and may be
    # anything in a last.pth written before it was refused.
    unused = cli.UNUSED_SHAPE_FLAGS.get(model_kind, ("",))[0].removeprefix("--")
    differing = sorted(key for key in current if key in saved and key != unused and
                       current[key] != saved[key])
    refused = [f"{key} ({saved[key]} -> {current[key]})" for key in differing
               if key not in RESUME_HARMLESS_ARGS]
    if refused:
        verb = "differs" if len(refused) == 1 else "differ"
        raise cli.UserError(
            f"{path}: cannot resume: {', '.join(refused)} {verb} from the saved run, which "
            f"would change the model, its data or how the best epoch is chosen; start a new "
            f"run in another --checkpoint_dir, or resume with the saved values")
    return [f"--{key} {saved[key]} -> {current[key]}" for key in differing
            if key not in ("resume", "local_rank", "data")]


def resume_state(args, ctx, model, optimizer, scaler, splits):
    """(first epoch, Best, history) of CHECKPOINT_DIR/last.pth, whose model, optimiser, scaler
    and random state are loaded into this run's, once it is checked to continue this run."""
    path = os.path.join(args.checkpoint_dir, "last.pth")
    state = load_checkpoint(path)
    weights = check_training_state(state, path)
    if state["precision"] != ctx.precision:
        raise cli.UserError(
            f"{path}: the saved run trained in {state['precision']}, this one would train in "
            f"{ctx.precision} (on {ctx.device.type}); resume on the same kind of device (CUDA "
            f"with or without TF32, CPU with or without bf16 units) with the same "
            f"--opt_level/--amp and --no_tf32")
    saved_data = state["data"]
    check_matches(weights, path, splits.nb_users, splits.nb_items)
    if saved_data["nb_train"] != len(splits.positives):
        raise cli.UserError(f"{path}: checkpoint was trained on {saved_data['nb_train']} "
                            f"training positives, --data has {len(splits.positives)}; resume "
                            f"with the same data")
    if saved_data.get("fingerprint") != splits.fingerprint:
        raise cli.UserError(
            f"{path}: the saved run's data fingerprint differs from that of --data {args.data} "
            f"(same counts, other content: converted with another --seed, say; or saved before "
            f"fingerprints); resume with the same data or start a new run")
    if state["args"]["data"] != args.data:
        log_line(ctx, f"warning: resuming with --data {args.data} instead of "
                      f"{state['args']['data']}, which holds the same data")
    for change in check_resume_args(state["args"], saved_args(args, ctx), args.model, path):
        log_line(ctx, f"warning: resuming with a changed setting: {change}")
    # After the settings: a run saved before --model existed records no kind to compare.
    check_matches(weights, path, splits.nb_users, splits.nb_items, kind=args.model)
    load_state(model, weights, path)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], ctx.device)
    best = Best(**{key.name: state["best"][key.name] for key in fields(Best)})
    log_line(ctx, f"Resuming from {path}: {state['epoch']} epochs done, best HR@{args.topk} "
                  f"{best.hr:.4f} at epoch {best.epoch}")
    return state["epoch"], best, state["history"]
