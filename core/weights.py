"""Read and write model weights without unpickling anything.

`.safetensors` is read with safetensors; `.pt`/`.pth`/`.bin` with `torch.load(weights_only=True)`,
which refuses arbitrary Python objects. Nothing is ever downloaded.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file


class WeightsError(ValueError):
    """Weights that cannot be loaded; the message names the file and the keys at fault."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path!r}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # noqa: TID251 (the one reader, never unpickling)
    except Exception as e:
        raise WeightsError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). "
            "shardvision never unpickles arbitrary objects; convert it to .safetensors."
        ) from None
    # Common wrappers of training scripts: {"model": sd}, {"state_dict": sd}, {"module": sd}.
    for key in ("model", "state_dict", "module", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return obj


def load_weights(model: torch.nn.Module, path: str, exclude: Sequence[str] = ()) -> None:
    """Load `path` into `model` strictly, except for names matching an `exclude` glob."""
    state = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    skipped = {k for k in state if any(fnmatch.fnmatch(k, pat) for pat in exclude)}
    state = {k: v for k, v in state.items() if k not in skipped}

    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not any(fnmatch.fnmatch(k, pat) for pat in exclude)]
    unexpected = [k for k in state if k not in own]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:5])}")
    if missing:
        problems.append(f"missing from the file: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        raise WeightsError(
            f"{path} does not fit the model ({'; '.join(problems)}). "
            "To fine-tune with a new head, skip its weights with model.weights_exclude (e.g. ['head.*'])."
        )
    model.load_state_dict(state, strict=False)
