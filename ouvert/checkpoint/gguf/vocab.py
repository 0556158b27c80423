"""The tokenizer in GGUF metadata, both ways: byte-level BPE (tokens, types, merges, special ids,
add_bos, llama.cpp's pre-tokenizer name) and the chat template written from an ouvert Tokenizer,
and an ouvert Tokenizer rebuilt from a file's metadata (`gguf_tokenizer`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ouvert.checkpoint.base import CheckpointError
from ouvert.checkpoint.gguf.codec import gguf_lib
from ouvert.checkpoint.gguf.read import GGUFFile
from ouvert.config import ModelConfig
from ouvert.tokenizer import LLAMA3_SPLIT, Tokenizer, stop_ids

_PRE_TOKENIZERS: dict[str, str] = {}  # signature (JSON) -> llama.cpp's tokenizer.ggml.pre; filled below


_PRE_JSON: dict[str, dict] = {}  # llama.cpp's name -> a tokenizer.json pre_tokenizer


def _signature(pre: dict | None) -> str:
    """What decides how a byte-level BPE pre-tokenizer splits text, as a comparable string."""
    if pre is None:
        return "null"
    kind = pre.get("type")
    if kind == "Sequence":
        return "[" + ",".join(_signature(p) for p in pre["pretokenizers"]) + "]"
    if kind == "Split":
        return json.dumps(["split", pre["pattern"], pre.get("behavior"), pre.get("invert", False)])
    if kind == "ByteLevel":
        return json.dumps(["bytelevel", pre.get("use_regex", True)])
    if kind == "Digits":
        return json.dumps(["digits", pre.get("individual_digits", False)])
    return json.dumps(pre, sort_keys=True)


def _register_pre_tokenizers() -> None:
    def split(regex: str) -> dict:
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}

    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    deepseek_v3 = [
        split(r"\p{N}{1,3}"),
        split("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
        split('[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|'
              ' ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+'),  # \r \n: the characters themselves
        bl,
    ]
    table = {
        "llama-bpe": {"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), bl]},  # Llama 3, ouvert's BPE
        "deepseek-v3": {"type": "Sequence", "pretokenizers": deepseek_v3},
        "gpt-2": {**bl, "use_regex": True},
        "smollm": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, {**bl, "use_regex": True}]},
    }
    for name, pre in table.items():
        _PRE_TOKENIZERS[_signature(pre)] = name
        _PRE_JSON[name] = pre


def pre_tokenizer_name(tokenizer_json: dict, source: str) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json's pre-tokenizer."""
    if not _PRE_TOKENIZERS:
        _register_pre_tokenizers()
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    if sig not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{source}: pre_tokenizer {sig[:200]} is not one llama.cpp knows by name to ouvert "
            f"({', '.join(sorted(set(_PRE_TOKENIZERS.values())))}); llama.cpp would split text differently"
        )
    return _PRE_TOKENIZERS[sig]


@dataclass
class TokenizerMeta:
    """What goes into tokenizer.ggml.* and tokenizer.chat_template."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    ids: dict[str, int]  # bos, eos, eot, padding, unknown -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def tokenizer_meta(tok, cfg: ModelConfig) -> TokenizerMeta:
    """The GGUF view of an ouvert Tokenizer for a model with cfg.vocab_size embeddings: Llama-3-style
    byte-level BPE only (tokenizer.ggml.model "gpt2"). Ids the tokenizer does not use become
    [PAD{i}] tokens of type UNUSED, as llama.cpp's converter writes them."""
    g = gguf_lib()
    T = g.TokenType
    source = str((tok.source / "tokenizer.json") if tok.source else "tokenizer")
    j = json.loads(tok.tok.to_str())
    model = j.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (j.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError(
            f"{source}: ouvert writes byte-level BPE tokenizers (Llama 3, DeepSeek) to GGUF; this one is "
            f"{model.get('type')} with decoder {(j.get('decoder') or {}).get('type')}"
        )
    pre = pre_tokenizer_name(j, source)
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= cfg.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has ids up to {max(vocab.values())} but the model only "
            f"{cfg.vocab_size} embeddings"
        )
    by_id = {i: s for s, i in vocab.items()}
    added = tok.tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            looks_special = (s.startswith("<|") and s.endswith("|>")) or (s.startswith("<｜") and s.endswith("｜>"))
            types.append(T.CONTROL if added[i].special or looks_special else T.USER_DEFINED)
            tokens.append(s)
        else:
            types.append(T.NORMAL)
            tokens.append(s)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    ids: dict[str, int] = {}
    bos = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else (cfg.stop_token_ids or [None])[0]
    for key, v in (("bos", bos), ("eos", eos), ("padding", tok.pad_token_id),
                   ("unknown", tok.token_to_id(tok.special_tokens.get("unk_token")))):
        if v is not None:
            ids[key] = int(v)
    stops = [i for i in stop_ids(tok, cfg) if i != eos]
    if stops:
        ids["eot"] = int(stops[0])  # Llama 3 instruct: <|eot_id|> ends a turn, <|end_of_text|> the text

    probe = tok.encode("a", add_special_tokens=True)
    add_bos = tok.config.get("add_bos_token")
    add_bos = bool(add_bos) if isinstance(add_bos, bool) else bool(probe) and probe[0] == bos
    add_eos = tok.config.get("add_eos_token")
    add_eos = bool(add_eos) if isinstance(add_eos, bool) else bool(probe) and probe[-1] == eos and len(probe) > 1
    return TokenizerMeta(pre, tokens, [int(t) for t in types], merges, ids, add_bos, add_eos, tok.chat_template)


def write_tokenizer_meta(w, tm: TokenizerMeta) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tm.pre)
    w.add_token_list(tm.tokens)
    w.add_token_types(tm.types)
    w.add_token_merges(tm.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "eot": w.add_eot_token_id,
              "padding": w.add_pad_token_id, "unknown": w.add_unk_token_id}
    for key, v in tm.ids.items():
        adders[key](v)
    w.add_add_bos_token(tm.add_bos)
    w.add_add_eos_token(tm.add_eos)
    if tm.chat_template:
        w.add_chat_template(tm.chat_template)


def gguf_tokenizer(path: str | Path):
    """The tokenizer a GGUF file carries, as an ouvert Tokenizer (byte-level BPE, "gpt2", with a
    pre-tokenizer ouvert knows by name): what `ouvert export hf` writes beside the weights of a
    llama.cpp or Ollama file. Settings follow llama.cpp's reading: Llama 3's "llama-bpe" takes a
    word whole when it is in the vocabulary (ignore_merges), BOS is added when add_bos_token says so."""
    g = gguf_lib()
    path = Path(path)
    kv = GGUFFile(path).fields
    model, pre = kv.get("tokenizer.ggml.model"), kv.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model {model!r}: ouvert reads byte-level BPE ('gpt2') tokenizers")
    if not _PRE_JSON:
        _register_pre_tokenizers()
    if pre not in _PRE_JSON:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} (key 'tokenizer.ggml.pre') is not one ouvert knows "
                              f"({', '.join(sorted(_PRE_JSON))})")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    T = g.TokenType
    # Special tokens go into the BPE vocabulary as well: the tokenizers library numbers an added
    # token that the vocabulary lacks after the vocabulary, whatever id it was given.
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != T.UNUSED}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == T.CONTROL}
             for i, t in enumerate(tokens) if types[i] in (T.CONTROL, T.USER_DEFINED)]
    ids = {k: kv.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "padding", "unknown")}
    add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", False)) and ids["bos"] is not None
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    post = byte_level
    if add_bos:
        bos = tokens[ids["bos"]]
        post = {"type": "Sequence", "processors": [byte_level, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [ids["bos"]], "tokens": [bos]}}}]}
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": _PRE_JSON[pre], "post_processor": post,
        "decoder": {**byte_level, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre == "llama-bpe", "vocab": vocab, "merges": kv.get("tokenizer.ggml.merges", [])},
    }
    names = {"bos": "bos_token", "eos": "eos_token", "padding": "pad_token", "unknown": "unk_token"}
    config = {names[k]: tokens[v] for k, v in ids.items() if k in names and v is not None}
    config.update(add_bos_token=add_bos, add_eos_token=bool(kv.get("tokenizer.ggml.add_eos_token", False)),
                  tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    stops = [v for k, v in ids.items() if k in ("eos", "eot") and v is not None]
    generation = {"bos_token_id": ids["bos"], "eos_token_id": stops if len(stops) > 1 else (stops or [None])[0]}
    generation = {k: v for k, v in generation.items() if v is not None}
    return Tokenizer(HFTokenizer.from_str(json.dumps(tj)), config, generation, kv.get("tokenizer.chat_template"))
