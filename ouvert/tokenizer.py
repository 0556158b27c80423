"""Tokenizers from Hugging Face `tokenizer.json` files, through the `tokenizers` library.

BOS/EOS and the chat template come from tokenizer_config.json (or chat_template.jinja), extra
stop tokens from generation_config.json. Decoding can be incremental: `StreamDecoder` never
emits half of a multi-byte character while streaming.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from ouvert import chat

_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be read; names the file."""


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (byte-level BPE vocabularies
    write their tokens in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _gpt2_bytes_to_unicode().items()}


def _token_str(v: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what transformers keeps beside it: special tokens, chat template."""

    def __init__(self, tok: _HFTokenizer, config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | None = None, source: Path | None = None):
        self.tok = tok
        self.config = dict(config or {})
        self.generation_config = {k: v for k, v in (generation_config or {}).items() if k.endswith("token_id")}
        self.source = source
        ct = chat_template or self.config.get("chat_template")
        if isinstance(ct, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in ct}
            ct = named.get("default", next(iter(named.values()), None))
        self.chat_template: str | None = ct
        self.special_tokens = {
            k: s for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (s := _token_str(self.config.get(k))) is not None
        }
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.special_tokens.get("eos_token"))
        self.pad_token_id = self.token_to_id(self.special_tokens.get("pad_token"))
        self._added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}  # for token_bytes
        self._byte_level = type(tok.decoder).__name__ == "ByteLevel"

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS plus the generation config's eos_token_id(s) (Llama 3 instruct stops at <|eot_id|>)."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        g = self.generation_config.get("eos_token_id")
        for i in g if isinstance(g, list) else [] if g is None else [g]:
            if i not in ids:
                ids.append(i)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids. add_special_tokens applies the tokenizer's post-processor (Llama 3 adds BOS)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also where they are part of a UTF-8 character (which
        decode([token_id]) shows as U+FFFD): byte-level BPE pieces map back through GPT-2's byte
        table, SentencePiece byte-fallback pieces <0xHH> are their byte, added tokens their text."""
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            return bytes([int(m[1], 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece writes spaces as U+2581

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render with the model's chat template, as transformers does; tokenize=True returns ids
        (the template writes BOS itself, so no special tokens are added on top)."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source or 'tokenizer'}: no chat_template in tokenizer_config.json")
        text = chat.render(self.chat_template, messages, add_generation_prompt, tools, self.special_tokens, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, out: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json (and the other files it was loaded with)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if self.source is not None and (self.source / "tokenizer.json").is_file():
            for name in _FILES:
                if (self.source / name).is_file() and self.source.resolve() != out.resolve():
                    shutil.copyfile(self.source / name, out / name)
        else:
            self.tok.save(str(out / "tokenizer.json"))
            cfg = dict(self.config)
            if self.chat_template:
                cfg["chat_template"] = self.chat_template
            (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get back only text that is final.

    Decoding a single token of a byte-level BPE can yield half a UTF-8 character (shown as U+FFFD),
    and some decoders change earlier text depending on what follows. So we decode a short window
    of recent ids twice, with and without the new one, and emit the difference only when it does
    not end in a replacement character (the approach of TGI and vLLM).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window whose text was already emitted
        self.read = 0  # end of that window

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix : self.read], self.skip)
        now = dec(self.ids[self.prefix :], self.skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an invalid byte sequence stays as U+FFFD)."""
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix : self.read], self.skip)
        now = dec(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


def read_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer from a directory with tokenizer.json (and tokenizer_config.json,
    generation_config.json, chat_template.jinja when present). ouvert.checkpoint.io.load_tokenizer
    also reads the one a GGUF file carries."""
    path = Path(path)
    tj = path / "tokenizer.json"
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such directory")
    if not tj.is_file():
        raise TokenizerError(f"{tj}: missing (ouvert reads tokenizers in the tokenizer.json format)")
    try:
        tok = _HFTokenizer.from_file(str(tj))
    except Exception as e:
        raise TokenizerError(f"{tj}: cannot read ({e})") from None

    def read_json(name: str) -> dict:
        f = path / name
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{f}: not valid JSON ({e})") from None

    config = read_json("special_tokens_map.json")
    config.update(read_json("tokenizer_config.json"))
    jinja = path / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else None
    return Tokenizer(tok, config, read_json("generation_config.json"), template, source=path)


# ---- training ------------------------------------------------------------------------------------

# Llama 3's pre-tokenizer split (from its tokenizer.json): contractions, words with an optional
# leading non-letter, numbers of up to 3 digits, punctuation runs, newlines, other whitespace.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "pad_token": "<|pad|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
}
# Llama 3's chat format, with the generation prompt made optional.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _read_text_files(files: list[Path], chunk_chars: int = 1 << 16):
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            while chunk := fh.read(chunk_chars):
                yield chunk


def train_tokenizer(files: list[str | Path], vocab_size: int, out: str | Path, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer in Llama 3's style on text files; write tokenizer.json,
    tokenizer_config.json (chat template inside) and generation_config.json into `out`.

    Files are streamed in chunks, so the corpus never has to fit in memory.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise TokenizerError(f"{f}: no such file")
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials) + 1:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: the 256 bytes and {len(specials)} special "
                             "tokens need room")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials), min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_read_text_files(files), trainer=trainer)
    tok.add_special_tokens(specials)  # after the merges, at the top of the vocabulary, as Llama 3 has them
    bos = SPECIAL_TOKENS["bos_token"]
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)]),
    ])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": SPECIAL_TOKENS["eos_token"],
        "pad_token": SPECIAL_TOKENS["pad_token"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
    }
    eos_ids = [tok.token_to_id(SPECIAL_TOKENS["eos_token"]), tok.token_to_id(SPECIAL_TOKENS["eot"])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_ids}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return read_tokenizer(out)


def tokenizer_hash(path: str | Path) -> str:
    """sha256 of a tokenizer directory's tokenizer.json: what data shards were made with."""
    import hashlib

    return hashlib.sha256((Path(path) / "tokenizer.json").read_bytes()).hexdigest()


def stop_ids(tok: Tokenizer, config) -> list[int]:
    """What ends a reply: the tokenizer's stop tokens, then the model config's eos ids it lacks."""
    return list(dict.fromkeys([*tok.stop_token_ids, *config.stop_token_ids]))
