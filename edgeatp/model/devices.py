"""Putting a model on its device, or its layers on several devices, the way TransformerLens runs it.

TransformerLens' forward moves the residual stream of block ``i`` to device ``base + i·n // L``
(``n`` devices of one kind from the configured one on, ``L`` layers) and keeps the embedding with
block 0 and the final norm and unembedding with the last block. :func:`place` puts the modules
exactly there (its own ``move_model_modules_to_device`` puts every module on one device), so
every activation, and every hook edgeatp runs on it, lives on the device of its layer.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelError


def block_devices(device: torch.device, n_devices: int, n_layers: int) -> list[torch.device]:
    """The device of each block when ``n_devices`` devices from ``device`` on share ``n_layers`` blocks
    (TransformerLens' own rule; every block on the host for host devices)."""
    from transformer_lens.utilities import get_device_for_block_index

    class _Cfg:  # the two fields TransformerLens' rule reads
        def __init__(self) -> None:
            self.device, self.n_devices, self.n_layers = str(device), n_devices, n_layers

    return [torch.device(get_device_for_block_index(i, _Cfg())) for i in range(n_layers)]  # type: ignore[arg-type]


def check_devices(device: torch.device, n_devices: int) -> None:
    """Refuse a split the machine cannot hold, in one line."""
    if n_devices < 1:
        raise ModelError("{n_devices} must be at least 1", n_devices="n_devices")
    if n_devices == 1 or device.type == "cpu":  # on the host TransformerLens' rule keeps every block there
        return
    if device.type != "cuda":
        raise ModelError(f"{{n_devices}} {n_devices} splits a model over CUDA devices (or, for tests, the host); "
                         f"{device.type} cannot be split", n_devices="n_devices")
    first = device.index or 0
    if first + n_devices > torch.cuda.device_count():
        raise ModelError(f"{{n_devices}} {n_devices} from {device} needs devices {device.type}:{first}.."
                         f"{first + n_devices - 1}, but this machine has {torch.cuda.device_count()}",
                         n_devices="n_devices")


def place(model: Any, device: torch.device, n_devices: int = 1) -> None:
    """Move a HookedTransformer to ``device``, or split its blocks over ``n_devices`` devices from
    ``device`` on (embedding with the first block, final norm and unembedding with the last)."""
    check_devices(device, n_devices)
    cfg = model.cfg
    if n_devices == 1:
        model.to(str(device), print_details=False)  # a string keeps the index in cfg.device
        cfg.n_devices = 1
        return
    cfg.device, cfg.n_devices = str(device), n_devices
    devices = block_devices(device, n_devices, cfg.n_layers)
    for name in ("embed", "hook_embed", "pos_embed", "hook_pos_embed"):
        if hasattr(model, name):
            getattr(model, name).to(devices[0])
    for block, dev in zip(model.blocks, devices):
        block.to(dev)
    for name in ("ln_final", "unembed"):
        if hasattr(model, name):
            getattr(model, name).to(devices[-1])


def devices_of(model: Any) -> list[torch.device]:
    """The distinct devices a model's parameters live on, in layer order."""
    return list(dict.fromkeys(p.device for p in model.parameters()))
