"""DPO (arXiv:2305.18290): learn from preference pairs against a frozen reference.

loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with log-probabilities summed over the response tokens only. Data is JSONL with `prompt` (a
string, rendered as a user turn with the chat template when the tokenizer has one, or a list of
messages) and `chosen` / `rejected` responses. The reference is a frozen copy of the starting
model (with LoRA: the same model with adapters switched off, so no second copy is held).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouvert.chat import render_with_mask
from ouvert.data import DataError
from ouvert.train.lora import lora_modules
from ouvert.train.objectives import Batcher, pad_right, read_jsonl, token_logprobs


def render_pair(tok, prompt, response: str) -> tuple[list[int], list[int]]:
    """ids and the mask of the response tokens, through the chat template when there is one."""
    if tok.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return render_with_mask(tok, messages + [{"role": "assistant", "content": response}])
    p = tok.encode(prompt)
    r = tok.encode(response, add_special_tokens=False) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    return p + r, [0] * len(p) + [1] * len(r)


@contextmanager
def adapters_off(model: nn.Module):
    mods = list(lora_modules(model).values())
    for m in mods:
        m.merged = True  # `merged` makes LoRALinear skip its update: the base model alone
    try:
        yield
    finally:
        for m in mods:
            m.merged = False


def sequence_logprob(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Sum of log p over the masked (response) tokens: (B,)."""
    return (token_logprobs(model, ids) * mask[:, 1:]).sum(-1)


class DPOTask:
    def __init__(self, c, d, tokenizer, model: nn.Module):
        self.c, self.d, self.tok = c, d, tokenizer
        self.problems: list[str] = []
        self.train = self._load(c.data)
        self.val = self._load(c.val_data) if c.val_data else None
        self.batcher = Batcher([len(e[0]) + len(e[2]) for e in self.train], c.batch_size, d.rank, d.world_size, c.seed)
        self.ref = None
        if not lora_modules(model):
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.policy = model

    def _load(self, path):
        L = self.c.seq_len + 1

        def parse(rec):
            for k in ("prompt", "chosen", "rejected"):
                if k not in rec:
                    raise DataError(f"no {k!r} field")
            for k in ("chosen", "rejected"):
                if not isinstance(rec[k], str) or not rec[k].strip():
                    raise DataError(f"{k!r} is empty")
            c = render_pair(self.tok, rec["prompt"], rec["chosen"])
            r = render_pair(self.tok, rec["prompt"], rec["rejected"])
            return c[0][:L], c[1][:L], r[0][:L], r[1][:L]

        return read_jsonl(path, parse, self.problems)

    def _collate(self, ex) -> dict[str, Tensor]:
        pad = self.tok.pad_token_id or 0
        ids = pad_right([e[0] for e in ex] + [e[2] for e in ex], pad)
        mask = pad_right([e[1] for e in ex] + [e[3] for e in ex], 0).float()
        with torch.no_grad():
            if self.ref is not None:
                ref = sequence_logprob(self.ref, ids, mask)
            else:
                with adapters_off(self.policy):
                    ref = sequence_logprob(self.policy, ids, mask)
        return {"ids": ids, "mask": mask, "ref": ref}

    def next_batch(self):
        return self._collate([self.train[i] for i in self.batcher.next()])

    def loss(self, model, batch):
        lp = sequence_logprob(model, batch["ids"], batch["mask"])
        n = lp.shape[0] // 2
        margin = self.c.beta * ((lp[:n] - batch["ref"][:n]) - (lp[n:] - batch["ref"][n:]))
        loss = -F.logsigmoid(margin).mean()
        return loss, {"lm_loss": loss.detach(), "reward_margin": margin.detach().mean(),
                      "pref_accuracy": (margin > 0).float().mean().detach()}

    def tokens(self, batch) -> int:
        return int(batch["mask"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        data = self.val or self.train
        margins = []
        for i in range(0, min(len(data), self.c.eval_steps * self.c.batch_size), self.c.batch_size):
            b = self._collate(data[i : i + self.c.batch_size])
            _, m = self.loss(model, b)
            margins.append((m["reward_margin"].item(), m["pref_accuracy"].item()))
        return {"val_reward_margin": sum(a for a, _ in margins) / len(margins),
                "val_pref_accuracy": sum(b for _, b in margins) / len(margins)}

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.batcher.load_state_dict(s)
