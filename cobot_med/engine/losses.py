"""The training loss: the task loss on the present organs plus any method's auxiliary loss."""

from __future__ import annotations

import torch
from torch import nn

from ..peft import auxiliary_loss


class PeftLoss(nn.Module):
    """``loss(pred, target)`` + the PEFT method's auxiliary term (Conv-LoRA's load balancing).

    MONAI's trainer calls ``loss_function(pred, target)`` only; this keeps a reference to the
    network so the auxiliary loss of the same forward is added without a custom iteration.
    """

    def __init__(self, loss: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self._network = [network]  # a list, so the network is not registered as a submodule

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = self.loss(pred, target) if pred.shape[0] else pred.sum() * 0.0
        aux = auxiliary_loss(self._network[0])
        return value if aux is None else value + aux.to(value.dtype)
