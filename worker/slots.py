"""The LoRA slots of a transformer: a fixed number of adapters of a fixed rank on every linear layer, added once
(before the blocks are compiled), filled and zeroed in place per job (worker/adapters.py), so switching adapters
reloads nothing and recompiles nothing. Imports torch, peft and diffusers only: bench/gpu.py times the slots on a GPU
host that has nothing else."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .adapters import Adapter

SLOT = "job_adapter_{}"
ZERO = ("zero",)  # what an unused slot holds


class Slots:
    """The LoRA slots of one transformer: `count` adapters of rank up to `rank` on every linear layer."""

    def __init__(self, pipe: Any, count: int, rank: int):
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        transformer = pipe.transformer
        linears = {name: module for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
        self.names = [SLOT.format(index) for index in range(count)]
        self.rank = rank
        pipe.enable_lora_hotswap(target_rank=rank)  # before the first adapter is loaded and the blocks compiled
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # as meant: one adapter a slot
            for slot in self.names:
                pipe.load_lora_weights(zero_lora(linears, rank), adapter_name=slot)
        transformer.set_adapters(self.names, [1.0] * count)  # all active (set_adapters leaves float scalings)
        prepare_model_for_compiled_hotswap(transformer, target_rank=rank, check_compiled="ignore")  # tensors again
        self.layers = {name: module for name, module in transformer.named_modules() if isinstance(module, LoraLayer)}
        self.contents: list[tuple | None] = [ZERO] * count  # None: unknown (a write that did not finish)

    @torch.no_grad()
    def write(self, adapters: list[tuple[Adapter, float]]) -> None:
        """Slot i gets adapter i at its scale (in place: the same tensors, so compiled blocks stay valid); the
        others are zeroed. A slot that already holds what it should is left as it is."""
        for index, slot in enumerate(self.names):
            adapter, scale = adapters[index] if index < len(adapters) else (None, 0.0)
            wanted = ZERO if adapter is None else (adapter.key, scale)
            if self.contents[index] == wanted:
                continue
            self.contents[index] = None
            for name, layer in self.layers.items():
                down, up = layer.lora_A[slot].weight, layer.lora_B[slot].weight
                entry = adapter.layers.get(name) if adapter is not None else None
                if entry is None:
                    up.zero_()
                    down.zero_()
                    continue
                a, b, scaling = entry
                rank = a.shape[0]
                down[:rank].copy_(a)
                down[rank:].zero_()
                up[:, :rank].copy_(b)
                up[:, rank:].zero_()
                layer.scaling[slot].fill_(scaling * scale)
            self.contents[index] = wanted

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A[self.names[0]].weight.device


def zero_lora(linears: dict[str, torch.nn.Linear], rank: int) -> dict[str, torch.Tensor]:
    """A LoRA of `rank` on every linear layer, all zeros: what a slot holds when no adapter is in it."""
    weights = {}
    for name, module in linears.items():
        like = dict(dtype=module.weight.dtype, device=module.weight.device)
        weights[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, module.in_features, **like)
        weights[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, **like)
    return weights
