"""The fake second device the device tests run on behaves like an accelerator where it matters."""

import pytest
import torch

from fake_device import DeviceMismatch, fake_device, on_fake_device


def test_mixing_devices_raises_as_on_cuda():
    with fake_device() as dev:
        x = torch.randn(4, 3).to(dev)
        assert on_fake_device(x * 2) and (x * 2).device == dev
        with pytest.raises(DeviceMismatch, match="meta:1 and cpu"):
            x.mean(0) + x.std(0) * torch.randn(2, 3)  # a CPU draw mixed with rows on the device
        assert (x + torch.tensor(1.0)).device == dev  # 0-dim CPU scalars are allowed, as on CUDA
        assert x[torch.tensor([0, 2])].shape == (2, 3)  # and CPU indices
        other = torch.zeros(4, 3, device=torch.device("meta", 0))
        with pytest.raises(DeviceMismatch, match="meta:0 and meta:1"):
            x + other
        with pytest.raises(TypeError, match="Use Tensor.cpu"):
            x.numpy()
        assert torch.equal(x.cpu(), x.to("cpu")) and x.tolist() == x.cpu().tolist()
        assert torch.tensor([1, 2], device=dev).device == dev and torch.zeros(2).device.type == "cpu"


def test_modules_move_with_their_data_and_ties():
    embed = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embed.weight  # tied, as Qwen's LM head
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    expected = head(embed(torch.tensor([1, 2]))).detach()
    with fake_device() as dev:
        model.to(dev)
        assert model["head"].weight is model["embed"].weight and on_fake_device(model["head"].weight)
        out = model["head"](model["embed"](torch.tensor([1, 2]).to(dev)))
        out.sum().backward()
        assert on_fake_device(model["embed"].weight.grad)
    assert torch.allclose(out.detach().cpu(), expected)
