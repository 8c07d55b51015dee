"""ChannelsLastDecoder: on a device that prefers NHWC the decoder's weights and activations go
channels_last before the optimiser sees them, with the same outputs; elsewhere nothing changes. CUDA is stood
in for on CPU by making `prefers_channels_last` answer yes."""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch.utils.data import DataLoader

import la_seg.callbacks.layout as layout
from la_seg.callbacks.layout import ChannelsLastDecoder
from la_seg.module import LASegModule


def _fit_one_step(module: LASegModule, img_size: int) -> L.Trainer:
    size = (2, 1, img_size, img_size)
    batch = {"image": torch.rand(2, 3, img_size, img_size), "label": (torch.rand(size) > 0.5).float()}
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, enable_model_summary=False,
                        callbacks=[ChannelsLastDecoder()], **quiet)  # fmt: skip
    trainer.fit(module, DataLoader([batch], batch_size=None))
    return trainer


def _kernels(module: LASegModule) -> list[torch.Tensor]:
    return [p for p in module.net.decoder.parameters() if p.dim() == 4]


def test_decoder_goes_channels_last_where_the_device_prefers_it(tiny_net, monkeypatch):
    torch.manual_seed(0)
    module = LASegModule(net=tiny_net)
    monkeypatch.setattr(layout, "prefers_channels_last", lambda device: True)
    trainer = _fit_one_step(module, tiny_net.img_size)

    kernels = _kernels(module)
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert not all(p.is_contiguous() for p in kernels)  # 1x1 kernels are both; 3x3 ones only NHWC
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in kernels)  # the optimiser holds the converted parameters
    standard = copy.deepcopy(module).to(memory_format=torch.contiguous_format)
    seen = []
    module.net.decoder.blocks[-1].conv[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    image = torch.rand(2, 3, tiny_net.img_size, tiny_net.img_size)
    module.eval(), standard.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(image), standard(image), atol=1e-5, rtol=1e-4)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()


def test_nothing_changes_on_cpu(tiny_net):
    assert layout.prefers_channels_last(torch.device("cuda", 0))
    assert not layout.prefers_channels_last(torch.device("cpu"))
    module = LASegModule(net=tiny_net)
    _fit_one_step(module, tiny_net.img_size)
    assert all(p.is_contiguous() for p in _kernels(module))
