"""What a training step computes: its batches and its loss. One loop (loop.py) runs them all.

A task has `next_batch()`, `loss(model, batch) -> (loss, metrics)`, `evaluate(model) -> dict`,
and `state_dict()` / `load_state_dict()` for exact resume.

- pretrain: next-token cross entropy on token shards; for DeepSeek models optionally the
  multi-token prediction loss (V3 §2.2) and the sequence-wise balance loss (V3 eq. 17-20), which
  the run's Balancer (balance.py) records in the forward.
- sft: chat JSONL (OpenAI `messages`), rendered with the model's own template; loss on the
  assistant tokens only (the mask comes from the same rendering as the ids); length bucketing.
- dpo and grpo: in preference.py and grpo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouvert.chat import ChatError, render_with_mask
from ouvert.data import DataError, TokenLoader, read_manifest
from ouvert.train.balance import Balancer
from ouvert.train.distributed import Dist, all_reduce_mean


def pretrain_loss(
    model: nn.Module, x: Tensor, y: Tensor, mtp_weight: float = 0.0, balancer: Balancer | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """x, y (B, T): inputs and next tokens. Returns the loss to minimise and detached metrics.
    With a balancer, its sequence-wise balance loss of this forward is added (when it has one)."""
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
    balance = balancer.loss() if balancer is not None else None
    if balance is not None:
        loss = loss + balance
        metrics["balance_loss"] = balance.detach()
    return loss, metrics


def token_logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t: (B, T-1), float32."""
    logits = model(ids[:, :-1]).float()
    return torch.gather(logits.log_softmax(dim=-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


class PretrainTask:
    """Next-token prediction on the token shards of `ouvert data prepare`."""

    def __init__(self, c, d: Dist, balancer: Balancer | None = None):
        self.c, self.d, self.balancer = c, d, balancer
        self.loader = TokenLoader(c.data, "train", c.seq_len, c.batch_size, d.rank, d.world_size, seed=c.seed)

    def next_batch(self) -> dict[str, Tensor]:
        x, y = self.loader.next()
        return {"x": x, "y": y}

    def loss(self, model, batch):
        return pretrain_loss(model, batch["x"], batch["y"], self.c.mtp_weight, self.balancer)

    def tokens(self, batch) -> int:
        return batch["x"].numel()

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean loss over the first eval_steps batches of the val split (train if none)."""
        c, d = self.c, self.d
        split = "val" if read_manifest(c.data)["val"] else "train"
        loader = TokenLoader(c.data, split, c.seq_len, c.batch_size, d.rank, d.world_size, seed=0, shuffle=False)
        n = min(c.eval_steps, len(loader.index) // (c.batch_size * d.world_size))
        total = torch.zeros(())
        for _ in range(n):
            x, y = loader.next()
            loss, _ = pretrain_loss(model, x.to(d.device), y.to(d.device))
            total += loss.float().cpu()
        return {"val_loss": all_reduce_mean(total / max(n, 1), d).item()}

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.loader.load_state_dict(s)


def read_jsonl(path: str | Path, parse, problems: list[str]) -> list:
    """parse(record) for each line; a line that fails is reported as FILE:LINE and skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: not JSON ({e.msg})")
            except (ChatError, DataError, KeyError, TypeError, ValueError) as e:
                problems.append(f"{path}:{lineno}: {e}")
    if not out:
        raise DataError(f"{path}: no usable line" + (f" ({problems[-1]})" if problems else ""))
    return out


class Batcher:
    """Seeded, resumable batches of examples, bucketed by length (each bucket spans 16 batches,
    so padding stays small); rank r takes rows [r*B, (r+1)*B) of every global batch."""

    def __init__(self, lengths: list[int], batch_size: int, rank: int, world_size: int, seed: int):
        self.lengths, self.B, self.rank, self.world = np.asarray(lengths), batch_size, rank, world_size
        self.seed, self.epoch, self.pos = seed, 0, 0
        if len(lengths) < batch_size * world_size:
            raise DataError(f"{len(lengths)} examples, fewer than one global batch ({batch_size} x {world_size})")
        self._batches = self._plan()

    def _plan(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths))
        g = self.B * self.world
        chunk = g * 16
        batches = []
        for i in range(0, len(order) - g + 1, chunk):
            part = order[i : i + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[j : j + g] for j in range(0, len(part) - g + 1, g)]
        rng.shuffle(batches)
        return batches

    def next(self) -> np.ndarray:
        if self.pos >= len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._batches = self._plan()
        rows = self._batches[self.pos][self.rank * self.B : (self.rank + 1) * self.B]
        self.pos += 1
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos, self.seed = s["epoch"], s["pos"], s["seed"]
        self._batches = self._plan()


def pad_right(seqs: list[list[int]], value: int) -> Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs], dtype=torch.long)


class SFTTask:
    """Supervised fine-tuning on chat JSONL: {"messages": [{"role": ..., "content": ...}, ...]}."""

    def __init__(self, c, d, tokenizer):
        self.c, self.d, self.tok = c, d, tokenizer
        self.problems: list[str] = []
        self.train = self._load(c.data)
        self.val = self._load(c.val_data) if c.val_data else None
        self.batcher = Batcher([len(ids) for ids, _ in self.train], c.batch_size, d.rank, d.world_size, c.seed)

    def _load(self, path) -> list[tuple[list[int], list[int]]]:
        L = self.c.seq_len + 1

        def parse(rec):
            if not isinstance(rec, dict) or "messages" not in rec:
                raise DataError("no 'messages' field")
            ids, mask = render_with_mask(self.tok, rec["messages"])
            return ids[:L], mask[:L]

        return read_jsonl(path, parse, self.problems)

    def _collate(self, examples) -> dict[str, Tensor]:
        ids = pad_right([e[0] for e in examples], self.tok.pad_token_id or 0)
        mask = pad_right([e[1] for e in examples], 0)
        return {"x": ids[:, :-1], "y": ids[:, 1:], "mask": mask[:, 1:].float()}

    def next_batch(self):
        return self._collate([self.train[i] for i in self.batcher.next()])

    def loss(self, model, batch):
        logits = model(batch["x"]).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["y"].reshape(-1), reduction="none")
        m = batch["mask"].reshape(-1)
        loss = (ce * m).sum() / m.sum().clamp(min=1)
        return loss, {"lm_loss": loss.detach()}

    def tokens(self, batch) -> int:
        return int(batch["mask"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        data = self.val or self.train
        n = min(len(data), self.c.eval_steps * self.c.batch_size)
        total, count = 0.0, 0.0
        for i in range(0, n, self.c.batch_size):
            b = self._collate(data[i : i + self.c.batch_size])
            logits = model(b["x"]).float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["y"].reshape(-1), reduction="none")
            total += float((ce * b["mask"].reshape(-1)).sum())
            count += float(b["mask"].sum())
        return {"val_loss": total / max(count, 1.0)}

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.batcher.load_state_dict(s)
