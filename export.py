"""Export a trained NeuMF as ONNX or TorchScript, to serve it without this project's code.

    python export.py --load_checkpoint_path model.pth --data DIR --format onnx --output ncf.onnx
    python export.py --load_checkpoint_path model.pth --data DIR --format torchscript \\
                     --output ncf.pt [--probabilities]

The exported graph takes two int64 tensors of the same length N, of any N: `user` and `item`,
dense ids as in DIR's tensors (DIR/user_ids.pt and item_ids.pt map them to the original ids). It
returns `logits` [N, 1], model(user, item) of the model in eval mode, and with --probabilities
also `probabilities` [N, 1], their sigmoid.

ONNX: opset 17; inputs user and item, outputs logits (and probabilities), dimension 0 of each
dynamic and named "batch". Written by torch's TorchScript-based exporter (dynamo=False), which
needs no package beyond torch (the torch.export-based one needs onnxscript); the onnx package
checks the file and onnxruntime runs it for the parity check below.
TorchScript: torch.jit.trace of the eval-mode model, loadable with torch.jit.load alone.

The checkpoint is refused as ncf.py and recommend.py refuse it, including one made for another
dataset than DIR. The written file is loaded back and run on batches of 1 and 1,000 pairs: the
export fails, leaving nothing at --output, unless it matches the model within 1e-5.
"""
import importlib
import inspect
import os
import warnings

import torch

import cli
import dataloading
from checkpoint import check_matches, load_model
from fileio import atomic_output

PROG = "export.py"
OPSET = 17
TOLERANCE = 1e-5
CHECK_BATCHES = (1, 1000)
ONNX_PACKAGES = ("onnx", "onnxruntime")
SUFFIXES = {"onnx": "onnx", "torchscript": "pt"}


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--load_checkpoint_path", required=True,
                        help="model.pth written by ncf.py")
    parser.add_argument("--data", required=True,
                        help="directory written by convert.py that the model was trained on")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--probabilities", action="store_true",
                        help="a second output: the sigmoid of the logits")
    return parser.parse_args(argv)


class Exported(torch.nn.Module):
    """What the exported graph computes: the logits, and with probabilities their sigmoid."""

    def __init__(self, model, probabilities):
        super().__init__()
        self.model = model
        self.probabilities = probabilities

    def forward(self, user, item):
        logits = self.model(user, item)
        return (logits, torch.sigmoid(logits)) if self.probabilities else logits


def import_onnx_packages():
    """onnx and onnxruntime, or a one-line refusal naming the one that is missing."""
    modules = []
    for name in ONNX_PACKAGES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            raise cli.UserError(f"--format onnx: needs the Python package {name}; install it with "
                                f"`pip install -r requirements-optional.txt`, or use --format "
                                f"torchscript") from None
    return modules


def check_pairs(model, size, generator):
    """`size` (user, item) pairs, the highest ids among them."""
    users = torch.randint(0, model.nb_users, (size,), generator=generator)
    items = torch.randint(0, model.nb_items, (size,), generator=generator)
    users[-1], items[-1] = model.nb_users - 1, model.nb_items - 1
    return users, items


def compare(exported, graph, path):
    """Refuse `path` unless `graph(users, items)` (numpy arrays or tensors in the order of the
    outputs) matches `exported` on every check batch."""
    generator = torch.Generator().manual_seed(0)
    for size in CHECK_BATCHES:
        users, items = check_pairs(exported.model, size, generator)
        with torch.inference_mode():
            expected = exported(users, items)
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = graph(users, items)
        for name, want, got in zip(("logits", "probabilities"), expected, actual):
            got = torch.as_tensor(got)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=TOLERANCE):
                difference = ((got - want).abs().max().item() if got.shape == want.shape
                              else f"shape {list(got.shape)} for {list(want.shape)}")
                raise cli.UserError(f"--output {path}: the exported {name} differ from the "
                                    f"model's on {size} pairs ({difference}); not written")


def torchscript_exporter(onnx_export):
    """The keyword that picks torch.onnx.export's TorchScript-based exporter where the
    signature has it (torch 2.5 and later, whose default became the dynamo-based one); older
    torch, NGC 24.05's 2.4 among them, has only that exporter and refuses the keyword."""
    return {"dynamo": False} if "dynamo" in inspect.signature(onnx_export).parameters else {}


def export_onnx(exported, temporary, path):
    onnx, onnxruntime = import_onnx_packages()
    outputs = ["logits", "probabilities"] if exported.probabilities else ["logits"]
    example = check_pairs(exported.model, 2, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of one that needs onnxscript;
        # the ONNX file it writes is the same standard either way.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(exported, example, temporary, opset_version=OPSET,
                          input_names=["user", "item"], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in ["user", "item"] + outputs},
                          **torchscript_exporter(torch.onnx.export))
    onnx.checker.check_model(temporary)
    session = onnxruntime.InferenceSession(temporary, providers=["CPUExecutionProvider"])
    compare(exported, lambda users, items: session.run(
        outputs, {"user": users.numpy(), "item": items.numpy()}), path)


def export_torchscript(exported, temporary, path):
    example = check_pairs(exported.model, 2, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # torch.jit is deprecated for new work in torch 2.x, yet its files are what plain
        # torch.jit.load and Triton's PyTorch backend run.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(exported, example)
        # A handle, not the name: the archive would be named after the temporary file.
        with open(temporary, "wb") as handle:
            torch.jit.save(traced, handle)
        loaded = torch.jit.load(temporary)

    def graph(users, items):
        with torch.inference_mode():
            result = loaded(users, items)
        return result if isinstance(result, tuple) else (result,)
    compare(exported, graph, path)


def export(args):
    if args.format == "onnx":
        import_onnx_packages()  # before minutes of loading, not after
    if not args.output:
        raise cli.UserError(f"--output is empty; name the file to write, such as "
                            f"ncf.{SUFFIXES[args.format]}")
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise cli.UserError(f"--output {args.output}: directory {directory} does not exist")
    if os.path.isdir(args.output):
        raise cli.UserError(f"--output {args.output}: is a directory; name the file to write, "
                            f"such as {os.path.join(args.output, 'ncf.' + SUFFIXES[args.format])}")
    if os.path.realpath(args.output) == os.path.realpath(args.load_checkpoint_path):
        raise cli.UserError(f"--output {args.output}: is the checkpoint being exported, which the "
                            f"export would replace; name another file")
    nb_users, nb_items = dataloading.open_dataset(args.data)[3:5]
    model = load_model(args.load_checkpoint_path).eval()
    check_matches(model.state_dict(), args.load_checkpoint_path, nb_users, nb_items)
    exported = Exported(model, args.probabilities).eval()
    write = export_onnx if args.format == "onnx" else export_torchscript
    try:
        with atomic_output(args.output) as temporary:
            write(exported, temporary, args.output)
    except OSError as error:
        raise cli.UserError(f"--output {args.output}: cannot write ({error.strerror or error})") \
            from None


def main(argv=None):
    args = parse_args(argv)
    export(args)
    print(f"{PROG}: wrote {args.output} ({args.format})", flush=True)


if __name__ == "__main__":
    cli.run(main)
