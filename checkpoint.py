"""Reading and writing model files safely.

`model.pth` is the original's format: the NeuMF state_dict alone (a multi-process save of the
original may carry a `module.` prefix); a GMF's or MLP's (neumf.py) is the same with one
branch's entries alone, which is how a file tells its kind. `last.pth` is ours: the full
training state for `--resume`. Both are read with `weights_only=True`, which refuses any pickle that would run
code, and their whole structure is checked before any of it is used, so a damaged or tampered
file is refused in one line rather than failing deep inside PyTorch. Both are written under a
temporary name, flushed to the disk and renamed, so a killed run or a power loss never leaves a
half-written file behind.
"""
import os
import pickle
import pickletools
import re
import warnings
import zipfile

import torch

import cli
import neumf
from fileio import atomic_output

NEUMF_PARAMETER = re.compile(r"(mf|mlp)_(user|item)_embed\.weight|mlp\.\d+\.(weight|bias)|"
                             r"final\.(weight|bias)")
MF_EMBEDDINGS = ("mf_user_embed.weight", "mf_item_embed.weight")
MLP_EMBEDDINGS = ("mlp_user_embed.weight", "mlp_item_embed.weight")
ADAM_PER_PARAMETER = ("step", "exp_avg", "exp_avg_sq")
SGD_PER_PARAMETER = ("momentum_buffer",)
OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD"}
KIND_NAMES = {"neumf": "a NeuMF", "gmf": "a GMF", "mlp": "an MLP"}
SCALER_NUMBERS = ("scale", "growth_factor", "backoff_factor", "growth_interval",
                  "_growth_tracker")


class CheckpointError(cli.UserError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


class _KeepWriteError:
    """A file handle for torch.save that keeps the OSError of a failed write.

    torch.save reports one as a RuntimeError without errno ("unexpected pos" on a full disk);
    save_into re-raises the OSError so the user reads its reason.
    """

    def __init__(self, handle):
        self.handle = handle
        self.error = None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.handle.flush()


def save_into(obj, handle):
    """torch.save into an open binary file; a failed write raises its own OSError.

    A handle, not the temporary name a caller writes to: torch.save names the zip archive after
    the file's stem, which holds the pid, so the same object would save to different bytes.
    """
    writer = _KeepWriteError(handle)
    try:
        torch.save(obj, writer)
    except RuntimeError:
        if writer.error is None:
            raise
        raise writer.error from None


def atomic_save(obj, path):
    """torch.save through atomic_output; a full disk or an I/O error is a CheckpointError and
    leaves the previous `path` as it was."""
    try:
        with atomic_output(path) as temporary, open(temporary, "wb") as handle:
            save_into(obj, handle)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be saved ({error.strerror or error}); the previous "
                              f"file, if any, is unchanged; free space on that disk or write "
                              f"elsewhere") from None


def load_checkpoint(path):
    """The object in `path`, refusing files that are missing, damaged or would run code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file; pass the model.pth (or last.pth) "
                              f"that ncf.py wrote")
    damaged = failed_checksum(path)
    if damaged:
        raise CheckpointError(f"{path}: damaged: its entry {damaged} no longer matches the "
                              f"checksum it was saved with; pass a complete file written by "
                              f"ncf.py")
    try:
        # torch.load warns about some pickles (protocol 5, for one) before refusing them; the
        # refusal alone is the message.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        refused = "Weights only load failed" in first_line or "Unsupported" in str(error)
        if refused and not is_whole_pickle(path):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint, or a damaged one; pass a "
                                  f"complete file written by ncf.py") from None
        if refused:
            raise CheckpointError(
                f"{path}: refused: it holds objects that would run code when loaded "
                f"(only tensors and plain values are accepted); pass a state_dict saved by "
                f"ncf.py") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({first_line}); pass a file "
                              f"written by ncf.py") from None
    except Exception as error:  # a damaged file can fail in many layers of the unpickler
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot be read, truncated or not a checkpoint "
                              f"({reason}); pass a complete file written by ncf.py") from None
    not_dense = first_non_dense_tensor(loaded)
    if not_dense:
        name, layout = not_dense
        raise CheckpointError(f"{path}: {name} is a {layout} tensor; ncf.py saves dense tensors "
                              f"only, pass a checkpoint written by ncf.py")
    return loaded


def is_whole_pickle(path):
    """Whether `path` starts with a complete pickle (a zip's is torch's own): what torch
    refused is then the objects in it, not bytes that are no pickle at all (random, cut)."""
    if zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as stream:
            for _ in pickletools.genops(stream):
                pass
    except Exception:  # pickletools raises ValueError, EOFError and more on what is no pickle
        return False
    return True


def first_non_dense_tensor(value, name="checkpoint"):
    """(where, layout) of the first tensor in `value` (nested dicts, lists, tuples) that is not
    dense, or None: a sparse weight gets past the shape checks and fails deep inside torch."""
    if isinstance(value, torch.Tensor):
        return (name, str(value.layout).removeprefix("torch.")) if (
            value.layout != torch.strided) else None
    items = (value.items() if isinstance(value, dict) else
             enumerate(value) if isinstance(value, (list, tuple)) else ())
    for key, item in items:
        found = first_non_dense_tensor(item, key if name == "checkpoint" else f"{name}.{key}")
        if found:
            return found
    return None


def failed_checksum(path):
    """The first entry of a zip checkpoint (torch.save's format since PyTorch 1.6) whose bytes
    no longer match their CRC-32, or None.

    torch.load does not check the CRCs, so a flipped bit in a tensor would load as another
    weight, silently. A file that is not a readable zip is left to torch.load to refuse.
    """
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError):
        return None


def model_state(checkpoint, path):
    """The NeuMF state_dict inside a model.pth or last.pth, without any `module.` prefix."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(
            isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise CheckpointError(f"{path}: not a NeuMF checkpoint (expected a state_dict of "
                              f"tensors); use a checkpoint written by ncf.py")
    state = {str(key).removeprefix("module."): value for key, value in checkpoint.items()}
    neumf_shapes(state, path)
    # ncf.py stops a run whose weights go non-finite before saving them; such weights would
    # rank items by NaN and put NaN in recommendations and answers.
    for key, value in state.items():
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {key} holds NaN or infinite weights; use a "
                                  f"checkpoint written by ncf.py")
    return state


def model_kind(state):
    """neumf, gmf or mlp: which of neumf.py's models a state_dict's entry names are from."""
    has_mf = any(key.startswith("mf_") for key in state)
    has_mlp = any(key.startswith("mlp") for key in state)
    return "gmf" if has_mf and not has_mlp else "mlp" if has_mlp and not has_mf else "neumf"


def neumf_shapes(state, path):
    """{name: shape} of the model (NeuMF, GMF or MLP) that `state` claims to be, in the model's
    parameter order, after checking that `state` holds exactly those tensors, floating point and
    of those shapes."""
    def refuse(problem):
        return CheckpointError(f"{path}: not a NeuMF checkpoint ({problem}); use a checkpoint "
                               f"written by ncf.py")
    unknown = sorted(key for key in state if not NEUMF_PARAMETER.fullmatch(key))
    if unknown:
        raise refuse(f"unknown entries {', '.join(unknown)}")
    for key, value in state.items():
        dims = 1 if key.endswith(".bias") else 2
        if value.dim() != dims or 0 in value.shape:
            raise refuse(f"{key} has shape {list(value.shape)}, expected {dims}-D and not empty")
        if not value.is_floating_point():
            raise refuse(f"{key} holds {str(value.dtype).removeprefix('torch.')} values, "
                         f"expected floating point")
    kind = model_kind(state)
    embeddings = {"neumf": MF_EMBEDDINGS + MLP_EMBEDDINGS, "gmf": MF_EMBEDDINGS,
                  "mlp": MLP_EMBEDDINGS}[kind]
    missing = [key for key in embeddings if key not in state]
    if missing:
        raise refuse(f"missing {', '.join(missing)}")
    # Sizes read off one table each, as the original reads them; the others must agree.
    nb_users = state.get("mf_user_embed.weight", state.get("mlp_user_embed.weight")).shape[0]
    nb_items = state.get("mlp_item_embed.weight", state.get("mf_item_embed.weight")).shape[0]
    shapes, size, mf_dim = {}, 0, 0
    if kind != "mlp":
        mf_dim = state["mf_user_embed.weight"].shape[1]
        shapes.update({"mf_user_embed.weight": (nb_users, mf_dim),
                       "mf_item_embed.weight": (nb_items, mf_dim)})
    if kind != "gmf":
        half = state["mlp_item_embed.weight"].shape[1]
        shapes.update({"mlp_user_embed.weight": (nb_users, half),
                       "mlp_item_embed.weight": (nb_items, half)})
        size = 2 * half
        for index in range(sum(1 for key in state if re.fullmatch(r"mlp\.\d+\.weight", key))):
            weight = state.get(f"mlp.{index}.weight")
            if weight is None:
                raise refuse(f"missing mlp.{index}.weight")
            shapes[f"mlp.{index}.weight"] = (weight.shape[0], size)
            shapes[f"mlp.{index}.bias"] = (weight.shape[0],)
            size = weight.shape[0]
    shapes["final.weight"], shapes["final.bias"] = (1, size + mf_dim), (1,)
    missing = [key for key in shapes if key not in state]
    unexpected = sorted(key for key in state if key not in shapes)
    if missing or unexpected:
        raise refuse(f"missing {', '.join(missing)}" if missing else
                     f"unexpected {', '.join(unexpected)}")
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise refuse(f"{key} has shape {list(state[key].shape)}, the other tensors need "
                         f"{list(shape)}")
    return shapes


def check_training_state(state, path):
    """Refuse a last.pth that ncf.py could not resume from, before any of it is used: every
    entry is there with its type, the epoch count is 0 or more and matches the history, the
    optimiser state fits the saved model's parameters and the RNG states are ones PyTorch takes.
    Returns the model's state_dict (model_state), checked once here for all its uses.
    """
    def refuse(problem):
        return CheckpointError(f"{path}: not a training state written by ncf.py ({problem}); "
                               f"run without --resume to start afresh")
    if not isinstance(state, dict):
        raise refuse(f"holds {_describe(state)}, expected a dict")
    missing = [key for key in TRAINING_STATE if key not in state]
    if missing:
        raise refuse(f"missing {', '.join(missing)}")
    for key, (expected, valid) in TRAINING_STATE.items():
        if not valid(state[key]):
            raise refuse(f"{key} is {_describe(state[key])}, expected {expected}")
    if len(state["history"]) != state["epoch"]:
        raise refuse(f"epoch is {state['epoch']} but history holds {len(state['history'])} "
                     f"epochs")
    if state["precision"] == "float16" and not all(_is_number(state["scaler"].get(key))
                                                   for key in SCALER_NUMBERS):
        raise refuse("scaler lacks the loss scale of a mixed-precision run")
    optimizer = state["args"].get("optimizer", "adam")
    if optimizer not in OPTIMIZER_NAMES:
        raise refuse(f"args' optimizer is {_describe(optimizer)}, expected one of "
                     f"{', '.join(OPTIMIZER_NAMES)}")
    weights = model_state(state, path)
    problem = (_optimizer_problem(state["optimizer"],
                                  list(neumf_shapes(weights, path).values()), optimizer)
               or _optimizer_settings_problem(state["optimizer"]["param_groups"][0],
                                              state["args"], optimizer))
    if problem:
        raise refuse(problem)
    return weights


def _optimizer_problem(optimizer, shapes, kind):
    """Why `optimizer` is not the state of a `kind` (adam or sgd, as ncf.py's --optimizer) of a
    model with parameters of `shapes`, or None."""
    groups, per_parameter = optimizer.get("param_groups"), optimizer.get("state")
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(per_parameter, dict)):
        return f"optimizer is not the state of one {OPTIMIZER_NAMES[kind]} parameter group"
    group = groups[0]
    if kind == "sgd":
        if not all(_is_number(group.get(key)) for key in ("lr", "momentum", "weight_decay")):
            return "optimizer lacks numeric lr, momentum or weight_decay: not an SGD state"
    else:
        betas = group.get("betas")
        if not (all(_is_number(group.get(key)) for key in ("lr", "eps", "weight_decay"))
                and isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(map(_is_number, betas))):
            return "optimizer lacks numeric lr, betas, eps or weight_decay"
    if group.get("params") != list(range(len(shapes))):
        return (f"optimizer's parameters are {_describe(group.get('params'))}, the model has "
                f"{len(shapes)}: an optimiser state of another model")
    per_parameter_keys = SGD_PER_PARAMETER if kind == "sgd" else ADAM_PER_PARAMETER
    for index, entry in per_parameter.items():
        if not (_is_int(index) and 0 <= index < len(shapes) and isinstance(entry, dict)
                and all(key in entry for key in per_parameter_keys)):
            return (f"optimizer's state {index!r} is not the {OPTIMIZER_NAMES[kind]} state of a "
                    f"model parameter")
        if kind == "adam":
            step = entry["step"]
            if not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.item() >= 0):
                return f"optimizer's step of parameter {index} is {_describe(step)}"
        for key, value in entry.items():
            if key != "step" and not (isinstance(value, torch.Tensor) and value.is_floating_point()
                                      and tuple(value.shape) == shapes[index]):
                return (f"optimizer's {key} of parameter {index} is {_describe(value)}, the "
                        f"parameter is {list(shapes[index])}: an optimiser state of another model")
    return None


def _optimizer_settings_problem(group, args, kind):
    """Why the optimiser's settings are not those ncf.py built it with from the saved flags, or
    None. load_state_dict takes the file's settings over the flags', so a changed learning rate
    would go on silently, and a setting of another type fails only at the first step."""
    for key, value in group.items():
        if key not in ("params", "betas") and not (value is None or isinstance(value, bool)
                                                   or _is_number(value)):
            return f"optimizer's {key} is {_describe(value)}, expected a number or a flag"
    built = {"lr": (group["lr"], "learning_rate")}
    if kind == "adam":
        built.update({"beta1": (group["betas"][0], "beta1"), "beta2": (group["betas"][1], "beta2"),
                      "eps": (group["eps"], "eps")})
    for setting, (value, flag) in built.items():
        if flag in args and value != args[flag]:
            return f"optimizer's {setting} {value} is not the saved run's --{flag} {args[flag]}"
    return None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_byte_state(value, size=None):
    return (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and value.numel() > 0 and (size is None or value.numel() == size))


def _is_rng_state(rng):
    if not (isinstance(rng, dict) and _is_byte_state(rng.get("torch"), CPU_RNG_BYTES)
            and "cuda" in rng and _is_mt19937_state(rng["torch"])):
        return False
    if rng["cuda"] is None:
        return True
    # Checked against this machine's generator only where ncf.py would restore it.
    return _is_byte_state(rng["cuda"], torch.cuda.get_rng_state().numel()
                          if torch.cuda.is_available() else None)


def _is_mt19937_state(state):
    # The right size is not enough: torch.set_rng_state refuses some byte strings of it.
    try:
        torch.Generator().set_state(state)
    except RuntimeError:
        return False
    return True


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


CPU_RNG_BYTES = torch.get_rng_state().numel()
BEST_NUMBERS = ("hr", "ndcg", "train_seconds", "run_seconds")
BEST_TIMES = ("time_to_best", "time_to_target", "train_time_to_best", "train_time_to_target")
RECORD_NUMBERS = ("train_throughput", "eval_throughput")
PRECISIONS = ("float32", "tf32", "bfloat16", "float16")
# Entry of last.pth: (what it must be, for the message; the test).
TRAINING_STATE = {
    "model": ("a NeuMF state_dict", lambda value: isinstance(value, dict)),
    "optimizer": ("an Adam or SGD state_dict", lambda value: isinstance(value, dict)),
    "scaler": ("a GradScaler state_dict", lambda value: isinstance(value, dict)),
    "epoch": ("a whole number, 0 or more", lambda value: _is_int(value) and value >= 0),
    "best": (f"a dict with numbers {', '.join(BEST_NUMBERS)} (hr and ndcg in [0, 1]), a whole "
             f"epoch and {' and '.join(BEST_TIMES)} as numbers or None",
             lambda value: isinstance(value, dict) and _is_int(value.get("epoch"))
             and all(_is_number(value.get(key)) for key in BEST_NUMBERS)
             and all(0.0 <= value[key] <= 1.0 for key in ("hr", "ndcg"))
             and all(key in value and (value[key] is None or _is_number(value[key]))
                     for key in BEST_TIMES)),
    # Every value of a record is compared or averaged on resume: all must be numbers.
    "history": (f"a list of dicts of numbers with a whole epoch and "
                f"{', '.join(RECORD_NUMBERS)}",
                lambda value: isinstance(value, list) and all(
                    isinstance(record, dict) and _is_int(record.get("epoch"))
                    and all(key in record for key in RECORD_NUMBERS)
                    and all(map(_is_number, record.values()))
                    for record in value)),
    "args": ("a dict of flags with the --data path",
             lambda value: isinstance(value, dict) and isinstance(value.get("data"), str)),
    "data": ("a dict with whole numbers nb_users, nb_items and nb_train",
             lambda value: isinstance(value, dict) and all(
                 _is_int(value.get(key)) and value[key] >= 0
                 for key in ("nb_users", "nb_items", "nb_train"))),
    "rng": (f"{{'torch': a uint8 tensor of {CPU_RNG_BYTES} bytes, 'cuda': None or a uint8 "
            f"tensor}}", _is_rng_state),
    "precision": (f"one of {', '.join(PRECISIONS)}",
                  lambda value: isinstance(value, str) and value in PRECISIONS),
}


def architecture(state):
    """(nb_users, nb_items, mf_dim, mlp_layer_sizes) read off a model's state_dict's shapes;
    mf_dim is 0 for an MLP, mlp_layer_sizes empty for a GMF."""
    user_table = state.get("mf_user_embed.weight", state.get("mlp_user_embed.weight"))
    item_table = state.get("mf_item_embed.weight", state.get("mlp_item_embed.weight"))
    mf_dim = state["mf_user_embed.weight"].shape[1] if "mf_user_embed.weight" in state else 0
    layers = []
    if "mlp_user_embed.weight" in state:
        layer_count = sum(1 for key in state
                          if key.startswith("mlp.") and key.endswith(".weight"))
        layers = [2 * state["mlp_user_embed.weight"].shape[1]]
        layers += [state[f"mlp.{index}.weight"].shape[0] for index in range(layer_count)]
    return user_table.shape[0], item_table.shape[0], mf_dim, layers


def check_matches(state, path, nb_users, nb_items, mf_dim=None, layers=None, kind=None,
                  kind_flag=None):
    """Refuse a checkpoint made for another dataset, another model shape or, given `kind`,
    another kind of model (kind_flag: the flag that asked for that kind, --model by default).
    The sizes of a branch the checkpoint's model lacks are not compared."""
    saved_kind = model_kind(state)
    if kind is not None and saved_kind != kind:
        raise CheckpointError(
            f"{path}: checkpoint holds {KIND_NAMES[saved_kind]} model, "
            f"{kind_flag or f'--model {kind}'} needs {KIND_NAMES[kind]} one; pass the "
            f"model.pth of an ncf.py --model {kind} run")
    saved_users, saved_items, saved_mf_dim, saved_layers = architecture(state)
    if saved_users != nb_users or saved_items != nb_items:
        raise CheckpointError(
            f"{path}: checkpoint has {saved_users} users and {saved_items} items, data has "
            f"{nb_users} users and {nb_items} items; use the checkpoint of this dataset")
    if mf_dim is not None and saved_kind != "mlp" and saved_mf_dim != mf_dim:
        raise CheckpointError(f"{path}: checkpoint has --factors {saved_mf_dim}, run asks for "
                              f"{mf_dim}; pass --factors {saved_mf_dim} or another checkpoint")
    if layers is not None and saved_kind != "gmf" and list(saved_layers) != list(layers):
        raise CheckpointError(
            f"{path}: checkpoint has --layers {' '.join(map(str, saved_layers))}, run asks for "
            f"{' '.join(map(str, layers))}; pass those --layers or another checkpoint")


def load_model(path, device="cpu", dropout=0.0):
    """The NeuMF, GMF or MLP that `path` holds, built from its shapes and loaded with its
    weights."""
    state = model_state(load_checkpoint(path), path)
    nb_users, nb_items, mf_dim, layers = architecture(state)
    model = neumf.build(model_kind(state), nb_users, nb_items, mf_dim, layers, dropout=dropout)
    load_state(model, state, path)
    return model.to(device)


def load_state(model, state, path):
    """`model.load_state_dict(state)`, a mismatch reported as a CheckpointError naming `path`."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        # The first line only says that loading failed; the second says why.
        reason = str(error).strip().splitlines()[1:2] or [str(error).strip()]
        raise CheckpointError(f"{path}: does not fit NeuMF ({reason[0].strip()}); use a "
                              f"checkpoint written by ncf.py") from None
