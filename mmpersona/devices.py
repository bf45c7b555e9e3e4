"""Device and dtype resolution shared by every loader; nothing in the project hard-codes a device."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import MmpersonaError

if TYPE_CHECKING:
    import torch

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def resolve_device(device: Any = "auto") -> "torch.device":
    """`"auto"` picks CUDA, then MPS, then CPU; any torch device string or object is passed through."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MmpersonaError(f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from e


def resolve_dtype(dtype: Any, device: "torch.device") -> "torch.dtype":
    """`None`/`"auto"`: float32 on CPU, float16 on MPS; on CUDA bfloat16 where the GPU computes it natively
    (compute capability 8.0+, ROCm), else float16. T4 and V100 only emulate bf16 (slowly), and
    `torch.cuda.is_bf16_supported()` counts emulation unless asked not to."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise MmpersonaError(f"`dtype` must be one of auto, {', '.join(sorted(set(_DTYPES)))}; got {dtype!r}")
    return getattr(torch, name)


def process_device(device: Any = "auto") -> tuple[Any, Any]:
    """(accelerate's `PartialState`, the device this process should load its models on).

    Under `accelerate launch` with several processes, `"auto"` and an unindexed `"cuda"` become this process's
    own accelerator (`cuda:LOCAL_RANK`): a model loaded on plain `cuda` lands on cuda:0 in every process, and DDP
    then fails on every rank but the first. The state must exist before any model is loaded, which is why this is
    called first. CPU processes on one machine share its cores, so each gets its share of torch's threads."""
    import os

    from accelerate import PartialState

    state = PartialState(cpu=str(device) == "cpu")
    if state.num_processes > 1:
        if state.device.type == "cpu":
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
        if device is None or str(device) in ("auto", "cuda"):
            device = state.device
    return state, device
