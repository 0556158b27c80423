"""The objectives by name: `make_task` builds the task a TrainConfig's `objective` names.

A task has `next_batch()`, `loss(model, batch) -> (loss, metrics)`, `tokens(batch)`,
`evaluate(model) -> dict` and `state_dict()` / `load_state_dict()` for exact resume:

- pretrain and sft: objectives.py
- dpo: preference.py
- grpo: grpo.py
"""

from __future__ import annotations

from torch import nn

from ouvert.train.balance import Balancer
from ouvert.train.config import TrainConfig
from ouvert.train.distributed import Dist
from ouvert.train.grpo import GRPOTask
from ouvert.train.objectives import PretrainTask, SFTTask
from ouvert.train.preference import DPOTask


def make_task(c: TrainConfig, d: Dist, tokenizer, model: nn.Module, balancer: Balancer | None = None):
    """The task for c.objective. Pretraining adds the balancer's sequence-wise balance loss;
    DPO and GRPO keep `model` as the policy (and a frozen copy of it as the reference)."""
    if c.objective == "pretrain":
        return PretrainTask(c, d, balancer)
    if c.objective == "sft":
        return SFTTask(c, d, tokenizer)
    if c.objective == "dpo":
        return DPOTask(c, d, tokenizer, model)
    if c.objective == "grpo":
        return GRPOTask(c, d, tokenizer, model)
    raise ValueError(f"objective must be pretrain, sft, dpo or grpo, got {c.objective!r}")
