"""Speculative decoding: greedy output against plain greedy (MTP self-speculation and a draft
model), the acceptance rule's output distribution against the target's, the MTP module run
incrementally against its full-sequence twin, and cache rollback against never writing.

Tolerances: 1e-4 max abs on logits (values of a few units, float32) between cached paths; the
rule's empirical frequencies within 0.01 of p over 50k trials (the standard error of a frequency
is at most sqrt(0.25 / 50k) = 0.0022, so 0.01 is 4.5 of them; the wrong rule tested misses by > 0.05).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model, perturb

import ouvert
from ouvert.generate.cache import Cache
from ouvert.generate.decode import prefill
from ouvert.generate.sampling import SamplingParams
from ouvert.generate.speculative import MTPDraft, accept_drafts, speculative_generate

ATOL = 1e-4
N = 32  # new tokens per comparison with plain greedy


def _prompt(vocab: int, n: int, seed: int = 3) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A random DeepSeek-V3-shaped checkpoint with one MTP module (MLA with q_lora, MoE with
    group-limited sigmoid routing, interleaved rotary), saved and loaded in the HF layout."""
    cfg = ouvert.preset("tiny-deepseek")
    model = ouvert.Transformer(cfg)
    model.init_weights(std=0.25, generator=torch.Generator().manual_seed(0))  # 0.02 gives flat logits
    perturb(model)
    d = tmp_path_factory.mktemp("deepseek_mtp")
    ouvert.save_model(model, d)
    model = ouvert.load_model(d)
    assert len(model.mtp) == 1
    return model


@pytest.fixture(scope="module")
def llamas(tiny_ckpt, tmp_path_factory):
    """(target, draft): the conftest tiny Llama (2 layers, 64 wide) and a different, smaller
    Llama (1 layer, 32 wide, another seed) over the same 300-token vocabulary."""
    d = tmp_path_factory.mktemp("draft")
    make_hf_model(
        "llama", seed=1, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ).save_pretrained(d)
    return ouvert.load_model(tiny_ckpt[0]), ouvert.load_model(d)


# ---- greedy: token for token what plain greedy decoding gives -------------------------------------


@pytest.mark.parametrize("n_prompt", [1, 40])
def test_mtp_greedy_equals_plain_greedy(deepseek, n_prompt):
    p = _prompt(512, n_prompt)
    with torch.no_grad():
        logits = deepseek(torch.tensor([p]))
    assert logits.std() > 1.0, "logits too flat: greedy would be decided by rounding noise"
    ref = ouvert.generate(deepseek, p, N, SamplingParams(stop_token_ids=[]))[0]
    out = speculative_generate(deepseek, p, N, "mtp", SamplingParams(stop_token_ids=[]))
    assert out.tokens == ref
    assert out.drafted == out.target_forwards - 1  # one draft per verifying forward
    # each forward makes one token of its own plus those it accepted; the last may overshoot N by one
    assert N <= out.target_forwards + out.accepted <= N + 1


def test_mtp_accepted_drafts_keep_greedy(deepseek, monkeypatch):
    """Random MTP weights draft almost nothing right, so the accepting path (two tokens a step,
    the MTP cache advanced by two) is forced: every other draft is replaced by the right token."""
    p = _prompt(512, 12)
    ref = ouvert.generate(deepseek, p, N, SamplingParams(stop_token_ids=[]))[0]
    propose, calls = MTPDraft.propose, [0]

    def oracle(self, seq, params, generator):
        drafts, q = propose(self, seq, params, generator)
        calls[0] += 1
        i = len(seq) - len(p)  # index in ref of the token after seq
        if calls[0] % 2 and i < len(ref):
            drafts = [ref[i]]
        return drafts, q

    monkeypatch.setattr(MTPDraft, "propose", oracle)
    out = speculative_generate(deepseek, p, N, "mtp", SamplingParams(stop_token_ids=[]))
    assert out.tokens == ref
    assert out.acceptance_rate >= 0.45 and out.tokens_per_forward > 1.3


@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_model_greedy_equals_plain_greedy(llamas, k):
    target, draft = llamas
    p = _prompt(300, 9)
    ref = ouvert.generate(target, p, N, SamplingParams(stop_token_ids=[]))[0]
    out = speculative_generate(target, p, N, draft, SamplingParams(stop_token_ids=[]), k=k)
    assert out.tokens == ref
    assert out.drafted == k * (out.target_forwards - 1)
    assert 0 <= out.acceptance_rate < 1  # a different model: some drafts are rejected


@pytest.mark.parametrize("k", [1, 4])
def test_target_as_its_own_draft_accepts_everything(llamas, k):
    target, _ = llamas
    p = _prompt(300, 9)
    ref = ouvert.generate(target, p, N, SamplingParams(stop_token_ids=[]))[0]
    out = speculative_generate(target, p, N, target, SamplingParams(stop_token_ids=[]), k=k)
    assert out.tokens == ref
    assert out.acceptance_rate == 1.0
    # the prefill makes one token, each verify k + 1
    assert out.target_forwards == 1 + -(-(N - 1) // (k + 1))
    # sampling too: p == q up to rounding, so every draft is accepted
    out = speculative_generate(target, p, N, target, SamplingParams(temperature=1.0, seed=0, stop_token_ids=[]),
                               k=k)
    assert out.acceptance_rate == 1.0 and len(out.tokens) == N


def test_stop_token_ends_generation(llamas):
    target, draft = llamas
    p = _prompt(300, 9)
    free = ouvert.generate(target, p, N, SamplingParams(stop_token_ids=[]))[0]
    stop = free[7]
    ref = ouvert.generate(target, p, N, SamplingParams(stop_token_ids=[stop]))[0]
    assert speculative_generate(target, p, N, draft, SamplingParams(stop_token_ids=[stop]), k=4).tokens == ref
    assert speculative_generate(target, p, N, target, SamplingParams(stop_token_ids=[stop]), k=4).tokens == ref


def test_sampling_path(llamas):
    """top_k=1 makes every distribution one-hot: the sampling path (filtered probabilities,
    rejections, residuals) must then give greedy's tokens. And a seed fixes the output."""
    target, draft = llamas
    p = _prompt(300, 9)
    ref = ouvert.generate(target, p, N, SamplingParams(stop_token_ids=[]))[0]
    top1 = SamplingParams(temperature=0.8, top_k=1, seed=1, stop_token_ids=[])
    out = speculative_generate(target, p, N, draft, top1, k=3)
    assert out.tokens == ref
    a, b, c = (speculative_generate(target, p, N, draft, SamplingParams(temperature=1.0, seed=s, stop_token_ids=[]),
                                    k=3).tokens for s in (5, 5, 6))
    assert a == b and a != c and len(a) == N


def test_refusals(llamas, deepseek):
    target, _ = llamas
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, [5, 6], 4, deepseek)
    with pytest.raises(ValueError, match="no MTP module"):
        speculative_generate(target, [5, 6], 4, "mtp")
    with pytest.raises(ValueError, match="one prompt"):
        speculative_generate(target, [[5, 6]], 4, target)


# ---- the acceptance rule --------------------------------------------------------------------------

P = torch.tensor([[0.40, 0.25, 0.20, 0.10, 0.05], [0.05, 0.10, 0.15, 0.30, 0.40], [0.2, 0.2, 0.2, 0.2, 0.2]])
Q = torch.tensor([[0.10, 0.20, 0.20, 0.30, 0.20], [0.30, 0.30, 0.20, 0.10, 0.10]])
TRIALS, TOL = 50_000, 0.01


def _freq(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=5).float() / max(len(tokens), 1)


def _run(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(Q[i], TRIALS, replacement=True, generator=g) for i in range(k)], 1)
    p, q = P[[*range(k), 2]].expand(TRIALS, k + 1, 5), Q[:k].expand(TRIALS, k, 5)
    return drafts, *accept_drafts(p, q, drafts, g)


def test_acceptance_rule_gives_the_target_distribution():
    # k = 1: the emitted token is the draft if accepted, else the residual draw
    drafts, n, nxt = _run(1)
    first = torch.where(n >= 1, drafts[:, 0], nxt)
    assert (_freq(first) - P[0]).abs().max() < TOL
    # the acceptance rate is sum_x min(p, q) (Leviathan et al., Theorem 3.5)
    assert abs(n.float().mean() - torch.minimum(P[0], Q[0]).sum()) < TOL
    # k = 2: the second token (when the first was accepted) follows P[1]; the bonus follows P[2]
    drafts, n, nxt = _run(2, seed=1)
    assert (_freq(torch.where(n >= 1, drafts[:, 0], nxt)) - P[0]).abs().max() < TOL
    second = torch.where(n >= 2, drafts[:, 1], nxt)[n >= 1]
    assert (_freq(second) - P[1]).abs().max() < TOL * 1.5  # ~0.6 of the trials
    bonus = nxt[n == 2]
    assert len(bonus) > 5000 and (_freq(bonus) - P[2]).abs().max() < 0.025  # ~7k trials: se <= 0.006


def test_the_check_catches_a_wrong_rule():
    """Redrawing from p (not from the residual max(0, p - q)) after a rejection biases the output
    toward the tokens q favours: the same check must see it."""
    drafts, n, _ = _run(1)
    redraw = torch.multinomial(P[0], TRIALS, replacement=True, generator=torch.Generator().manual_seed(9))
    wrong = torch.where(n >= 1, drafts[:, 0], redraw)
    assert (_freq(wrong) - P[0]).abs().max() > 5 * TOL


# ---- caches: rollback, and the MTP module run incrementally -----------------------------------------


@pytest.mark.parametrize("which", ["llama", "deepseek"])
def test_rollback_equals_never_writing(llamas, deepseek, which):
    """Write 3 tokens, roll them back, write 2 others: the logits equal a cache that never saw the 3."""
    model = llamas[0] if which == "llama" else deepseek
    V = model.config.vocab_size
    p, rejected, kept = _prompt(V, 10), _prompt(V, 3, seed=4), _prompt(V, 2, seed=5)
    mask = torch.ones(1, len(p), dtype=torch.bool)
    a, b = Cache(model, 1, 20), Cache(model, 1, 20)
    with torch.no_grad():
        prefill(model, torch.tensor([p]), mask, a)
        model(torch.tensor([rejected]), None, a)
        a.rollback(3)
        got = model(torch.tensor([kept]), None, a)
        prefill(model, torch.tensor([p]), mask, b)
        want = model(torch.tensor([kept]), None, b)
        full = model(torch.tensor([p + kept]))[:, -2:]
    assert a.start == b.start == 12
    assert (got - want).abs().max().item() < ATOL
    assert (got - full).abs().max().item() < ATOL
    with pytest.raises(ValueError, match="roll back"):
        a.rollback(13)


def test_incremental_mtp_equals_full_sequence(deepseek):
    """The MTP module over its own cache, fed in chunks with a rollback between, gives the logits
    of mtp_logits over the whole sequence at once."""
    x = torch.tensor([_prompt(512, 25, seed=6)])
    tokens, nxt = x[:, :-1], x[:, 1:]
    with torch.no_grad():
        _, hidden = deepseek(tokens, return_hidden=True)
        (full,) = deepseek.mtp_logits(hidden, nxt)
        cache = Cache(deepseek, 1, 24, mtp=True)
        assert len(cache.layers) == 1 and cache.first_layer == deepseek.config.num_hidden_layers
        parts, start = [], 0
        for size in (10, 1, 2, 1, 4, 6):
            if size == 2:  # a step with a wrong next token, then rolled back and redone
                deepseek.mtp_logits(hidden[:, start : start + 2], torch.flip(nxt[:, start : start + 2], [1]),
                                    cache=cache)
                cache.rollback(2)
            parts += deepseek.mtp_logits(hidden[:, start : start + size], nxt[:, start : start + size], cache=cache)
            start += size
    assert start == 24 and cache.start == 24
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < ATOL


def test_mtp_sampling_path(deepseek):
    """The MTP drafter's sampling path, made deterministic by top_k=1: greedy's tokens again."""
    p = _prompt(512, 12)
    ref = ouvert.generate(deepseek, p, N, SamplingParams(stop_token_ids=[]))[0]
    out = speculative_generate(deepseek, p, N, "mtp",
                               SamplingParams(temperature=0.7, top_k=1, seed=0, stop_token_ids=[]))
    assert out.tokens == ref


def test_cli_speculative(corpus_tokenizer, tmp_path, capsys):
    from ouvert.cli import main

    d = tmp_path / "m"
    assert main(["init", "--preset", "tiny-deepseek", "--tokenizer", str(corpus_tokenizer), "--out", str(d),
                 "--init-std", "0.25"]) == 0
    capsys.readouterr()
    args = ["generate", "--model", str(d), "--max-new-tokens", "12", "--temperature", "0", "To be"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main([*args, "--speculative", "mtp"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out and "12 new" in spec.err and "of drafts accepted" in spec.err
    assert main([*args, "--speculative", str(d), "--draft-k", "3"]) == 0  # the model as its own draft
    own = capsys.readouterr()
    assert own.out == plain.out and "100% of drafts accepted" in own.err
