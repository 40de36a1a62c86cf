"""Draw the learning curve of a training run: every ranking metric the log holds per epoch
(HR@k, NDCG@k, MRR; sampled and full ranking in panels of their own), and training loss.

    python plot_curve.py --log log.json --output curve.png

Reads the dllogger-format log ncf.py writes (--log_path). A star marks the best epoch of the
HR ncf.py selected the model on: HR@k for its -k/--topk, read from the log's settings, on the
validation split (val_hr@k) when the run had one. For a log without the settings, k is that of
the log's only HR@k, else 10 (ncf.py's default). Needs matplotlib, an optional dependency:
pip install -r requirements-optional.txt
"""
import json
import math
import os
import sys

import cli
from fileio import atomic_output, check_replaceable
from logger import PARAMETER, PREFIX, metric_parts

# Epochs are whole numbers that a float holds exactly (matplotlib plots floats).
LARGEST_EPOCH = 2 ** 53
# ncf.py's -k/--topk when a log does not record it.
DEFAULT_TOPK = 10


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="plot_curve.py",
                                description="Plot the metrics and training loss per epoch")
    parser.add_argument("--log", type=str, required=True, help="log.json written by ncf.py")
    parser.add_argument("--output", type=str, default="curve.png", help="PNG file to write")
    return parser.parse_args(argv)


def read_curve(path):
    """{"epoch": [...], "train_loss": [...], "hr@k": [...], "ndcg@k": [...], ...} from a log:
    every ranking metric it holds (logger.metric_parts: validation, full ranking, further
    cut-offs, MRR), and the -k/--topk of its last settings record that has one (None without).

    A resumed run logs again the epoch it was killed in; the last record of an epoch is the
    one the finished run's weights come from, so it wins. A metric missing from a record
    (a resumed run may change --topk), logged as null (not finite) or as anything but a number
    is NaN: a gap in the line. An epoch record whose step is not [whole number] or whose data
    is not an object is skipped with a warning, as a line that is not JSON is.
    """
    if os.path.isdir(path):
        raise cli.UserError(f"--log {path}: is a directory; pass the log.json ncf.py wrote in it "
                            f"(its --log_path)")
    if not os.path.isfile(path):
        raise cli.UserError(f"--log {path}: no such file; pass the log.json ncf.py wrote "
                            f"(its --log_path)")
    by_epoch, warnings, topk = {}, [], None
    try:
        # Undecodable bytes become U+FFFD, so a binary line is reported like any non-JSON line.
        with open(path, encoding="utf-8", errors="replace") as log_file:
            for number, line in enumerate(log_file, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.removeprefix(PREFIX))
                except (ValueError, RecursionError):
                    # A run killed while writing leaves one cut line; the records around it count.
                    # json also raises ValueError for an over-long integer and RecursionError for
                    # very deep nesting.
                    warnings.append(f"{path} line {number} is not JSON; skipped")
                    continue
                if not isinstance(record, dict):
                    continue
                step = record.get("step")
                if step == PARAMETER and record.get("type") == "LOG":
                    # A resumed run logs its settings again; the last -k/--topk selects.
                    topk = _topk(record.get("data"), topk)
                    continue
                if record.get("type") != "LOG" or not isinstance(step, list) or not step:
                    continue  # the summary or metadata
                epoch = _epoch(step[0])
                if epoch is None or not isinstance(record.get("data"), dict):
                    warnings.append(f"{path} line {number}: an epoch record needs a step "
                                    f"[EPOCH] with a whole number and an object as data; "
                                    f"skipped")
                    continue
                by_epoch[epoch] = record["data"]
    except OSError as error:
        raise cli.UserError(f"--log {path}: cannot read ({error.strerror}); pass a readable "
                            f"log") from None
    if not by_epoch:
        raise cli.UserError(f"--log {path}: no epoch records; pass the log.json of a training run "
                            f"(ncf.py --mode train) that finished at least one epoch")
    # Only now: a file that is no log at all gets its one error line, not a warning per line.
    for warning in warnings:
        print(f"plot_curve.py: warning: {warning}", file=sys.stderr)
    epochs = sorted(by_epoch)
    records = [by_epoch[epoch] for epoch in epochs]
    metrics = sorted({key for record in records for key in record if metric_parts(key)})
    curve = {"epoch": epochs}
    for key in ["train_loss"] + metrics:
        curve[key] = [_number(record.get(key)) for record in records]
    return curve, topk


def _topk(settings, previous):
    """The -k/--topk a settings record holds; `previous` when it holds none (a resumed run's
    second record, {"first_epoch": ..., "resumed": true}) or no whole number above 0."""
    topk = settings.get("topk") if isinstance(settings, dict) else None
    if isinstance(topk, int) and not isinstance(topk, bool) and topk >= 1:
        return topk
    return previous


def selected_key(curve, topk):
    """The HR series ncf.py selected the model on: val_hr@k with a validation split, hr@k
    without; k is `topk` or, for a log that does not record it, the k of its only hr@ series,
    else ncf.py's default. None when the log has no such series."""
    if topk is None:
        test_keys = [key for key in curve if key.startswith("hr@")]
        topk = test_keys[0].removeprefix("hr@") if len(test_keys) == 1 else DEFAULT_TOPK
    for key in (f"val_hr@{topk}", f"hr@{topk}"):
        if key in curve:
            return key
    return None


def _epoch(value):
    """The epoch an epoch record's step names, as an int; None for anything else."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= LARGEST_EPOCH:
        return value
    return None


def _number(value):
    """A metric as a finite float; NaN (a gap) for anything else, true and false included."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        return math.nan
    return value if math.isfinite(value) else math.nan


def check_output(output, log):
    """Refuse an --output whose replacement would destroy something: the log itself, or a
    device, pipe or link (fileio.check_replaceable), before the log is read."""
    if os.path.isfile(log) and os.path.exists(output) and os.path.samefile(output, log):
        raise cli.UserError(f"--output {output}: is the --log itself; pass another file name, such "
                            f"as curve.png")
    try:
        check_replaceable(output)
    except OSError as error:
        raise cli.UserError(f"--output {output}: {error.strerror}; pass the name of a new or "
                            f"regular file") from None


def draw(curve, topk, title, output):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise cli.UserError("matplotlib is needed to draw the curve: pip install matplotlib "
                            "(or pip install -r requirements-optional.txt)") from None
    metrics = [key for key in curve if metric_parts(key)]
    # Full ranking puts the positive among thousands of items, not 101: its figures are an
    # order of magnitude lower and would flatten the sampled ones on one axis.
    full = [key for key in metrics if "full_" in metric_parts(key)[0]]
    panels = [("sampled (positive among its test negatives)",
               [key for key in metrics if key not in full])]
    if full:
        panels.append(("full ranking (positive among all untrained items)", full))
    figure = Figure(figsize=(8, 3.5 * (len(panels) + 1)), layout="constrained")
    FigureCanvasAgg(figure)
    *axes, loss = figure.subplots(len(panels) + 1, 1, sharex=True)
    epochs = curve["epoch"]
    for axis, (name, keys) in zip(axes, panels):
        for key in keys:
            axis.plot(epochs, curve[key], marker="o", markersize=3, label=key.upper())
        axis.set_ylabel(name, fontsize="small")
        axis.grid(alpha=0.3)
    accuracy = axes[0]
    key = selected_key(curve, topk)
    if key is not None:
        finite = [(value, epoch) for epoch, value in zip(epochs, curve[key])
                  if not math.isnan(value)]
        if finite:
            best, best_epoch = max(finite, key=lambda pair: (pair[0], -pair[1]))
            accuracy.plot([best_epoch], [best], marker="*", markersize=14, linestyle="none",
                          color="gold", markeredgecolor="black",
                          label=f"best {key.upper()} {best:.4f} (epoch {best_epoch})")
    accuracy.set_title(title)
    for axis in axes:
        axis.legend(fontsize="small")
    loss.plot(epochs, curve["train_loss"], marker="o", markersize=3, color="tab:red")
    loss.set_ylabel("training loss")
    loss.set_xlabel("epoch")
    loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss.grid(alpha=0.3)
    directory = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(directory, exist_ok=True)
        with atomic_output(output) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    except OSError as error:
        raise cli.UserError(f"--output {output}: cannot write there ({error.strerror}); pass a "
                            f"writable path") from None


def main(argv=None):
    args = parse_args(argv)
    check_output(args.output, args.log)
    curve, topk = read_curve(args.log)
    draw(curve, topk, f"Learning curve: {args.log}", args.output)
    print(f"Wrote {args.output} ({len(curve['epoch'])} epochs)")
    return curve


if __name__ == "__main__":
    cli.run(main)
