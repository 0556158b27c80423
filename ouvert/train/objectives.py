"""What a training step computes: the batch and the loss. One loop (loop.py) serves them all.

pretrain: next-token cross entropy; for DeepSeek models optionally the multi-token prediction
loss (V3 §2.2: depth k predicts token i+1+k from the trunk's hidden state and token i+k, weighted
by mtp_weight and averaged over depths) and the sequence-wise balance loss (V3 eq. 17-20), while
the auxiliary-loss-free balancing of the router bias happens after the optimizer step
(`update_router_bias`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouvert.model import MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def pretrain_loss(
    model: nn.Module, x: Tensor, y: Tensor, mtp_weight: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """x, y (B, T): inputs and next tokens. Returns the loss to minimise and detached metrics."""
    use_mtp = mtp_weight > 0
    out = model(x, next_tokens=y if use_mtp else None)
    logits, mtp_logits = (out if use_mtp else (out, []))
    V = logits.shape[-1]
    lm = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
    loss, metrics = lm, {"lm_loss": lm.detach()}
    if mtp_logits:
        # depth k (0-based) at position i predicts token i+2+k = y[:, i+1+k]; the last k+1 positions have none
        losses = []
        for k, lg in enumerate(mtp_logits):
            T = y.shape[1] - (k + 1)
            losses.append(F.cross_entropy(lg[:, :T].float().reshape(-1, V), y[:, k + 1 :].reshape(-1)))
        mtp = torch.stack(losses).mean()
        loss = loss + mtp_weight * mtp
        metrics["mtp_loss"] = mtp.detach()
    aux = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    if aux:
        balance = torch.stack(aux).sum()
        loss = loss + balance
        metrics["balance_loss"] = balance.detach()
    return loss, metrics


@torch.no_grad()
def update_router_bias(layers: list[MoE], counts: list[Tensor], rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): after each step, raise the routing
    bias of under-loaded experts and lower it for over-loaded ones by `rate`, by the sign of
    each expert's load error. `counts` are tokens per expert summed over the step (all ranks)."""
    for m, c in zip(layers, counts):
        c = c.float()
        m.gate.e_score_correction_bias += rate * torch.sign(c.mean() - c)
