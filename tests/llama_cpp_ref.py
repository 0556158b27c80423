"""llama.cpp itself, the reference the GGUF and serving tests run ouvert's files through: its C API
through cyllama (requirements-dev.txt), a prebuilt wheel whose llama.cpp is compiled for AVX2
without AVX-512, so every x86 CPU the tests run on runs the same code, and no one waits ten minutes
for a source build as llama-cpp-python's needed. A helper module, not a test file: test_gguf.py and
test_real_serve.py both use it."""

from __future__ import annotations

import numpy as np


def cyllama_api():
    """llama.cpp's C API, its logging off and its CPU backend loaded."""
    import cyllama.llama.llama_cpp as cp

    cp.disable_logging()
    cp.ggml_backend_load_all()
    return cp


def llama_cpp_model(path):
    """The whole model: this llama.cpp aborts the process loading a file vocab_only (llama-hparams.cpp:35)."""
    cp = cyllama_api()

    class Model(cp.LlamaModel):
        # cyllama 0.2.18's LlamaContext.get_logits_ith asks its model for n_vocab, which only the vocab has
        n_vocab = property(lambda self: self.get_vocab().n_vocab)

    return Model(str(path), cp.LlamaModelParams())


def llama_cpp_context(model, n_ctx: int):
    cp = cyllama_api()
    params = cp.LlamaContextParams()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    # one thread: OpenMP workers spinning on a shared 2-core machine are slower than one
    params.n_threads = params.n_threads_batch = 1
    # Flash attention off, as llama-cpp-python had it: this llama.cpp's "auto" turns it on, and on
    # deepseek2 (MLA) its logits then move by 10% (decode) to 70% (prompt) of their range.
    params.flash_attn_type = 0
    return cp.LlamaContext(model, params)


def llama_cpp_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """llama.cpp's greedy tokens after prompt and the logits each was chosen from, one decode a token."""
    cp = cyllama_api()
    ctx = llama_cpp_context(model, 128)
    ctx.decode(cp.llama_batch_get_one(prompt))
    out, logits = [], []
    for i in range(n):
        row = np.array(ctx.get_logits_ith(-1))
        logits.append(row)
        out.append(int(row.argmax()))
        ctx.decode(cp.llama_batch_get_one([out[-1]], len(prompt) + i))
    return out, logits


def llama_cpp_logits(model, tokens: list[int]) -> np.ndarray:
    """Teacher-forced: llama.cpp's logits at every position of tokens, from one batch (the prompt path)."""
    cp = cyllama_api()
    ctx = llama_cpp_context(model, len(tokens))
    batch = cp.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1)
    for i, t in enumerate(tokens):
        batch.add(t, i, [0], True)
    ctx.decode(batch)
    return np.stack([np.array(ctx.get_logits_ith(i)) for i in range(len(tokens))])
