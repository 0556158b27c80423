"""The serving engine without HTTP: against ouvert.generate (its slow twin), batch invariance,
prefix caching, GQA and MLA caches, and constrained decoding that closes in time."""

from __future__ import annotations

import json
import random
import time

import jsonschema
import pytest
import torch

from ouvert import ModelConfig, Transformer, kernels, load_tokenizer
from ouvert.generate import generate
from ouvert.generate.sampling import MIN_TEMPERATURE, SamplingParams, StopStrings, apply_penalties, sample
from ouvert.model import KVCache
from ouvert.serve.cache import SlotCache
from ouvert.serve.engine import Engine, QueueFull, Request
from ouvert.serve.grammar import GrammarCompiler

LLAMA = dict(model_type="llama", vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
             bos_token_id=128000, eos_token_id=128001)
MLA = dict(LLAMA, model_type="deepseek_v3", kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4)
# DeepSeek-V3 with routed experts: a dense first layer, then MoE with group-limited sigmoid routing.
MOE = dict(MLA, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=32,
           first_k_dense_replace=1, n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
           norm_topk_prob=True, routed_scaling_factor=2.5)


def tiny(cfg: dict, std: float = 0.2, seed: int = 0) -> Transformer:
    """Random weights; std 0.2 makes logits peaked, so greedy choices are not decided by rounding."""
    model = Transformer(ModelConfig(**cfg))
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def tok(llama3_tokenizer_dir):
    return load_tokenizer(llama3_tokenizer_dir)


@pytest.fixture(scope="module")
def llama():
    return tiny(LLAMA)


def run(engine: Engine, requests: list[Request]) -> list[list]:
    """Submit all, step until idle; returns each request's Outputs."""
    outs = [[] for _ in requests]
    for o, r in zip(outs, requests):
        engine.submit(r, o.append)
    while engine.step():
        pass
    assert all(o and o[-1].finish_reason for o in outs)
    return outs


def ids(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def prompts(tok) -> list[list[int]]:
    texts = ["Hello there, how are you?", "The quick brown fox jumps over the lazy dog. " * 6, "a",
             "Open models win because", "1 2 3 4 5 6 7 8 9 10 11 12", "Bonjour, ça va ?", "def f(x):\n    return",
             "Le chat est sur le tapis."]
    return [tok.encode(t) for t in texts]


@pytest.mark.parametrize("cfg", [LLAMA, MLA], ids=["gqa", "mla"])
def test_greedy_matches_generate(cfg, tok):
    """Per-request slots at different lengths, chunked prefill, one batched decode: token for token
    what generate() gives each prompt alone."""
    model = tiny(cfg)
    engine = Engine(model, tok, max_batch=4, chunk=16)
    ps = prompts(tok)[:6]  # more prompts than slots: some wait, then join the running batch
    outs = run(engine, [Request(p, 12, SamplingParams(temperature=0), ignore_eos=True) for p in ps])
    for p, o in zip(ps, outs):
        assert ids(o) == generate(model, p, 12, SamplingParams(stop_token_ids=[]))[0]
        assert o[-1].finish_reason == "length" and o[-1].completion_tokens == 12


def trace(outs) -> list[tuple[int, float]]:
    """Each token with its log-probability: equal traces mean bitwise-equal logits."""
    return [(e.token_id, e.logprob) for o in outs for e in o.logprobs or []]


@pytest.mark.parametrize("cfg", [LLAMA, MOE], ids=["gqa", "moe"])
def test_batch_invariance(cfg, tok):
    """A request's tokens and log-probabilities, bit for bit, do not depend on what else runs: each
    of 8 requests (greedy and seeded sampling, prompts of different lengths, arriving together,
    so attention lengths and prefill chunks interleave) gets what it gets alone. For the MoE model
    the other requests also change how many tokens each expert gets in a decode step."""
    model = tiny(cfg)
    ps = prompts(tok)

    def reqs():
        return [Request(p, 16, SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=100 + i), logprobs=0,
                        ignore_eos=True) for i, p in enumerate(ps)]

    alone = [trace(run(Engine(model, tok, max_batch=8, chunk=16), [r])[0]) for r in reqs()]
    busy = Engine(model, tok, max_batch=8, chunk=16)
    together = [trace(o) for o in run(busy, reqs())]
    assert together == alone
    # both decode their live rows only (every product on ouvert's kernels over the float rows: MLA's
    # absorbed heads, the routers and the expert tiles too), never padding to max_batch
    if kernels.available():
        assert busy.live_rows_only and busy.metrics.decode_batch_rows < busy.metrics.decode_steps * 8
    # and the seeds matter
    other = Request(ps[0], 16, SamplingParams(temperature=1.0, seed=999), logprobs=0, ignore_eos=True)
    assert trace(run(Engine(model, tok, max_batch=8, chunk=16), [other])[0]) != alone[0]


@pytest.mark.parametrize("scheme", ["q8_0", "q4_1"])
def test_block_models_decode_live_rows_only(tok, scheme):
    """A model in GGUF blocks runs every matmul on ouvert's row-invariant kernels, so the engine drops
    the padding of decode steps: the same traces alone and together, bit for bit, with fewer rows
    computed than max_batch per step; the twin (torch's matmul) brings the padding back. (Without
    the padding, the twin's float products give different traces: checked by hand.)"""

    from ouvert.model import Router
    from ouvert.quantize import BlockExperts, BlockLinear, BlockMLAttention, BlockRouter, quantize_model

    if not kernels.available():
        pytest.skip("ouvert's C++ kernels are not built")
    model = quantize_model(tiny(dict(LLAMA, hidden_size=64, intermediate_size=128)), scheme)
    ps = prompts(tok)

    def reqs():
        return [Request(p, 12, SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=100 + i), logprobs=0,
                        ignore_eos=True) for i, p in enumerate(ps)]

    def engine():
        return Engine(model, tok, max_batch=8, chunk=16)

    alone_engines = [engine() for _ in ps]
    alone = [trace(run(e, [r])[0]) for e, r in zip(alone_engines, reqs())]
    assert all(e.live_rows_only and e.metrics.decode_batch_rows == e.metrics.decode_rows for e in alone_engines)
    busy = engine()
    together = [trace(o) for o in run(busy, reqs())]
    assert together == alone
    assert busy.metrics.decode_batch_rows < busy.metrics.decode_steps * 8  # steps shorter than max_batch
    # a dense float model is served through the kernels over its float rows, leaving the model as it is;
    # MLA and MoE models too (their routed experts, routers and absorbed heads over their float rows)
    dense = tiny(LLAMA)
    e = Engine(dense, tok, max_batch=8, chunk=16)
    assert e.live_rows_only and isinstance(e.model.lm_head, BlockLinear) and type(dense.lm_head) is torch.nn.Linear
    assert e.model.lm_head.weight.data_ptr() == dense.lm_head.weight.data_ptr()  # no copy
    moe = tiny(MOE)
    e = Engine(moe, tok, max_batch=8, chunk=16)
    experts, router = e.model.layers[1].mlp.experts, e.model.layers[1].mlp.gate
    assert e.live_rows_only and isinstance(experts, BlockExperts) and isinstance(router, BlockRouter)
    assert isinstance(e.model.layers[0].self_attn, BlockMLAttention) and type(moe.layers[1].mlp.gate) is Router
    assert experts.up_proj.data_ptr() == moe.layers[1].mlp.experts.up_proj.data_ptr()
    assert not Engine(tiny(MOE), tok, max_batch=65, chunk=16).live_rows_only  # beyond the kernels' rows
    kernels.use_twin(True)
    try:
        padded = engine()
        run(padded, reqs()[:1])
        assert padded.metrics.decode_batch_rows == 8 * padded.metrics.decode_steps
    finally:
        kernels.use_twin(False)


def test_prefix_cache_is_exact(llama, tok):
    """A shared prefix is computed once, reused in whole chunks, and changes no output."""
    system = tok.encode("You are a careful assistant. " * 8)  # > 2 chunks of 16
    ps = [system + tok.encode(q, add_special_tokens=False) for q in ("What is 2+2?", "Name a colour.", "Why?")]
    greedy = SamplingParams(temperature=0)
    cold = [ids(run(Engine(llama, tok, max_batch=4, chunk=16), [Request(p, 8, greedy)])[0]) for p in ps]
    engine = Engine(llama, tok, max_batch=4, chunk=16)
    first = run(engine, [Request(ps[0], 8, greedy)])
    assert first[0][-1].cached_tokens == 0
    rest = run(engine, [Request(p, 8, greedy) for p in ps[1:]])
    assert [ids(first[0])] + [ids(o) for o in rest] == cold
    assert all(o[-1].cached_tokens == len(system) // 16 * 16 for o in rest)
    assert engine.metrics.prefix_cache_hits == 2


def test_cancel_frees_the_slot(llama, tok):
    engine = Engine(llama, tok, max_batch=2, chunk=16)
    out = []
    h = engine.submit(Request(tok.encode("Hi"), 100, ignore_eos=True), out.append)
    for _ in range(4):
        engine.step()
    assert engine.running == 1
    h.cancel()
    engine.step()
    assert engine.running == 0 and out[-1].finish_reason == "cancelled"
    assert engine.metrics.finished["cancelled"] == 1


def test_stop_strings_are_cut_and_held_back(llama, tok):
    """Text that may begin a stop string is held back, and the stop string never reaches the client."""
    engine = Engine(llama, tok, max_batch=2, chunk=16)
    prompt = tok.encode("Hello")
    full = run(engine, [Request(prompt, 24, SamplingParams(temperature=0), ignore_eos=True)])[0]
    full = "".join(o.text for o in full)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = run(engine, [Request(prompt, 24, SamplingParams(temperature=0, stop=[stop]), ignore_eos=True)])[0]
    assert "".join(o.text for o in cut) == full[: full.index(stop)]
    assert cut[-1].finish_reason == "stop"


def _naive_stops(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """The specification StopStrings implements, written the obvious (quadratic) way: the text up to
    where the earliest stop string begins, once one has appeared."""
    text = ""
    for p in pieces:
        text += p
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
    return text, False


def test_stop_strings():
    """Stop strings split across pieces, several at once, held text and the final flush; and over random
    texts and splits, the same as the obvious quadratic search."""
    st = StopStrings(["END"])
    assert st.push("abcE") == ("abc", False) and st.held == "E"  # "E" may begin END
    assert st.push("N") == ("", False) and st.held == "EN"
    assert st.push("Dxyz") == ("", True)  # END is complete: nothing of it, nor after it, is sent
    st = StopStrings(["END"])
    assert st.push("xEN") == ("x", False)
    assert st.push("", final=True) == ("EN", False)  # the end of the stream sends what was held
    # the earliest stop string wins, even when a later one completes first
    assert StopStrings(["bc", "abcd"]).push("xabcd") == ("x", True)
    st = StopStrings(["world", "lo w"])
    assert [st.push(p) for p in ("hel", "lo wor")] == [("he", False), ("l", True)]  # "l" waited: "lo w"?
    # a prefix that fails part-way falls back to a shorter one (the automaton's failure links)
    st = StopStrings(["aab"])
    assert [st.push(c) for c in "aaab"] == [("", False), ("", False), ("a", False), ("", True)]
    # held text is never longer than the longest stop string less one character
    st = StopStrings(["a" * 50 + "b", "zz"])
    for _ in range(200):
        st.push("a")
        assert len(st.held) <= 50
    assert st.push("c") == ("a" * 50 + "c", False)
    assert StopStrings([""]).push("text") == ("text", False)  # an empty stop string is no stop string
    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        st, sent, stopped = StopStrings(stops), "", False
        for p in pieces:
            out, stopped = st.push(p)
            sent += out
            if stopped:
                break
        if not stopped:
            sent += st.push("", final=True)[0]
        assert (sent, stopped) == _naive_stops(pieces, stops), (stops, pieces)


def test_stop_strings_cost_linear_time():
    """Each piece costs time in its own length, not in the stop string's: 200 pieces against a stop
    string of 200,000 characters take well under a second (testing each prefix of it at each piece
    took seconds per piece). The bound is loose: the machine may be busy with other tests."""
    st = StopStrings(["ab" * 100_000])
    t0 = time.perf_counter()
    for _ in range(200):
        assert st.push("ab") == ("", False)
    assert st.push("c") == ("ab" * 200 + "c", False)
    assert time.perf_counter() - t0 < 5.0


def test_submit_many_is_all_or_nothing(llama, tok):
    """A request's completions enter the queue together or not at all; more than the queue holds can
    never enter (ValueError, an HTTP 400), fewer that do not fit now are QueueFull (429)."""
    engine = Engine(llama, tok, max_batch=1, chunk=16, max_queue=3)  # not started: the queue stays as filled
    p = tok.encode("Hi")
    engine.submit(Request(p, 4), lambda out: None)
    with pytest.raises(QueueFull):
        engine.submit_many([Request(p, 4) for _ in range(3)], [lambda out: None] * 3)
    assert engine.queue_depth == 1 and engine.metrics.rejected == 1
    with pytest.raises(ValueError, match="at most 3"):
        engine.submit_many([Request(p, 4) for _ in range(4)], [lambda out: None] * 4)
    engine.submit_many([Request(p, 4) for _ in range(2)], [lambda out: None] * 2)
    assert engine.queue_depth == 3
    for seed in (-1, 2**63):
        with pytest.raises(ValueError, match="seed"):
            Engine(llama, tok, max_batch=1, chunk=16).submit(Request(p, 4, SamplingParams(temperature=1.0, seed=seed)),
                                                             lambda out: None)


def test_tiny_temperatures_are_greedy():
    """Below MIN_TEMPERATURE sampling is argmax and draws nothing from the generator (dividing by 1e-39
    made inf logits and NaN probabilities); from MIN_TEMPERATURE on it samples."""
    logits = torch.tensor([[1.0, 3.0, 2.5, -1.0]])
    for t in (1e-39, MIN_TEMPERATURE * 0.99):
        g = torch.Generator().manual_seed(0)
        state = g.get_state()
        assert sample(logits, SamplingParams(temperature=t), [g]).tolist() == [1]
        assert torch.equal(g.get_state(), state)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert sample(logits, SamplingParams(temperature=MIN_TEMPERATURE), [g]).tolist() == [1]  # 0.5 / 1e-5 apart
    assert not torch.equal(g.get_state(), state)


@pytest.fixture(scope="module")
def grammars(tok):
    return GrammarCompiler(tok, LLAMA["vocab_size"], [128001, 128009])


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "number"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "tags", "address"],
}


def test_constrained_output_closes_within_the_budget(tok, grammars):
    """A flat random model wanders in strings and numbers; the closer still ends every answer as
    valid JSON at the budget, even a budget just above the shortest completion."""
    model = tiny(LLAMA, std=0.02)
    g = grammars.json_schema(SCHEMA)
    shortest = g.new().closing_cost()
    engine = Engine(model, tok, max_batch=4, chunk=16)
    reqs = [Request(tok.encode("Fill the form:"), m, SamplingParams(temperature=1.0, seed=s), grammar=g)
            for m in (shortest + 1, 48, 80) for s in range(2)]
    for r, o in zip(reqs, run(engine, reqs)):
        text = "".join(x.text for x in o)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert o[-1].finish_reason == "stop" and o[-1].completion_tokens <= r.max_tokens


def test_slot_cache_is_a_kv_cache(llama):
    assert isinstance(SlotCache(llama, 2, 16), KVCache)


def test_cache_pool_is_sized_by_memory(llama, tok):
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (K, V) * kv heads * head_dim * float32
    engine = Engine(llama, tok, max_batch=4, chunk=16, cache_memory=4 * 100 * per_token)
    assert engine.context_length == 100
    with pytest.raises(ValueError, match="fewer than one chunk"):
        Engine(llama, tok, max_batch=4, chunk=16, cache_memory=4 * 8 * per_token)


def test_penalties_follow_openai():
    """logit - frequency * count - presence * (count > 0), on generated tokens only."""
    logits = torch.tensor([1.0, 2.0, 3.0])
    counts = torch.tensor([0.0, 1.0, 3.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    assert apply_penalties(logits, params, counts=counts).tolist() == [1.0, 1.25, 1.75]


def test_a_long_prompt_does_not_stall_running_streams(llama, tok):
    """Chunked prefill: while a 10-chunk prompt is prefilled, two chunks a step, a running stream
    still gets a token at every step, and the new request joins the batch when its prompt is in."""
    engine = Engine(llama, tok, max_batch=2, chunk=16, prefill_chunks=2)
    a, b = [], []
    engine.submit(Request(tok.encode("Hi"), 40, SamplingParams(temperature=0), ignore_eos=True), a.append)
    engine.step()
    engine.submit(Request(list(range(1000, 1160)), 8, SamplingParams(temperature=0), ignore_eos=True), b.append)
    for step in range(1, 6):
        before = len(a)
        engine.step()
        assert len(a) == before + 1  # one token for the running stream, every step
        assert (len(b) > 0) == (step == 5)  # 160 tokens = 10 chunks = 5 steps, then its first token
    assert engine.running == 2
