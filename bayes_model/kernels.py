"""Which code computes the message tensor products: ``kernels: e3nn | cueq``.

``e3nn`` (the default) runs e3nn's TensorProduct. ``cueq`` runs the same products through
NVIDIA's cuEquivariance (``cuequivariance-torch``): its fused CUDA kernel on a GPU when
``cuequivariance-ops-torch`` is installed, its PyTorch fallback elsewhere. The swap changes
how the numbers are computed, not the model: the same irreps, paths, normalisation and
weights (tests/test_kernels.py checks the outputs against e3nn's), and the state dict stays
e3nn's, so a model trained with one loads and predicts with the other.
"""

from __future__ import annotations

import types

import torch
from e3nn import o3

__all__ = ["KERNELS", "KERNELS_HELP", "KernelsError", "check_kernels", "use_kernels"]

KERNELS = ("e3nn", "cueq")
KERNELS_HELP = ("Code of the message tensor products: e3nn, or cueq (NVIDIA cuEquivariance: "
                "fused CUDA kernels on a GPU, needs cuequivariance-torch and "
                "cuequivariance-ops-torch; the same numbers as e3nn).")


class KernelsError(ValueError):
    """``kernels: cueq`` where cuEquivariance is missing, or irreps it cannot take exactly."""


def _cue():
    try:
        import cuequivariance as cue
        import cuequivariance_torch as cuet
    except ImportError:
        raise KernelsError("kernels: cueq needs cuequivariance-torch (pip install "
                           "cuequivariance-torch cuequivariance-ops-torch-cu12); or use "
                           "kernels: e3nn") from None
    return cue, cuet


def _fused_available() -> bool:
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except ImportError:
        return False
    return True


def _channelwise(tp: o3.TensorProduct, device: torch.device, dtype: torch.dtype):
    """cuEquivariance's channel-wise product with ``tp``'s irreps, paths and weight layout
    (e3nn's mul_ir layout), on ``device``; KernelsError when they differ."""
    cue, cuet = _cue()
    allowed = list(dict.fromkeys(ir for _, ir in tp.irreps_out))
    method = "uniform_1d" if device.type == "cuda" and _fused_available() else "naive"
    if device.type == "cuda" and method == "naive":
        raise KernelsError("kernels: cueq on a GPU needs cuequivariance-ops-torch-cu12 (its "
                           "fused kernels); install it or use kernels: e3nn")
    ctp = cuet.ChannelWiseTensorProduct(
        cue.Irreps("O3", str(tp.irreps_in1)), cue.Irreps("O3", str(tp.irreps_in2)),
        filter_irreps_out=[cue.O3(ir.l, ir.p) for ir in allowed], layout=cue.mul_ir,
        shared_weights=False, internal_weights=False, device=device, dtype=dtype,
        math_dtype=dtype, method=method)
    if str(ctp.irreps_out) != str(tp.irreps_out) or ctp.weight_numel != tp.weight_numel:
        raise KernelsError(f"kernels: cueq cannot reproduce the tensor product "
                           f"{tp.irreps_in1} x {tp.irreps_in2} -> {tp.irreps_out} (it gives "
                           f"{ctp.irreps_out}, {ctp.weight_numel} weights); use e3nn")
    return ctp


def _cueq_forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor):
    key = (x.device, x.dtype)
    impl = self._cueq.get(key)
    if impl is None:  # built once per device and dtype (not a submodule: no state)
        impl = self._cueq[key] = _channelwise(self, x.device, x.dtype)
    return impl(x, y, weight)


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise KernelsError(f"kernels: {kernels!r} is not known; use {' or '.join(KERNELS)}")
    return kernels


def use_kernels(model: torch.nn.Module, kernels: str = "e3nn") -> torch.nn.Module:
    """``model`` with its message tensor products computed by ``kernels`` (in place;
    returns the model). The e3nn modules stay in the model (their state dict, their
    device moves); ``cueq`` only replaces their forward."""
    check_kernels(kernels)
    for layer in getattr(model, "layers", []):
        tp = layer.tp
        if kernels == "e3nn":
            tp.__dict__.pop("forward", None)  # back to the class's (e3nn's) forward
            continue
        probe = next(layer.parameters())
        # built now (refused now, not at the first batch) and kept for that device and dtype
        built = _channelwise(tp, probe.device, probe.dtype)
        object.__setattr__(tp, "_cueq", {(probe.device, probe.dtype): built})
        tp.forward = types.MethodType(_cueq_forward, tp)
    return model
