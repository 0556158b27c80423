"""DeepSeek-V3's expert load balancing while training, held in one place: the `Balancer`.

It watches every MoE layer of a model through forward hooks (the model holds no training state)
and keeps what each layer's last forward did: the tokens each routed expert got, and, when
`seq_alpha` > 0, the sequence-wise balance loss (V3 eq. 17-20). The objective asks it for that
loss (`loss`); the loop adds up the counts of a step's micro-batches (`tally`), moves the routing
bias after the optimizer step (`update_router_bias`, auxiliary-loss-free balancing, V3 §2.1.2),
and logs how uneven the load is (`load_max_over_mean`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ouvert.model import MoE, Router
from ouvert.train.distributed import Dist, all_reduce_sum


def sequence_balance_loss(gate: Router, x: Tensor, idx: Tensor, alpha: float) -> Tensor:
    """DeepSeek-V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch, where
    f_i is expert i's share of the sequence's choices (scaled so uniform is 1) and P_i its mean
    normalised affinity. x (B, T, D), idx (B, T, k) the experts the router chose."""
    B, T, _ = x.shape
    E, k = gate.weight.shape[0], idx.shape[-1]
    logits = gate.logits(x)  # (B, T, E)
    s = gate.scores(logits)
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    ones = torch.ones(B, T * k, device=x.device)
    chosen = torch.zeros(B, E, device=x.device).scatter_add_(1, idx.reshape(B, -1), ones)
    f = chosen * E / (k * T)  # (B, E); counts carry no gradient, P does
    return alpha * (f * p).sum(dim=-1).mean()


class Balancer:
    """The balancing statistics of a model's MoE layers, recorded by forward hooks.

    Per layer, after each forward: `counts[i]`, tokens per expert (E,), and `losses[i]`, the
    sequence-wise balance loss of a training forward on (B, T, D) input (None otherwise, and None
    again once `loss` has handed it out). A layer that did not run keeps its earlier counts (an MTP
    module's MoE runs only with the MTP loss on).
    Copies of the model (DPO's and GRPO's frozen reference) carry the hooks but are not watched:
    a hook only records the modules it was put on.
    """

    def __init__(self, model: nn.Module, seq_alpha: float = 0.0):
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        self.seq_alpha = seq_alpha
        self.counts: list[Tensor | None] = [None] * len(self.layers)
        self.losses: list[Tensor | None] = [None] * len(self.layers)
        self.step_counts: list[Tensor] = []
        self._input_shapes: list[torch.Size | None] = [None] * len(self.layers)
        self._handles = []
        for i, m in enumerate(self.layers):
            self._handles.append(m.register_forward_pre_hook(self._input_hook(i, m)))
            self._handles.append(m.experts.register_forward_hook(self._experts_hook(i, m)))

    def _input_hook(self, i: int, moe: MoE):
        def hook(module: nn.Module, args: tuple) -> None:
            if module is moe:
                self._input_shapes[i] = args[0].shape

        return hook

    def _experts_hook(self, i: int, moe: MoE):
        # Experts.forward(x (N, D), expert_idx (N, k), weight) -> (y, counts). The loss is built
        # here, between the routed and the shared experts, where the MoE's forward once built it,
        # so that autograd sums the input's gradients in the same order.
        def hook(module: nn.Module, args: tuple, out: tuple[Tensor, Tensor]) -> None:
            if module is not moe.experts:
                return
            x, idx = args[0], args[1]
            shape = self._input_shapes[i]
            self.counts[i] = out[1]
            self.losses[i] = None
            if moe.training and self.seq_alpha > 0 and len(shape) == 3:
                self.losses[i] = sequence_balance_loss(moe.gate, x.view(shape), idx.view(*shape[:2], -1),
                                                       self.seq_alpha)

        return hook

    def loss(self) -> Tensor | None:
        """The sum over layers of the last forward's sequence-wise balance losses; None if none.
        Each is handed out once: a layer that does not run in the next forward adds nothing to its
        loss (rather than a loss whose graph has been through backward already)."""
        losses = [loss for loss in self.losses if loss is not None]
        self.losses = [None] * len(self.layers)
        return torch.stack(losses).sum() if losses else None

    def start_step(self) -> None:
        """Zero the step's per-expert token counts (V3's routing bias layers only)."""
        self.step_counts = [torch.zeros_like(m.gate.e_score_correction_bias) for m in self.layers]

    def tally(self) -> None:
        """Add the last forward's counts to the step's, after each micro-batch."""
        for acc, c in zip(self.step_counts, self.counts):
            if c is not None:  # an MTP module's MoE only runs with the MTP loss on
                acc += c.to(acc.dtype)

    @torch.no_grad()
    def update_router_bias(self, rate: float, d: Dist) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): after each step, raise the routing
        bias of under-loaded experts and lower it for over-loaded ones by `rate`, by the sign of
        each expert's load error, the step's counts summed over all ranks."""
        for m, c in zip(self.layers, self.step_counts):
            c = all_reduce_sum(c, d).float()
            m.gate.e_score_correction_bias += rate * torch.sign(c.mean() - c)

    def load_max_over_mean(self) -> float:
        """The busiest expert's tokens over the mean, in the last forward, averaged over layers."""
        loads = [c.float() for c in self.counts if c is not None]
        return float(torch.stack([lc.max() / lc.mean() for lc in loads]).mean())

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
