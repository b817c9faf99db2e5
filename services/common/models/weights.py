"""A model's `state_dict` as plain numpy arrays and back (the form weights travel in)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


class WeightsMismatch(ValueError):
    """Arrays that do not fit a model: missing, unexpected, or wrongly shaped tensors."""


def state_arrays(model: nn.Module, *, copy: bool = False) -> dict[str, npt.NDArray[np.generic]]:
    """`name -> array` in `state_dict` order: floats as float32, integers as int64.

    Without `copy`, float32/int64 CPU tensors are shared, not copied: the arrays change
    when the model trains. Pass `copy=True` for a snapshot (e.g. the base of a delta).
    """
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for name, tensor in model.state_dict().items():
        wire = _wire_tensor(tensor.detach())
        shared = wire.device.type == "cpu" and wire.data_ptr() == tensor.data_ptr()
        array = wire.cpu().numpy()
        arrays[name] = array.copy() if copy and shared else array
    return arrays


def state_entries(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """`(name, dtype name, shape)` of every `state_dict` entry as `state_arrays` returns it."""
    entries = []
    for name, tensor in model.state_dict().items():
        dtype = "float32" if tensor.is_floating_point() else "int64"
        if tensor.dtype == torch.bool:
            dtype = "bool"
        entries.append((name, dtype, tuple(tensor.shape)))
    return entries


def load_state_arrays(model: nn.Module, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Copy `arrays` into `model` (strict: same names and shapes, float for float tensors).

    Values are converted to each tensor's dtype and device; the arrays are only read,
    so read-only buffers (e.g. decoded from a message) are fine.
    """
    state = model.state_dict()
    _check_names(state.keys(), arrays.keys())
    tensors = {}
    for name, target in state.items():
        array = np.asarray(arrays[name])
        _check_entry(name, target, array)
        tensors[name] = _as_tensor(array)
    model.load_state_dict(tensors, strict=True)


def _wire_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)
    if tensor.dtype == torch.bool:
        return tensor
    return tensor if tensor.dtype == torch.int64 else tensor.to(torch.int64)


def _check_names(expected: Iterable[str], given: Iterable[str]) -> None:
    want, have = set(expected), set(given)
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise WeightsMismatch(
            f"weights do not fit the model: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )


def _few(names: list[str], limit: int = 5) -> str:
    return f"{names[:limit]}{' and more' if len(names) > limit else ''}"


def _check_entry(name: str, target: torch.Tensor, array: npt.NDArray[np.generic]) -> None:
    if tuple(array.shape) != tuple(target.shape):
        raise WeightsMismatch(
            f"{name}: array shape {array.shape} != model shape {tuple(target.shape)}"
        )
    if target.is_floating_point() and not np.issubdtype(array.dtype, np.floating):
        raise WeightsMismatch(f"{name}: model tensor is floating point, array is {array.dtype}")


def _as_tensor(array: npt.NDArray[np.generic]) -> torch.Tensor:
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        # torch warns that writing to a read-only array is undefined; we only read it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))
