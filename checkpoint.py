"""Reading and writing model files safely.

`model.pth` is the original's format: the NeuMF state_dict alone (a multi-process save of the
original may carry a `module.` prefix). `last.pth` is ours: the full training state for
`--resume`. Both are read with `weights_only=True`, which refuses any pickle that would run
code, and both are written under a temporary name and renamed, so a killed run never leaves
a half-written file behind.
"""
import os
import pickle

import torch

from fileio import atomic_output
from neumf import NeuMF


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def atomic_save(obj, path):
    # A handle, not the temporary name: torch.save names the zip archive after the file's stem,
    # which here holds the pid, so the same object would save to different bytes each run.
    with atomic_output(path) as temporary, open(temporary, "wb") as handle:
        torch.save(obj, handle)


def load_checkpoint(path):
    """The object in `path`, refusing files that are missing, damaged or would run code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if "Weights only load failed" in first_line or "Unsupported" in str(error):
            raise CheckpointError(
                f"{path}: refused: it holds objects that would run code when loaded "
                f"(only tensors and plain values are accepted)") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({first_line})") from None
    except Exception as error:  # a damaged file can fail in many layers of the unpickler
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot be read, truncated or not a checkpoint "
                              f"({reason})") from None


def model_state(checkpoint, path):
    """The NeuMF state_dict inside a model.pth or last.pth, without any `module.` prefix."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(
            isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise CheckpointError(f"{path}: not a NeuMF checkpoint (expected a state_dict of tensors)")
    state = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    missing = {"mf_user_embed.weight", "mf_item_embed.weight", "mlp_user_embed.weight",
               "mlp_item_embed.weight", "final.weight"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: not a NeuMF checkpoint (missing {', '.join(sorted(missing))})")
    return state


def architecture(state):
    """(nb_users, nb_items, mf_dim, mlp_layer_sizes) read off a NeuMF state_dict's shapes."""
    nb_users, mf_dim = state["mf_user_embed.weight"].shape
    nb_items = state["mf_item_embed.weight"].shape[0]
    layer_count = sum(1 for key in state if key.startswith("mlp.") and key.endswith(".weight"))
    layers = [2 * state["mlp_user_embed.weight"].shape[1]]
    layers += [state[f"mlp.{index}.weight"].shape[0] for index in range(layer_count)]
    return nb_users, nb_items, mf_dim, layers


def check_matches(state, path, nb_users, nb_items, mf_dim=None, layers=None):
    """Refuse a checkpoint made for another dataset or another model shape."""
    saved_users, saved_items, saved_mf_dim, saved_layers = architecture(state)
    if saved_users != nb_users or saved_items != nb_items:
        raise CheckpointError(
            f"{path}: checkpoint has {saved_users} users and {saved_items} items, data has "
            f"{nb_users} users and {nb_items} items; use the checkpoint of this dataset")
    if mf_dim is not None and saved_mf_dim != mf_dim:
        raise CheckpointError(f"{path}: checkpoint has --factors {saved_mf_dim}, run asks for {mf_dim}")
    if layers is not None and list(saved_layers) != list(layers):
        raise CheckpointError(
            f"{path}: checkpoint has --layers {' '.join(map(str, saved_layers))}, run asks for "
            f"{' '.join(map(str, layers))}")


def load_model(path, device="cpu", dropout=0.0):
    """A NeuMF built from the shapes in `path` and loaded with its weights."""
    state = model_state(load_checkpoint(path), path)
    nb_users, nb_items, mf_dim, layers = architecture(state)
    model = NeuMF(nb_users, nb_items, mf_dim, layers, dropout=dropout)
    load_state(model, state, path)
    return model.to(device)


def load_state(model, state, path):
    """`model.load_state_dict(state)`, a mismatch reported as a CheckpointError naming `path`."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: does not fit NeuMF ({str(error).splitlines()[0]})") from None
