"""Network cost and speed helpers for any ``nn.Module``: MAC counting and in-place ``torch.compile``.

They are generic over modules (no architecture of ``nets/`` and no method of ``methods/``), so they live
at the bottom layer, where every method and the benchmarks in ``experiments/`` can import them.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["compile_in_place", "count_macs"]


def count_macs(module: nn.Module, args: tuple) -> int:
    """Multiply-accumulates of ``module(*args)``: torch's FLOP counter (matmuls and convolutions) / 2."""
    training = module.training
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    module.train(training)
    return counter.get_total_flops() // 2


def compile_in_place(net: nn.Module, owner: str) -> bool:
    """``torch.compile`` ``net``'s forward in place (``nn.Module.compile``: state_dict keys unchanged, no
    ``_orig_mod.``), with a fallback to eager and one warning naming the reason when the backend is missing
    or fails, at compile time or at the first call (e.g. no C++ compiler for inductor). Returns whether the
    network was compiled (a later failure at its first call still falls back)."""

    def fall_back(err: BaseException) -> None:
        while getattr(err, "inner_exception", None) is not None or err.__cause__ is not None:
            err = getattr(err, "inner_exception", None) or err.__cause__  # e.g. inside BackendCompilerFailed
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        net._compiled_call_impl = None
        warnings.warn(
            f"{owner}: model.compile=true but torch.compile is unavailable here ({reason}); "
            "running the network eagerly",
            UserWarning,
            stacklevel=3,
        )

    try:
        if not torch._dynamo.is_dynamo_supported():
            raise RuntimeError("TorchDynamo does not support this Python or platform")
        net.compile()
    except Exception as err:  # the backend's import and checks raise many types
        fall_back(err)
        return False
    compiled = net._compiled_call_impl
    checked = False

    def guarded(*args: Any, **kwargs: Any) -> Any:
        nonlocal checked
        if checked:
            return compiled(*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as err:
            # a real error in the network fails eagerly too, and is raised from there
            out = net._call_impl(*args, **kwargs)
            fall_back(err)
            return out
        checked = True
        return out

    net._compiled_call_impl = guarded
    return True
