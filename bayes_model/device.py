"""Where the model runs: ``device: auto | cpu | cuda | cuda:K``.

``auto`` is the first visible CUDA device when torch sees one, else the CPU; ``cuda`` the
first visible CUDA device; ``cuda:K`` the K-th visible one (``CUDA_VISIBLE_DEVICES`` pins
which GPUs a process sees). A setting the machine cannot honour is a :class:`DeviceError`
naming the setting and what was found, never a silent CPU fallback.

The model, its batches, optimiser state, EMA weights and posterior states live on that
device; predictions come back to the host as numpy arrays (:func:`host`). Ensemble members
spread over the visible GPUs (member k on GPU k mod n, :func:`member_devices`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from bayesal.bayes_model.errors import DeviceError

__all__ = ["DEVICE_HELP", "DEVICE_PATTERN", "DeviceError", "check_device", "describe_devices",
           "host", "member_devices", "model_device", "resolve_device", "split_on_oom"]

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
DEVICE_HELP = ("Where the model runs: auto (the first visible CUDA GPU, else the CPU), cpu, "
               "cuda or cuda:K (the K-th visible GPU; CUDA_VISIBLE_DEVICES pins which).")

T = TypeVar("T")


def check_device(setting: str, what: str = "device") -> str:
    """``setting`` if it is spelt like a device, else a DeviceError naming ``what``."""
    if not re.fullmatch(DEVICE_PATTERN, setting or ""):
        raise DeviceError(f"{what}: {setting!r} is not a device; use auto, cpu, cuda or "
                          "cuda:K")
    return setting


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    pinned = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device{pinned}"


def resolve_device(setting: str = "auto", *, what: str = "device",
                   cuda_count: int | None = None) -> torch.device:
    """The torch device for ``setting``; ``what`` names the setting in errors (``--device``,
    ``device``). ``cuda_count`` replaces the visible CUDA device count (tests)."""
    check_device(setting, what)
    count = _cuda_count() if cuda_count is None else cuda_count
    if setting == "cpu" or (setting == "auto" and count == 0):
        return torch.device("cpu")
    index = 0 if setting in ("auto", "cuda") else int(setting.split(":")[1])
    if count == 0:
        raise DeviceError(f"{what}: {setting!r} asks for a CUDA GPU, but {_no_cuda_reason()}; "
                          "use auto or cpu, or run where a GPU is visible")
    if index >= count:
        raise DeviceError(f"{what}: {setting!r} asks for GPU {index}, but {count} "
                          f"{'is' if count == 1 else 'are'} visible (cuda:0 to "
                          f"cuda:{count - 1}); pick one of those or set CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def member_devices(setting: str, members: int, *, what: str = "device",
                   cuda_count: int | None = None) -> list[torch.device]:
    """The device of each of ``members`` models: ``auto``/``cuda`` put member k on visible
    GPU k mod n (every GPU of the node used), ``cuda:K`` all on GPU K, ``cpu`` all on the
    CPU."""
    first = resolve_device(setting, what=what, cuda_count=cuda_count)
    if first.type == "cpu" or setting.startswith("cuda:"):
        return [first] * members
    count = _cuda_count() if cuda_count is None else cuda_count
    return [torch.device("cuda", k % count) for k in range(members)]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array on the host (the boundary of every prediction)."""
    return tensor.detach().to(torch.float64).cpu().numpy()


def split_on_oom(fn: Callable[[Sequence[int]], T], idx: Sequence[int], *,
                 what: str = "predicting") -> list[T]:
    """``[fn(idx)]``, or when a GPU runs out of memory, ``fn`` over the two halves of
    ``idx`` (recursively): the same results in smaller batches. One structure that does not
    fit is a DeviceError (never a silent fallback to the CPU)."""
    try:
        return [fn(idx)]
    except torch.cuda.OutOfMemoryError as exc:
        if len(idx) <= 1:
            first = (str(exc).splitlines() or [""])[0][:160]
            raise DeviceError(f"out of GPU memory {what} a single structure ({first}); use "
                              "a GPU with more free memory or --device cpu") from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(idx) // 2
        return (split_on_oom(fn, idx[:half], what=what)
                + split_on_oom(fn, idx[half:], what=what))


def describe_devices(devices: Sequence[torch.device]) -> str:
    """``on cpu``, ``on cuda:0 (NVIDIA H200)``, ``on cuda:0, cuda:1`` (progress output)."""
    names = list(dict.fromkeys(str(d) for d in devices))
    if len(names) == 1 and names[0].startswith("cuda"):
        return f"on {names[0]} ({torch.cuda.get_device_name(torch.device(names[0]))})"
    return "on " + ", ".join(names)
