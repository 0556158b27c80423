"""The `ouvert` command: generate, chat, info, init, train, data, serve, export, card, verify, reproduce.

Each subcommand is a thin function over the library; errors print one plain line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ouvert.card import add_card_parsers, describe
from ouvert.checkpoint import io, manifest
from ouvert.checkpoint.base import DTYPES, CheckpointError
from ouvert.checkpoint.gguf.codec import TYPES
from ouvert.config import ConfigError, preset
from ouvert.data import expand_inputs, prepare
from ouvert.eval.run import cmd_eval as run_eval
from ouvert.generate.decode import stream
from ouvert.generate.sampling import SamplingParams
from ouvert.generate.speculative import speculative_generate
from ouvert.model import Transformer
from ouvert.quantize import BLOCK_SCHEMES, check_scheme, describe_quantization, quantize_model
from ouvert.serve.cli import add_serve_parser
from ouvert.threads import configure_threads
from ouvert.tokenizer import TokenizerError, stop_ids, train_tokenizer
from ouvert.train.__main__ import main as train_main
from ouvert.train.reproduce import add_reproduce_parser

# Commands that run a model long enough for a busy machine to matter (configure_threads's hint).
_COMPUTE_COMMANDS = {"generate", "chat", "serve", "train", "eval", "reproduce"}


def load(args) -> tuple:
    """The model and tokenizer a command's --model, --tokenizer and --dtype name."""
    return io.load(args.model, args.tokenizer, DTYPES.get(args.dtype))


class Timing:
    """When a reply's tokens arrived. The prompt pass (prefill and the first token) ends when the
    first token arrives; decoding runs from there, so its rate does not pay for the prompt."""

    def __init__(self, prompt_tokens: int, clock: Callable[[], float] = time.perf_counter):
        self.prompt_tokens, self.clock = prompt_tokens, clock
        self.start = clock()
        self.first: float | None = None  # when the first step's tokens arrived
        self.last = 0.0
        self.new = self.first_step = 0

    def step(self, n: int = 1) -> None:
        """n tokens arrived now (one step of decoding; several for a speculative step)."""
        now = self.clock()
        if self.first is None:
            self.first, self.first_step = now, n
        self.last = now
        self.new += n

    def summary(self) -> str:
        """`[12 prompt tokens in 0.40 s (30.0 tokens/s); 8 new at 21.5 tokens/s]`"""
        if self.first is None:
            return f"[{self.prompt_tokens} prompt tokens; 0 new]"
        prompt_s = self.first - self.start
        text = (f"[{self.prompt_tokens} prompt tokens in {prompt_s:.2f} s "
                f"({self.prompt_tokens / max(prompt_s, 1e-9):.1f} tokens/s); {self.new} new")
        decoded = self.new - self.first_step
        if decoded > 0:
            text += f" at {decoded / max(self.last - self.first, 1e-9):.1f} tokens/s"
        return text + "]"


def _sampling_params(args, model, tok, **more) -> SamplingParams:
    """The sampling flags (_sampling_args), stopping at the model's stop tokens."""
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          seed=args.seed, stop_token_ids=stop_ids(tok, model.config), **more)


def _tokens(model, tok, ids: list[int], args) -> Iterator[int]:
    """The new tokens of one reply, as they are sampled."""
    params = _sampling_params(args, model, tok, repetition_penalty=args.repetition_penalty)
    for step in stream(model, ids, args.max_new_tokens, params, compile=args.compile):
        if step[0] is None:
            return
        yield step[0]


def print_reply(tokens: Iterable[int], tok, timing: Timing) -> tuple[list[int], bool]:
    """Print the text of tokens as they arrive; returns the tokens and whether Ctrl-C stopped them."""
    dec = tok.stream(skip_special_tokens=True)
    new: list[int] = []
    interrupted = False
    try:
        for t in tokens:
            timing.step()
            new.append(t)
            print(dec.push(t), end="", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    print(dec.flush(), flush=True)
    return new, interrupted


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """The conversation through the tokenizer's chat template, ready for the assistant's turn; a
    template that fails (or that jinja's sandbox refuses) is one line naming the tokenizer."""
    import jinja2

    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except jinja2.TemplateError as e:
        if isinstance(e, jinja2.TemplateSyntaxError):
            why = f"{e.message} (template line {e.lineno})"
        elif isinstance(e, jinja2.exceptions.SecurityError):
            why = f"refused by the sandbox: {e}"
        else:
            why = str(e)
        raise ValueError(f"{tok.source or 'tokenizer'}: chat template: {' '.join(why.split())}") from None


def prompt_ids(tok, prompt: str, chat: bool = False) -> list[int]:
    """The prompt as is, or (chat) as one user message through the chat template."""
    return chat_ids(tok, [{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)


def cmd_generate(args) -> None:
    model, tok = load(args)
    ids = prompt_ids(tok, args.prompt, args.chat)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    if args.speculative:
        timing, interrupted = _speculative_reply(model, tok, ids, args), False
    else:
        timing = Timing(len(ids))
        _, interrupted = print_reply(_tokens(model, tok, ids, args), tok, timing)
    print(timing.summary(), file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt


def _speculative_reply(model, tok, ids: list[int], args) -> Timing:
    """As print_reply, drafting with the model's MTP module or a draft model (generate/speculative.py)."""
    draft = "mtp" if args.speculative == "mtp" else io.load_model(args.speculative, dtype=DTYPES.get(args.dtype))
    dec = tok.stream(skip_special_tokens=True)
    timing = Timing(len(ids))  # after loading the draft model, which is no part of the prompt pass

    def on_token(step: list[int]) -> None:
        timing.step(len(step))
        print("".join(dec.push(t) for t in step), end="", flush=True)

    out = speculative_generate(
        model, ids, args.max_new_tokens, draft, _sampling_params(args, model, tok), k=args.draft_k, on_token=on_token,
    )
    print(dec.flush(), flush=True)
    print(f"[speculative: {out.acceptance_rate:.0%} of drafts accepted, {out.tokens_per_forward:.2f} tokens per "
          f"forward]", file=sys.stderr)
    return timing


def chat_loop(
    tok, reply: Callable[[list[int]], Iterable[int]], system: str | None = None, read: Callable[[str], str] = input
) -> list[dict]:
    """The REPL of `ouvert chat`; returns the conversation. reply(ids) yields the new tokens for the
    templated conversation. Ctrl-C during a reply stops it and returns to the prompt, keeping what
    was said so far (nothing of the turn when no token came)."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print("ouvert chat: type a message; Ctrl-C stops a reply; /reset clears the conversation, /exit or Ctrl-D "
          "quits.", file=sys.stderr)
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=sys.stderr)
            return messages
        if line.strip() in ("/exit", "/quit"):
            return messages
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_ids(tok, messages)
        timing = Timing(len(ids))
        new, interrupted = print_reply(reply(ids), tok, timing)
        if new:
            messages.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})
        else:
            messages.pop()  # stopped before a word: the turn did not happen
        print(timing.summary() + (" (stopped)" if interrupted else ""), file=sys.stderr)


def cmd_chat(args) -> None:
    model, tok = load(args)
    chat_loop(tok, lambda ids: _tokens(model, tok, ids, args), args.system)


def cmd_info(args) -> None:
    model = io.load_model(args.model)
    rows = describe(model)
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def cmd_init(args) -> None:
    """A new model with random weights from a preset (for the demo, and to start training)."""
    cfg = preset(args.preset)
    tok = io.load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but preset {args.preset} only {cfg.vocab_size}")
    model = Transformer(cfg)
    model.init_weights(std=args.init_std, generator=torch.Generator().manual_seed(args.seed))
    model.to(DTYPES[args.dtype])
    io.save_model(model, args.out, tokenizer=tok)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n / 1e6:.1f}M parameters, preset {args.preset})")


def cmd_train(args) -> None:
    code = train_main([args.config, *args.rest] + (["--resume"] if args.resume else []))
    if code:
        raise SystemExit(code)


def cmd_tokenizer_train(args) -> None:
    files = expand_inputs(args.input)
    tok = train_tokenizer(files, args.vocab_size, args.out)
    print(f"wrote {args.out}: {tok.vocab_size} tokens, trained on {len(files)} file(s)")


def cmd_data_prepare(args) -> None:
    m = prepare(args.tokenizer, args.input, args.out, val_fraction=args.val_fraction, text_field=args.text_field,
                workers=args.workers)
    for p in m["problems"]:
        print(f"warning: {p}", file=sys.stderr)
    print(f"wrote {args.out}: {m['train_tokens']:,} train and {m['val_tokens']:,} validation tokens "
          f"from {len(m['sources'])} file(s), {len(m['train'])} train shard(s)")


def cmd_eval(args) -> None:
    run_eval(args)


def cmd_quantize(args) -> None:
    """`ouvert quantize --model DIR --scheme SCHEME [--group-size G] --out DIR`."""
    if args.scheme not in BLOCK_SCHEMES:
        check_scheme(args.scheme, args.group_size)
    src = Path(args.model)
    # a GGUF file is read dequantized (its blocks, requantized, lose more than float weights would)
    model = quantize_model(io.load_model(src, dtype=torch.float32 if src.suffix == ".gguf" else None), args.scheme,
                           args.group_size)
    tok = io.load_tokenizer(src) if src.suffix == ".gguf" or (src / "tokenizer.json").is_file() else None
    lineage = {"derived_by": f"ouvert quantize --scheme {args.scheme}",
               "parent": manifest.parent_record(src)}  # ouvert.json names the checkpoint (or file) it came from
    io.save_model(model, args.out, tokenizer=tok, provenance=lineage)
    print(f"wrote {args.out}: {describe_quantization(model)}")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    out = io.export_gguf(args.model, args.out, args.type, args.tokenizer)
    print(f"wrote {out} ({args.type or 'as stored'}, {out.stat().st_size / 2**20:.1f} MiB)")


def cmd_export_hf(args: argparse.Namespace) -> None:
    print(f"wrote {io.export_hf(args.model, args.out, args.tokenizer)}")


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="weight-only checkpoint (HF layout): GGUF block formats, int8, int4")
    p.add_argument("--model", required=True, help="float checkpoint directory")
    p.add_argument("--scheme", required=True,
                   help=f"{', '.join(BLOCK_SCHEMES)} (GGUF's block formats, run by ouvert's kernels); "
                        "int8 (per output channel) or int4 (groups), run by torch's kernels")
    p.add_argument("--group-size", type=int, default=None, help="int4: 32, 64, 128 or 256 (default 128, else 32)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)


def add_export_parser(sub) -> None:
    """`ouvert export gguf | hf`."""
    ex = sub.add_parser("export", help="write a checkpoint in another format").add_subparsers(
        dest="export_command", required=True)
    p = ex.add_parser("gguf", help="one GGUF file for llama.cpp and Ollama, tokenizer and chat template inside")
    p.add_argument("--model", required=True, help="checkpoint: HF directory, Meta directory or GGUF file")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help=f"tensor type: {', '.join(dict.fromkeys(TYPES + BLOCK_SCHEMES))}. Default: a checkpoint "
                        "in GGUF blocks (ouvert quantize, a GGUF file) copies its blocks as they are; a float one f16")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: the model's)")
    p.set_defaults(func=cmd_export_gguf)
    p = ex.add_parser("hf", help="a Hugging Face directory (from Meta's consolidated.*.pth, or a GGUF file)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="directory with tokenizer.json to copy alongside")
    p.set_defaults(func=cmd_export_hf)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (the first step compiles, about a minute on 2 cores)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ouvert", description="Run, inspect and build Llama and DeepSeek models.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _sampling_args(p)
    p.add_argument("--speculative", metavar="mtp|DIR", help="speculative decoding: draft with the model's MTP "
                   "module, or with the draft model in DIR (same tokenizer)")
    p.add_argument("--draft-k", type=int, default=4, help="tokens the draft model proposes per step")
    p.add_argument("--chat", action="store_true",
                   help="apply the tokenizer's chat template to the prompt, as one user message (instruct models)")
    p.add_argument("prompt")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="talk with a model, using its chat template")
    _sampling_args(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("info", help="architecture, parameter count, dtype, context length")
    p.add_argument("--model", required=True)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("init", help="a random-weight model from a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("train", help="train or fine-tune: ouvert train CONFIG.toml [--key value ...] [--resume]")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="--key value overrides of the config")
    p.set_defaults(func=cmd_train)
    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = tk.add_parser("train", help="train a byte-level BPE tokenizer (Llama 3 style)")
    p.add_argument("--input", nargs="+", required=True, help="text files or globs")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer_train)
    dp = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = dp.add_parser("prepare", help="tokenize a corpus into shards with a manifest (resumable)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--input", nargs="+", required=True, help="files or globs: .txt, .jsonl, .parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_data_prepare)
    p = sub.add_parser("eval", help="perplexity, multiple-choice and generative tasks; results into ouvert.json")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--task", action="append", required=True, help="a .jsonl, a .yaml/.json task spec, text files, "
                   "a shard directory, or perplexity:PATH (repeat for several)")
    p.add_argument("--num-fewshot", type=int, default=None, help="solved examples before each (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N documents (files or shards for perplexity)")
    p.add_argument("--out", help="also write the results JSON here")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per window (default: the seq_len ouvert pretrained it at, else min(context, 2048))")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: max-length / 2)")
    p.add_argument("--no-record", action="store_true", help="do not write the results into ouvert.json")
    p.add_argument("--log-samples", action="store_true", help="per-document outputs in the results JSON")
    p.set_defaults(func=cmd_eval)
    add_serve_parser(sub)
    add_export_parser(sub)
    add_quantize_parser(sub)
    add_card_parsers(sub)
    add_reproduce_parser(sub)
    _add_threads(ap)
    return ap


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """--threads on every command that runs (train has a `threads` key of its own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.add_argument("--threads", type=int, default=None,
                            help="torch threads (default: the cores this process may use, or OMP_NUM_THREADS)")
    for action in subs:
        for name, p in action.choices.items():
            if name != "train" or action.dest != "command":
                _add_threads(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_threads(getattr(args, "threads", None), warn=args.command in _COMPUTE_COMMANDS)
        args.func(args)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, FileNotFoundError) as e:  # DataError too
        print(f"ouvert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
