"""Generation: token for token against transformers' greedy decoding, and the sampling controls."""

from __future__ import annotations

import pytest
import torch

import ouvert
from ouvert.generate.sampling import SamplingParams, filter_logits, sample


def _prompts(vocab: int, lengths=(5, 23, 61), seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy_batch(hf, prompts, n):
    """transformers' generate on the same prompts as one left-padded batch."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    att = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        att[i, T - len(p):] = 1
    out = hf.generate(input_ids=ids, attention_mask=att, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0)
    return out[:, T:].tolist()


@pytest.mark.parametrize("ckpt", ["smollm2_ckpt", "llama32_ckpt"])
def test_greedy_matches_transformers_batch(request, ckpt):
    d, hf = request.getfixturevalue(ckpt)
    model = ouvert.load_model(d)
    prompts = _prompts(model.config.vocab_size)
    ours = ouvert.generate(model, prompts, 32, SamplingParams(temperature=0.0, stop_token_ids=[]))
    theirs = _hf_greedy_batch(hf, prompts, 32)
    assert ours == theirs
    # and each prompt alone gives the same tokens as in the batch
    for p, o in zip(prompts, ours):
        assert ouvert.generate(model, p, 32, SamplingParams(stop_token_ids=[]))[0] == o


def test_stop_token_ends_row_and_is_kept(tiny_ckpt):
    d, _ = tiny_ckpt
    model = ouvert.load_model(d)
    prompts = _prompts(300, (4, 9))
    free = ouvert.generate(model, prompts, 20, SamplingParams(stop_token_ids=[]))
    stop = free[1][5]
    out = ouvert.generate(model, prompts, 20, SamplingParams(stop_token_ids=[stop]))
    assert out[1] == free[1][: free[1].index(stop) + 1]
    first = free[0].index(stop) + 1 if stop in free[0] else 20
    assert out[0] == free[0][:first]


def test_seeded_sampling_is_reproducible(tiny_ckpt):
    d, _ = tiny_ckpt
    model = ouvert.load_model(d)
    p = _prompts(300, (6,))
    a = ouvert.generate(model, p, 16, SamplingParams(temperature=1.0, top_p=0.9, seed=7, stop_token_ids=[]))
    b = ouvert.generate(model, p, 16, SamplingParams(temperature=1.0, top_p=0.9, seed=7, stop_token_ids=[]))
    c = ouvert.generate(model, p, 16, SamplingParams(temperature=1.0, top_p=0.9, seed=8, stop_token_ids=[]))
    assert a == b and a != c
    # top_k=1 sampling is greedy
    assert ouvert.generate(model, p, 16, SamplingParams(temperature=0.7, top_k=1, seed=1, stop_token_ids=[])) == \
        ouvert.generate(model, p, 16, SamplingParams(stop_token_ids=[]))


def test_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False, False]] and probs[0] < 0.8
    kept = ~torch.isinf(filter_logits(logits, min_p=0.2))  # keeps p >= 0.2 * 0.636
    assert kept.tolist() == [[True, True, False, False, False]]
    g = [torch.Generator().manual_seed(0)]
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), g).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_repetition_penalty_changes_choice(tiny_ckpt):
    d, _ = tiny_ckpt
    model = ouvert.load_model(d)
    p = _prompts(300, (8,))[0]
    plain = ouvert.generate(model, p, 24, SamplingParams(stop_token_ids=[]))[0]
    pen = ouvert.generate(model, p, 24, SamplingParams(repetition_penalty=50.0, stop_token_ids=[]))[0]
    assert len(set(pen)) == len(pen), "a strong penalty forbids repeats"
    assert not set(pen) & set(p)
    assert plain != pen


def test_stop_strings(tiny_ckpt, llama3_tokenizer_dir):
    d, _ = tiny_ckpt
    model = ouvert.load_model(d)
    tok = ouvert.load_tokenizer(llama3_tokenizer_dir)
    p = _prompts(300, (5,))[0]
    free = ouvert.generate(model, p, 20, SamplingParams(stop_token_ids=[]))[0]
    target = tok.decode(free[:6])[-2:]  # a string that surely appears once 6 tokens are out
    out = ouvert.generate(model, p, 20, SamplingParams(stop_token_ids=[], stop=[target]), tokenizer=tok)[0]
    assert target in tok.decode(out) and len(out) <= 6
    assert out == free[: len(out)]


def test_context_too_long_is_refused(tiny_ckpt):
    d, _ = tiny_ckpt
    model = ouvert.load_model(d)
    with pytest.raises(ValueError, match="context length 256"):
        ouvert.generate(model, [1] * 250, 10)


def test_compiled_decode_equals_eager(tiny_ckpt):
    """torch.compile'd decode steps give the same greedy tokens and (float32) logits as eager ones,
    with left padding in the batch and a second call of another length that must not break it."""
    from ouvert.generate.cache import Cache
    from ouvert.generate.decode import compiled_decode_step, decode_step, pad_left, prefill

    d, _ = tiny_ckpt
    model = ouvert.load_model(d)
    prompts = _prompts(model.config.vocab_size, lengths=(4, 11))
    eager = ouvert.generate(model, prompts, 12, SamplingParams(stop_token_ids=[]))
    assert ouvert.generate(model, prompts, 12, SamplingParams(stop_token_ids=[]), compile=True) == eager
    assert ouvert.generate(model, prompts[0], 20, SamplingParams(stop_token_ids=[]), compile=True) == \
        ouvert.generate(model, prompts[0], 20, SamplingParams(stop_token_ids=[]))
    tokens, mask = pad_left(prompts)
    step = compiled_decode_step(model)
    caches = [Cache(model, 2, 32), Cache(model, 2, 32)]
    for c in caches:
        prefill(model, tokens, mask, c)
    pos = mask.sum(1)
    tok = torch.tensor([7, 9])
    for _ in range(3):
        a, b = step(tok, pos, caches[0]), decode_step(model, tok, pos, caches[1])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        tok, pos = a.argmax(-1), pos + 1


def test_many_models_stay_compiled(tiny_ckpt):
    """Each compiled model is a version of Transformer.forward in dynamo's cache, which holds
    recompile_limit of them and then runs the function eagerly: compiled_decode_step raises the
    limit with each model, so the models past it still compile (here the limit starts at 1).
    Models of one structure share a version; float, int8 and int4 ones differ in module types."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ouvert.quantize import quantize_model

    d, _ = tiny_ckpt
    torch._dynamo.reset()
    graphs = []
    with torch._dynamo.config.patch(recompile_limit=1):  # (pytest's monkeypatch deletes a config entry on undo)
        for scheme in (None, "int8", "int4"):
            model = ouvert.load_model(d)
            if scheme:
                model = quantize_model(model, scheme)
            before = counters["stats"]["unique_graphs"]
            ouvert.generate(model, [5, 6, 7], 3, SamplingParams(stop_token_ids=[]), compile=True)
            graphs.append(counters["stats"]["unique_graphs"] - before)
    assert all(g >= 1 for g in graphs), graphs  # each model got its own compiled graph


def test_compile_failure_falls_back_to_eager(tiny_ckpt, monkeypatch):
    d, _ = tiny_ckpt
    model = ouvert.load_model(d)

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="decoding eagerly: RuntimeError: no C\\+\\+ compiler"):
        out = ouvert.generate(model, [5, 6, 7], 8, SamplingParams(stop_token_ids=[]), compile=True)
    assert out == ouvert.generate(model, [5, 6, 7], 8, SamplingParams(stop_token_ids=[]))
