"""The common contract of the PEFT library: inject by name, count, group, merge, aux loss.

Each method is one module with a config dataclass and an ``inject(sam, config)`` that adds
its layers; this module freezes SAM first, then unfreezes the mask decoder for every
method that trains (all but ``frozen``), and records which state-dict entries the method
added so adapter checkpoints can hold just those plus the trainable ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from . import adaptformer, conv_lora, decoder, frozen, full, lora
from . import adapter, bitfit, lst, sam_adapter, ssf, vpt
from .cobot import is_cobot_parameter
from .config import PeftConfig


@dataclasses.dataclass(frozen=True)
class PeftMethod:
    name: str
    config_class: type[PeftConfig]
    inject: Callable[[nn.Module, Any], None]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    trains_decoder: bool = True
    mergeable: bool = False  # the branch folds into the frozen weights for inference

    def make_config(self, options: Mapping[str, Any] | None = None) -> PeftConfig:
        merged = {**self.defaults, **(options or {})}
        for key, value in self.defaults.items():  # nested option dicts (cobot) merge, not replace
            if isinstance(value, Mapping) and isinstance((options or {}).get(key), Mapping):
                merged[key] = {**value, **options[key]}
        return self.config_class.from_dict(merged)


METHODS: dict[str, PeftMethod] = {
    m.name: m
    for m in (
        PeftMethod("frozen", frozen.FrozenConfig, frozen.inject, trains_decoder=False),
        PeftMethod("decoder", decoder.DecoderConfig, decoder.inject),
        PeftMethod("full", full.FullConfig, full.inject),
        PeftMethod("lora", lora.LoraConfig, lora.inject, mergeable=True),
        PeftMethod("lora+cobot", lora.LoraConfig, lora.inject, {"cobot": {}}, mergeable=True),
        PeftMethod("adaptformer", adaptformer.AdaptFormerConfig, adaptformer.inject),
        PeftMethod("adaptformer+cobot", adaptformer.AdaptFormerConfig, adaptformer.inject, {"cobot": {}}),
        PeftMethod("conv_lora", conv_lora.ConvLoraConfig, conv_lora.inject),
        PeftMethod("bitfit", bitfit.BitFitConfig, bitfit.inject),
        PeftMethod("ssf", ssf.SsfConfig, ssf.inject),
        PeftMethod("vpt", vpt.VptConfig, vpt.inject),
        PeftMethod("adapter", adapter.AdapterConfig, adapter.inject),
        PeftMethod("sam_adapter", sam_adapter.SamAdapterConfig, sam_adapter.inject),
        PeftMethod("lst", lst.LstConfig, lst.inject),
    )
}


def get_method(name: str) -> PeftMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown PEFT method {name!r}; choose one of {sorted(METHODS)}") from None


def apply_peft(sam: nn.Module, name: str, options: Mapping[str, Any] | None = None) -> tuple[PeftConfig, list[str]]:
    """Freeze ``sam``, inject method ``name`` and set what trains.

    Returns the method's config and the state-dict keys of the adapter (what the method added
    plus every trainable tensor), i.e. what an adapter checkpoint holds.
    """
    method = get_method(name)
    config = method.make_config(options)
    before = {id(t) for t in sam.state_dict(keep_vars=True).values()}
    sam.requires_grad_(False)
    method.inject(sam, config)
    if method.trains_decoder:
        sam.mask_decoder.requires_grad_(True)
    state = sam.state_dict(keep_vars=True)
    trainable = {id(p) for p in sam.parameters() if p.requires_grad}
    adapter_keys = [k for k, t in state.items() if id(t) not in before or id(t) in trainable]
    return config, adapter_keys


def count_parameters(sam: nn.Module) -> dict[str, int]:
    """Trainable counts as the papers report them (image encoder) and for the whole model."""

    def trainable(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    return {
        "image_encoder_trainable": trainable(sam.image_encoder),
        "mask_decoder_trainable": trainable(sam.mask_decoder),
        "prompt_encoder_trainable": trainable(sam.prompt_encoder),
        "total_trainable": trainable(sam),
        "total": sum(p.numel() for p in sam.parameters()),
    }


def parameter_groups(
    model: nn.Module, lr: float = 1.25e-6, cobot_lr: float = 1.25e-4, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """The authors' two Adam groups: COBOT's C, R and heads at ``cobot_lr``, the rest at ``lr``."""
    cobot, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (cobot if is_cobot_parameter(name) else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "peft"}]
    if cobot:
        groups.append({"params": cobot, "lr": cobot_lr, "weight_decay": weight_decay, "name": "cobot"})
    return [g for g in groups if g["params"]]


def _mergeable_layers(model: nn.Module) -> Iterator[lora.LoraQkv]:
    return (m for m in model.modules() if isinstance(m, lora.LoraQkv))


def merge_adapters(model: nn.Module) -> int:
    """Fold every LoRA(+COBOT) branch into its frozen qkv weight; returns how many layers merged."""
    layers = list(_mergeable_layers(model))
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_adapters(model: nn.Module) -> int:
    layers = list(_mergeable_layers(model))
    for layer in layers:
        layer.unmerge()
    return len(layers)


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Any method's auxiliary training loss from the last forward (Conv-LoRA's load balancing)."""
    return conv_lora.auxiliary_loss(model)
