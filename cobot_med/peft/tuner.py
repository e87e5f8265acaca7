"""The common contract of the PEFT library: inject by name, count, group, merge, disable, unload, aux loss.

Each method is one module with a config dataclass and an ``inject(sam, config)`` that puts its
:class:`~cobot_med.peft.layer.AdapterLayer` layers in place of base modules (the one injection
mechanism: module replacement; no hooks, no class swapping). What trains is set here only:
SAM is frozen, then the parameters the method added, the base tensors it names
(``trainable(sam, config)``: BitFit's biases, ``full``'s encoder) and, for every method that
trains (all but ``frozen``), the mask decoder are unfrozen. The state-dict entries the method
added plus the trainable ones are recorded, so adapter checkpoints hold just those.

The way back: :func:`unload` puts every base module back, :func:`disable_adapters` runs the
base for the length of a ``with`` block, :func:`merge_adapters` asks each layer that says it is
``mergeable`` to fold itself into its base.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from . import adaptformer, conv_lora, decoder, frozen, full, lora
from . import adapter, bitfit, lst, sam_adapter, ssf, vpt
from .cobot import is_cobot_parameter
from .config import PeftConfig
from .layer import AdapterLayer, AdapterModule, adapter_layers, replace_module


@dataclasses.dataclass(frozen=True)
class PeftMethod:
    name: str
    config_class: type[PeftConfig]
    inject: Callable[[nn.Module, Any], None] | None  # puts the method's layers in place; None: adds nothing
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    trains_decoder: bool = True
    trainable: Callable[[nn.Module, Any], Iterable[nn.Parameter]] | None = None  # base tensors that train

    def make_config(self, options: Mapping[str, Any] | None = None) -> PeftConfig:
        merged = {**self.defaults, **(options or {})}
        for key, value in self.defaults.items():  # nested option dicts (cobot) merge, not replace
            if isinstance(value, Mapping) and isinstance((options or {}).get(key), Mapping):
                merged[key] = {**value, **options[key]}
        return self.config_class.from_dict(merged)


METHODS: dict[str, PeftMethod] = {
    m.name: m
    for m in (
        PeftMethod("frozen", frozen.FrozenConfig, None, trains_decoder=False),
        PeftMethod("decoder", decoder.DecoderConfig, None),
        PeftMethod("full", full.FullConfig, None, trainable=full.trainable),
        PeftMethod("lora", lora.LoraConfig, lora.inject),
        PeftMethod("lora+cobot", lora.LoraConfig, lora.inject, {"cobot": {}}),
        PeftMethod("adaptformer", adaptformer.AdaptFormerConfig, adaptformer.inject),
        PeftMethod("adaptformer+cobot", adaptformer.AdaptFormerConfig, adaptformer.inject, {"cobot": {}}),
        PeftMethod("conv_lora", conv_lora.ConvLoraConfig, conv_lora.inject),
        PeftMethod("bitfit", bitfit.BitFitConfig, None, trainable=bitfit.trainable),
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
    plus every trainable tensor and the running statistics of batch norms that train), i.e. what an
    adapter checkpoint holds.
    """
    method = get_method(name)
    config = method.make_config(options)
    before = {id(t) for t in sam.state_dict(keep_vars=True).values()}
    if method.inject is not None:
        method.inject(sam, config)
    # what trains, set in this one place: what the method added, the base tensors it names, the decoder
    sam.requires_grad_(False)
    trains = [p for p in sam.parameters() if id(p) not in before]
    if method.trainable is not None:
        trains.extend(method.trainable(sam, config))
    if method.trains_decoder:
        trains.extend(mask_decoder(sam).parameters())
    for p in trains:
        p.requires_grad_(True)
    state = sam.state_dict(keep_vars=True)
    trainable = {id(p) for p in sam.parameters() if p.requires_grad}
    trainable |= {id(b) for m in sam.modules() if trains_statistics(m) for b in m.buffers(recurse=False)}
    adapter_keys = [k for k, t in state.items() if id(t) not in before or id(t) in trainable]
    return config, adapter_keys


def trains_statistics(module: nn.Module) -> bool:
    """A batch norm whose weight trains: its running statistics change in training (so they belong to the
    adapter); the other batch norms stay in eval mode (``PromptableSam.train``) and keep the base's."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None and (
        module.weight.requires_grad)


def mask_decoder(sam: nn.Module) -> nn.Module:
    """segment-anything's ``Sam.mask_decoder``, or SAM 2's ``sam_mask_decoder`` (``SAM2Base``)."""
    return sam.mask_decoder if hasattr(sam, "mask_decoder") else sam.sam_mask_decoder


def prompt_encoder(sam: nn.Module) -> nn.Module:
    """segment-anything's ``Sam.prompt_encoder``, or SAM 2's ``sam_prompt_encoder`` (``SAM2Base``)."""
    return sam.prompt_encoder if hasattr(sam, "prompt_encoder") else sam.sam_prompt_encoder


def count_parameters(sam: nn.Module) -> dict[str, int]:
    """Trainable counts as the papers report them (image encoder) and for the whole model (for SAM 2 ``total``
    includes the memory attention and memory encoder, which stay frozen)."""

    def trainable(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    return {
        "image_encoder_trainable": trainable(sam.image_encoder),
        "mask_decoder_trainable": trainable(mask_decoder(sam)),
        "prompt_encoder_trainable": trainable(prompt_encoder(sam)),
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


def _mergeable_layers(model: nn.Module) -> list[AdapterLayer]:
    return [layer for _, layer in adapter_layers(model) if layer.mergeable]


def merge_adapters(model: nn.Module) -> int:
    """Fold every layer that says it is ``mergeable`` (LoRA, LoRA+COBOT, SSF but after the neck's
    bias-free convolutions) into its base's weights.

    Returns how many layers merged: 0 for a method with no mergeable layer, whose layers keep
    running their branch (a layer's own ``merge()`` refuses with a TypeError).
    """
    layers = _mergeable_layers(model)
    for layer in layers:  # every refusal before the first change
        if not layer.merged:
            layer.check_merge()
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_adapters(model: nn.Module) -> int:
    """Take every merged branch back out of its base's weights; returns how many mergeable layers there are."""
    layers = _mergeable_layers(model)
    for layer in layers:
        layer.unmerge()
    return len(layers)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes its base's outputs; on exit every layer is as it was.

    Merged layers are unmerged for the block and merged again after it. Tensors a method trains
    in place (``full``, BitFit's biases, the mask decoder of every method) are the base's own and
    stay as trained.
    """
    layers = [layer for _, layer in adapter_layers(model)]
    states = [(layer, layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, disabled, merged in states:
            layer.disabled = disabled
            if merged and not layer.merged:
                layer.merge()


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put every base module back and remove what the method registered beside it; returns ``model``.

    Afterwards ``model`` is its base: the same modules, state-dict keys and outputs, nothing of
    the adapter left. ``merge=True`` folds mergeable layers into their bases first (LoRA's
    merge-and-unload, for inference; refused with a ValueError, before anything changes, when a
    layer cannot fold); without it merged layers are unmerged. ``requires_grad``
    is left as it is (``apply_peft`` sets it again), and so are tensors a method trains in place
    (``full``, BitFit, the mask decoder). A model can then take another method with ``apply_peft``.
    """
    layers = adapter_layers(model)
    kept_apart = [path for path, layer in layers if not layer.mergeable]
    if merge and kept_apart:  # checked first: nothing is changed when refusing
        raise ValueError(f"cannot merge and unload: {len(kept_apart)} layer(s) do not fold into their base "
                         f"(e.g. {kept_apart[0]}), and unloading would drop what they add; unload without merge")
    for _, layer in layers if merge else ():
        if not layer.merged:
            layer.check_merge()
    for path, layer in reversed(layers):  # inner layers first
        if merge and layer.mergeable:
            layer.merge()
            base = layer.base_layer
        else:
            base = layer.unload()
        if path:
            replace_module(model, path, base)
        else:
            model = base
    added = [path for path, m in model.named_modules() if isinstance(m, AdapterModule)]
    for path in reversed(added):
        parent, _, child = path.rpartition(".")
        delattr(model.get_submodule(parent) if parent else model, child)
    return model


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Any method's auxiliary training loss from the last forward (Conv-LoRA's load balancing)."""
    return conv_lora.auxiliary_loss(model)
