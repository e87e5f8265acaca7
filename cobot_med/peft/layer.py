"""The one way a PEFT method changes SAM's forward: a layer put where a base module was, holding it.

As peft's ``BaseTunerLayer``: an :class:`AdapterLayer` replaces one module of the base model
and keeps it as ``base_layer``; its ``forward`` calls the base and adds the method's own
computation (:meth:`AdapterLayer.adapted_forward`). No forward hooks, no class swapping: what
changes the model is the set of layers, so the way back is to put every ``base_layer`` back
(:func:`cobot_med.peft.tuner.unload`).

A layer also says what it can do:

- ``disabled``: when set, the layer is its base (``forward`` calls ``base_layer`` alone);
  :func:`cobot_med.peft.tuner.disable_adapters` sets it on every layer for the length of a
  ``with`` block;
- ``mergeable``: the layer can fold its branch into the base's weights (``merge()`` /
  ``unmerge()``, ``merged`` says which; a mergeable layer implements ``fold(±1)``); the others
  refuse with a one-line reason;
- ``token_wise``: the layer maps every token on its own when its base does, so
  :mod:`cobot_med.sam.speed` may skip padded tokens through it;
- ``unload()``: the base module, with any merged branch taken out first.

Parameters a method shares across layers, or that its checkpoint keys place outside the layers
(COBOT's orchestrator ``image_encoder.cobot``, LST's ``image_encoder.lst``, SAM-Adapter's
``image_encoder.sam_adapter``, the Adapter pair ``blocks.i.adapter``), live in an
:class:`AdapterModule` registered beside the base; layers call it, nothing else does, and
``unload`` removes it with the layers. Layers reach such a module (and other modules they only
read, e.g. VPT's ``norm1``) through :func:`share`, which does not register it a second time; a
deep copy of the model still maps the reference to its own copy.

State-dict keys do not show the layer: the base's entries keep the names they had before
injection (``blocks.0.norm1.weight`` under SSF's layer, not ``blocks.0.norm1.base_layer.weight``),
or, for the layers that always held their base under a name of their own, that name
(``base_key``: LoRA's and Conv-LoRA's ``qkv.base.weight``).
So base checkpoints, adapters and full-weight adapters saved before this module existed load
as they are. Parameter *names* (``named_parameters``) do show ``base_layer``.

Attribute reads a layer does not answer go to its base (``attn.qkv.in_features``,
``block.window_size``), so code that inspects the base model keeps working after injection.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """A module that replaces ``base_layer`` in the model and calls it."""

    mergeable: bool = False
    token_wise: bool = False
    base_key: str = ""  # the base's entries in the state dict: its own keys ("") or under this name

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.disabled = False
        self.merged = False
        self.register_state_dict_post_hook(_base_keys_on_save)
        self.register_load_state_dict_pre_hook(_base_keys_on_load)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.merged:  # merged: the base's weights hold the branch already
            return self.base_layer(*args, **kwargs)
        return self.adapted_forward(*args, **kwargs)

    def adapted_forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def check_merge(self) -> None:
        """Raise, with the reason, when the branch cannot fold into the base now (merge calls it first, and so
        do the tuner's merges for every layer before changing any)."""
        if not self.mergeable:
            raise TypeError(f"{type(self).__name__} does not fold into its base layer: it cannot merge")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the branch into the base's weights (mergeable layers only); a no-op when merged."""
        if not self.merged:
            self.check_merge()
            self.fold(+1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged branch back out of the base's weights (mergeable layers only)."""
        if not self.mergeable:
            raise TypeError(f"{type(self).__name__} does not fold into its base layer: it cannot unmerge")
        if self.merged:
            self.fold(-1)
            self.merged = False

    def fold(self, direction: int) -> None:
        """Add the branch to the base's weights (``direction`` +1) or take it out (-1)."""
        raise NotImplementedError

    def unload(self) -> nn.Module:
        """The base module as it was before injection (a merged branch is taken out first)."""
        if self.merged:
            self.unmerge()
        return self.base_layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)


def _outer_prefix(layer: AdapterLayer, prefix: str) -> str:
    return prefix + (layer.base_key + "." if layer.base_key else "")


def _base_keys_on_save(layer: AdapterLayer, state_dict: dict, prefix: str, _metadata: Any) -> None:
    """``prefix.base_layer.X`` -> ``prefix.[base_key.]X``, in place and in order (the layer's entries are last)."""
    inner, outer = prefix + "base_layer.", _outer_prefix(layer, prefix)
    keys = list(state_dict)
    first = next((i for i, k in enumerate(keys) if k.startswith(prefix)), len(keys))
    tail = [(k, state_dict.pop(k)) for k in keys[first:]]
    for key, value in tail:
        new = outer + key[len(inner):] if key.startswith(inner) else key
        if new in state_dict:
            raise RuntimeError(f"{type(layer).__name__} at {prefix!r}: the base's key {new!r} is also the layer's")
        state_dict[new] = value


def _base_keys_on_load(layer: AdapterLayer, state_dict: dict, prefix: str, *_args: Any) -> None:
    """The reverse of :func:`_base_keys_on_save`: the base's entries go back under ``base_layer``."""
    outer = _outer_prefix(layer, prefix)
    own = set(layer._parameters) | set(layer._buffers) | (set(layer._modules) - {"base_layer"})
    for key in [k for k in state_dict if k.startswith(outer)]:
        head = key[len(outer):].split(".", 1)[0]
        if head == "base_layer" or (not layer.base_key and head in own):
            continue
        state_dict[prefix + "base_layer." + key[len(outer):]] = state_dict.pop(key)


class AdapterModule:
    """Marks a module a method registers beside the base model (shared or placed parameters).

    Mixed into an ``nn.Module`` subclass; :func:`cobot_med.peft.tuner.unload` deletes it.
    """


def share(layer: nn.Module, name: str, module: nn.Module) -> None:
    """Give ``layer`` a reference to ``module`` without registering it (it is registered elsewhere)."""
    layer.__dict__[name] = module


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (a dotted state-dict path, list indices included) under ``root``."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def wrap(root: nn.Module, path: str, make_layer: Callable[[nn.Module], AdapterLayer]) -> AdapterLayer:
    """Replace the module at ``path`` by ``make_layer(module)``; returns the new layer."""
    layer = make_layer(root.get_submodule(path))
    replace_module(root, path, layer)
    return layer


def base_of(module: nn.Module) -> nn.Module:
    """``module`` itself, or the base under any layers wrapped around it."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every layer of ``model`` with its path, outer layers before the layers inside them."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def is_token_wise(module: nn.Module) -> bool:
    """True when ``module`` maps every token on its own: a Linear, or token-wise layers around one."""
    while isinstance(module, AdapterLayer) and module.token_wise:
        module = module.base_layer
    return type(module) is nn.Linear

