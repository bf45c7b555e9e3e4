"""A second device on a CPU-only machine, for catching tensors made on the wrong device.

On a GPU, a tensor our code creates on the CPU and then mixes with the model's CUDA tensors raises "Expected
all tensors to be on the same device"; on a CPU-only machine everything is on the CPU and such bugs pass
silently. `fake_device()` gives the tests a device that behaves like an accelerator: tensors on
`torch.device("meta", i)` (reported as `meta:0`, `meta:1`) that carry real CPU data underneath, so models run
for real and give the same numbers, while:

- an operation mixing a fake-device tensor with a CPU tensor (other than a 0-dim scalar or an index) raises,
  as CUDA does;
- `meta:0` and `meta:1` are different devices: mixing them raises, as cuda:0 and cuda:1 do;
- `.numpy()` of a fake-device tensor raises, as it does for CUDA tensors; `.cpu()` / `.to("cpu")` work;
- factory functions (`torch.zeros(..., device=d)`, `torch.tensor(data, device=d)`) create on the fake device;
  without a device they create on the CPU, as on a GPU machine.

What it cannot show: CUDA kernels, numerics (bf16 / fp16 on the GPU), memory, streams, autocast on CUDA,
`torch.cuda.*` calls, and code that branches on `device.type == "cuda"` (the fake type is "meta"). Inside the
context `torch.inference_mode` behaves as `torch.no_grad` (tensor subclasses cannot be inference tensors).

    with fake_device() as dev:          # dev = torch.device("meta", 1)
        model.to(dev); out = model(x.to(dev))
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


class DeviceMismatch(RuntimeError):
    """Tensors on two devices met in one operation (what CUDA raises as "Expected all tensors to be on the same
    device")."""


def _is_fake(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


# Operations that legitimately take tensors from two devices: copies between devices, and indices.
_CROSS_DEVICE = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
             torch.ops.aten._index_put_impl_.default}


class FakeDeviceTensor(torch.Tensor):
    """A tensor reported on a fake device, holding its data in a CPU tensor (`elem`)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=device, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self) -> str:
        return f"FakeDeviceTensor({self.elem!r}, device='{self.device}')"

    def tolist(self):  # a method of our own: also reached where torch functions are disabled (recomputation)
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the "
                        "tensor to host memory first.")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            return args[0].elem.tolist()
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError(f"can't convert {args[0].device} device type tensor to numpy. Use Tensor.cpu() to copy "
                            "the tensor to host memory first.")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _dispatch(func, args, kwargs):
    if func is torch.ops.aten._to_copy.default:
        src = args[0]
        inner = src.elem if isinstance(src, FakeDeviceTensor) else src
        kw = dict(kwargs)
        target = kw.pop("device", None)
        out = func(inner, **kw)
        if target is not None:
            return FakeDeviceTensor(out, torch.device(target)) if _is_fake(target) else out
        return FakeDeviceTensor(out, src.device) if isinstance(src, FakeDeviceTensor) else out
    devices, cpu_tensors = set(), []
    flat = tree_flatten((args, kwargs))[0]
    for x in flat:
        if isinstance(x, FakeDeviceTensor):
            devices.add(x.device)
        elif isinstance(x, torch.Tensor) and x.dim() > 0:
            cpu_tensors.append(x)
    if len(devices) > 1:
        raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two devices, "
                             f"{' and '.join(sorted(map(str, devices)))} ({func})")
    if devices and cpu_tensors and func not in _CROSS_DEVICE:
        index_ok = func in _INDEXING and all(t.dtype in (torch.long, torch.int, torch.bool) for t in cpu_tensors)
        if not index_ok:
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two devices, "
                                 f"{next(iter(devices))} and cpu ({func})")
    target = kwargs.get("device")
    device = next(iter(devices)) if devices else (torch.device(target) if _is_fake(target) else None)
    unwrapped_args = tree_map(lambda x: x.elem if isinstance(x, FakeDeviceTensor) else x, args)
    unwrapped_kwargs = tree_map(lambda x: x.elem if isinstance(x, FakeDeviceTensor) else x, kwargs)
    if _is_fake(unwrapped_kwargs.get("device")):
        unwrapped_kwargs["device"] = torch.device("cpu")
    out = func(*unwrapped_args, **unwrapped_kwargs)
    if device is None:
        return out
    if func._overloadname == "out" or func.__name__.endswith("_out"):
        return kwargs["out"]  # out= variants return the tensor they wrote (its wrapper, or a CPU tensor)
    if func._schema.name.endswith("_"):
        return args[0]  # in-place: the tensor that changed, as the caller holds it
    return tree_map(lambda x: FakeDeviceTensor(x, device) if isinstance(x, torch.Tensor)
                    and not isinstance(x, FakeDeviceTensor) else x, out)


class _Dispatch(TorchDispatchMode):
    """Moves to a fake device (`.to(dev)`, `module.to(dev)`) and factories on it, for plain CPU tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (any(issubclass(t, FakeDeviceTensor) for t in types) or _is_fake(kwargs.get("device"))
                or func is torch.ops.aten._to_copy.default):
            return _dispatch(func, args, kwargs)
        return func(*args, **kwargs)


class _Factories(TorchFunctionMode):
    """`torch.tensor(data, device=fake)` and friends build on the CPU first (torch would make an empty meta
    tensor), then move."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], FakeDeviceTensor):
            return args[0].elem.tolist()
        if func in (torch.tensor, torch.as_tensor, torch.asarray):
            args = tree_map(lambda x: x.elem if isinstance(x, FakeDeviceTensor) else x, args)
        device = kwargs.get("device")
        if _is_fake(device) and func is not torch.Tensor.to:
            out = func(*args, **{**kwargs, "device": "cpu"})
            return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, out)
        return func(*args, **kwargs)


class _NoGradInference(torch.no_grad):
    def __init__(self, mode: bool = True):
        super().__init__()


@contextlib.contextmanager
def fake_device(index: int = 1) -> Iterator[torch.device]:
    """Inside: `torch.device("meta", index)` behaves as a second device (see the module docs)."""
    real = torch.inference_mode
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.inference_mode = _NoGradInference
    # module.to(dev) swaps each parameter's contents in place, as `.to("cuda")` does through set_data: a new
    # Parameter per module would untie tied weights (Qwen's embedding and LM head)
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _Factories(), _Dispatch():
            yield torch.device("meta", index)
    finally:
        torch.inference_mode = real
        torch.__future__.set_swap_module_params_on_conversion(swap)


def on_fake_device(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, FakeDeviceTensor)
