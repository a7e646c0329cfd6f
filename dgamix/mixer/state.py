"""Checkpoint state as plain Python.

Since torch 2.6, `torch.load(path)` defaults to weights_only=True, which refuses numpy arrays and numpy scalars (it
never unpickles arbitrary objects). The stream's and the strategies' `state_dict()` therefore hold only dicts,
lists, ints, floats, strings and tensors; their `load_state_dict()` also accepts tensors (and numpy arrays, from
older checkpoints) in place of the lists. Floats survive both forms bit for bit: a Python float is the float64 it
came from, and so is a float64 tensor.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def plain(value: Any) -> Any:
    """numpy arrays -> lists and numpy scalars -> Python scalars, recursively through dicts, lists and tuples (tuples
    become lists); tensors and Python values are kept."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def array(value: Any, dtype: type) -> np.ndarray:
    """A saved vector (list, tensor on any device, or numpy array) as a new numpy array of `dtype`."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.array(value, dtype=dtype)
