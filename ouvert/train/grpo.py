"""GRPO (DeepSeekMath, arXiv:2402.03300 §4): reinforcement learning with rewards a program checks.

For each prompt, sample a group of G completions from the current policy, score each with the
reward functions, and use the group-normalised reward A_i = (r_i - mean r) / (std r + eps) as the
advantage of every token of completion i. The objective, per token, is the clipped policy ratio
(PPO) minus beta times the KL estimator against the frozen reference,

    min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) - beta * (ref/pi - log(ref/pi) - 1),

with rho = pi / pi_old, averaged over each completion's tokens, then over the group. The rollouts
of a batch serve `grpo_updates` optimizer steps (pi_old is the policy that sampled them).

Where ouvert departs from the paper: the reward is the sum of the registered reward functions
(no reward model), std is the group's population std (ddof 0), and a group whose rewards are all
equal contributes zero advantage (nothing to learn from it) rather than being resampled.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ouvert.data import DataError
from ouvert.generate import SamplingParams, generate
from ouvert.train.lora import lora_modules
from ouvert.train.objectives import read_jsonl, token_logprobs
from ouvert.train.preference import adapters_off

# name -> reward(completion_text, example) -> float. Register your own with @reward("name").
REWARDS: dict[str, Callable[[str, dict], float]] = {}


def reward(name: str):
    def register(fn):
        REWARDS[name] = fn
        return fn

    return register


_NUMBER = re.compile(r"-?\d+")


@reward("exact_answer")
def exact_answer(text: str, example: dict) -> float:
    """1 when the first number in the completion equals the example's answer."""
    m = _NUMBER.search(text)
    return float(m is not None and m.group() == str(example["answer"]).strip())


@reward("digit_match")
def digit_match(text: str, example: dict) -> float:
    """Partial credit up to 0.5: the fraction of digit positions where the completion's first number
    agrees with the answer, over the longer of the two. Denser than exact_answer, so a group whose
    completions are all wrong still ranks them (one digit off beats all digits off). Positions count
    from the left: the answer's first digit should be the one the model writes first."""
    m = _NUMBER.search(text)
    if m is None:
        return 0.0
    got, want = m.group(), str(example["answer"]).strip()
    return 0.5 * sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


@reward("format")
def answer_format(text: str, example: dict) -> float:
    """0.1 when the completion is just a number (the fixed answer format)."""
    return 0.1 if re.fullmatch(r"\s*-?\d+\s*", text) else 0.0


# Common function words (and number words) of each language: a reply is French when it holds more of
# French's than of English's. Crude, but it is a program, so GRPO's reward cannot be argued with.
_FRENCH = set("""le la les l un une des du de d au aux et est sont font fait c ce cette ces il elle ils elles
je j tu vous nous on ne pas plus que qui quoi dans sur avec pour par mais ou donc où y a ai avez sommes
mon ma mes ton son sa ses leur notre votre très bien oui non merci bonjour être avoir zéro deux trois quatre
cinq six sept huit neuf dix onze douze vingt cent après vient comme aussi tout tous""".split())
_ENGLISH = set("""the a an and is are was were it its this that these those i you he she we they not no yes
of to in on at for with by from but or so what which who how my your his her our their very well thank
hello be have has do does can will would zero one two three four five six seven eight nine ten eleven twelve
twenty hundred after comes as also all""".split())
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def looks_french(text: str) -> bool:
    """True when the text holds more French function words than English ones (and at least one)."""
    words = [w.lower() for w in _WORD.findall(text)]
    fr, en = sum(w in _FRENCH for w in words), sum(w in _ENGLISH for w in words)
    return fr > en


@reward("french")
def french(text: str, example: dict) -> float:
    """1 when the completion is in French (looks_french)."""
    return float(looks_french(text))


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """rewards (n_prompts, G) -> (r - mean) / (std + eps) within each group."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_token_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, adv: Tensor, mask: Tensor,
                    clip_eps: float, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective (negated, to minimise). logp, old_logp, ref_logp, mask (N, T); adv (N,)."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    log_r = ref_logp - logp
    kl = torch.exp(log_r) - log_r - 1  # k3: unbiased, always >= 0
    per_token = surrogate - beta * kl
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = -per_seq.mean()
    n = mask.sum().clamp(min=1)
    clipped = ((ratio - ratio.clamp(1 - clip_eps, 1 + clip_eps)).abs() > 0).float()
    return loss, {"kl": (kl * mask).sum() / n, "clip_fraction": (clipped * mask).sum() / n}


class GRPOTask:
    """Prompts JSONL: {"prompt": str, "answer": ...}; rewards chosen by name in the config."""

    def __init__(self, c, d, tokenizer, model: nn.Module):
        if d.world_size > 1:
            raise ValueError("grpo runs in one process for now (rollouts are not sharded across ranks)")
        self.c, self.tok, self.policy = c, tokenizer, model
        names = [n.strip() for n in c.rewards.split(",") if n.strip()]
        unknown = [n for n in names if n not in REWARDS]
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; registered: {sorted(REWARDS)}")
        self.rewards = [REWARDS[n] for n in names]
        self.problems: list[str] = []

        def parse(rec):
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                raise DataError("no 'prompt' string")
            return rec

        self.train = read_jsonl(c.data, parse, self.problems)
        self.val = read_jsonl(c.val_data, parse, self.problems) if c.val_data else None
        self.ref = None if lora_modules(model) else copy.deepcopy(model).eval().requires_grad_(False)
        self.rollout_index, self.epoch, self.round = 0, 0, 0
        self.buffer: dict | None = None
        self.uses = 0

    def prompt_ids(self, ex: dict) -> list[int]:
        if self.tok.chat_template:
            return self.tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}],
                                                add_generation_prompt=True, tokenize=True)
        return self.tok.encode(ex["prompt"])

    def _examples(self) -> list[dict]:
        n = self.c.batch_size
        g = torch.Generator().manual_seed(self.c.seed + self.epoch)
        order = torch.randperm(len(self.train), generator=g).tolist()
        if self.rollout_index + n > len(order):
            self.epoch, self.rollout_index = self.epoch + 1, 0
            return self._examples()
        ex = [self.train[i] for i in order[self.rollout_index : self.rollout_index + n]]
        self.rollout_index += n
        return ex

    def score(self, text: str, ex: dict) -> float:
        return sum(fn(text, ex) for fn in self.rewards)

    @torch.no_grad()
    def rollout(self) -> dict:
        c, G = self.c, self.c.group_size
        examples = self._examples()
        prompts = [self.prompt_ids(ex) for ex in examples for _ in range(G)]
        was_training = self.policy.training
        self.policy.eval()
        params = SamplingParams(temperature=c.rollout_temperature, seed=c.seed * 100_003 + self.round,
                                stop_token_ids=self.tok.stop_token_ids)
        outs = generate(self.policy, prompts, c.max_new_tokens, params)
        self.policy.train(was_training)
        self.round += 1
        texts = [self.tok.decode(o, skip_special_tokens=True) for o in outs]
        r = torch.tensor([self.score(t, examples[i // G]) for i, t in enumerate(texts)]).view(len(examples), G)
        adv = group_advantages(r).view(-1)
        seqs = [p + o for p, o in zip(prompts, outs)]
        pad = self.tok.pad_token_id or 0
        T = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
        mask = torch.zeros(len(seqs), T - 1)
        for i, (p, o) in enumerate(zip(prompts, outs)):
            mask[i, len(p) - 1 : len(p) - 1 + len(o)] = 1  # predictions of the completion's tokens
        old = token_logprobs(self.policy, ids)
        if self.ref is not None:
            ref = token_logprobs(self.ref, ids)
        else:
            with adapters_off(self.policy):
                ref = token_logprobs(self.policy, ids)
        return {"ids": ids, "mask": mask, "adv": adv, "old": old, "ref": ref, "reward": r,
                "length": torch.tensor([len(o) for o in outs], dtype=torch.float)}

    def next_batch(self):
        if self.buffer is None or self.uses >= self.c.grpo_updates:
            self.buffer, self.uses = self.rollout(), 0
        self.uses += 1
        return self.buffer

    def loss(self, model, batch):
        logp = token_logprobs(model, batch["ids"])
        loss, m = grpo_token_loss(logp, batch["old"], batch["ref"], batch["adv"], batch["mask"],
                                  self.c.clip_eps, self.c.beta)
        r = batch["reward"]
        m.update({"lm_loss": loss.detach(), "reward_mean": r.mean(), "reward_std": r.std(dim=1).mean(),
                  "completion_length": batch["length"].mean()})
        return loss, {k: v.detach() for k, v in m.items()}

    def tokens(self, batch) -> int:
        return int(batch["mask"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Greedy replies to the held-out prompts: exact-answer accuracy when the task has answers to
        check, else the mean reward."""
        examples = self.val or self.train
        if exact_answer in self.rewards:
            return {"val_accuracy": accuracy(model, self.tok, examples, self.c.max_new_tokens, self.prompt_ids)}
        return {"val_reward": accuracy(model, self.tok, examples, self.c.max_new_tokens, self.prompt_ids,
                                       score=self.score)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.rollout_index, "round": self.round}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.rollout_index, self.round = s["epoch"], s["index"], s["round"]
        self.buffer, self.uses = None, 0


@torch.no_grad()
def accuracy(model, tok, examples: list[dict], max_new_tokens: int, prompt_ids, batch: int = 64,
             score: Callable[[str, dict], float] = exact_answer) -> float:
    """The mean score of greedy completions (default: exact-answer accuracy on {"prompt", "answer"})."""
    was = model.training
    model.eval()
    right = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        outs = generate(model, [prompt_ids(e) for e in chunk], max_new_tokens,
                        SamplingParams(stop_token_ids=tok.stop_token_ids))
        right += sum(score(tok.decode(o, skip_special_tokens=True), e) for o, e in zip(outs, chunk))
    model.train(was)
    return right / len(examples)
