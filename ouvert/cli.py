"""The `ouvert` command: generate, chat, info, init, train, data, serve, export, card, verify, reproduce.

Each subcommand is a thin function over the library; errors print one plain line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ouvert.card import add_card_parsers
from ouvert.checkpoint.gguf import add_export_parser
from ouvert.checkpoint.hf import DTYPES
from ouvert.generate.decode import stop_ids
from ouvert.quantize import add_quantize_parser
from ouvert.serve.cli import add_serve_parser
from ouvert.train.reproduce import add_reproduce_parser


def _load(args) -> tuple:
    from ouvert import load_model, load_tokenizer

    model = load_model(args.model, dtype=DTYPES.get(args.dtype))
    tok_dir = Path(args.tokenizer or args.model)
    if tok_dir.suffix != ".gguf" and not (tok_dir / "tokenizer.json").is_file():
        raise ValueError(f"{tok_dir}: no tokenizer.json; pass --tokenizer DIR")
    return model, load_tokenizer(tok_dir)


def _stream_reply(model, tok, ids: list[int], args) -> tuple[list[int], float]:
    """Generate from ids, printing text as it is produced; returns the new ids and tokens/s."""
    from ouvert.generate import stream

    dec = tok.stream(skip_special_tokens=True)
    new: list[int] = []
    t0 = time.perf_counter()
    for step in stream(
        model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty_=args.repetition_penalty, seed=args.seed,
        stop_token_ids=stop_ids(model, tok), compile=args.compile,
    ):
        t = step[0]
        if t is None:
            break
        new.append(t)
        print(dec.push(t), end="", flush=True)
    print(dec.flush(), flush=True)
    return new, len(new) / max(time.perf_counter() - t0, 1e-9)


def cmd_generate(args) -> None:
    model, tok = _load(args)
    ids = tok.encode(args.prompt)
    print(args.prompt, end="", flush=True)
    if args.speculative:
        new, rate = _speculative_reply(model, tok, ids, args)
    else:
        new, rate = _stream_reply(model, tok, ids, args)
    print(f"[{len(ids)} prompt tokens, {len(new)} new, {rate:.1f} tokens/s]", file=sys.stderr)


def _speculative_reply(model, tok, ids: list[int], args) -> tuple[list[int], float]:
    """As _stream_reply, drafting with the model's MTP module or a draft model (generate/speculative.py)."""
    from ouvert import load_model
    from ouvert.generate.speculative import speculative_generate

    draft = "mtp" if args.speculative == "mtp" else load_model(args.speculative, dtype=DTYPES.get(args.dtype))
    dec = tok.stream(skip_special_tokens=True)
    t0 = time.perf_counter()
    out = speculative_generate(
        model, ids, args.max_new_tokens, draft, k=args.draft_k, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop_token_ids=stop_ids(model, tok),
        on_token=lambda step: print("".join(dec.push(t) for t in step), end="", flush=True),
    )
    print(dec.flush(), flush=True)
    print(f"[speculative: {out.acceptance_rate:.0%} of drafts accepted, {out.tokens_per_forward:.2f} tokens per "
          f"forward]", file=sys.stderr)
    return out.tokens, len(out.tokens) / max(time.perf_counter() - t0, 1e-9)


def cmd_chat(args) -> None:
    model, tok = _load(args)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("ouvert chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        new, rate = _stream_reply(model, tok, ids, args)
        messages.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})
        print(f"[{rate:.1f} tokens/s]", file=sys.stderr)


def describe(model) -> list[tuple[str, str]]:
    """Rows of `ouvert info`."""
    from ouvert.quantize import describe_quantization, quantized_numel

    c = model.config
    params = sum(p.numel() for p in model.parameters()) + quantized_numel(model)  # int8 / int4: buffers
    rows = [
        ("architecture", c.model_type),
        ("parameters", f"{params:,} ({params / 1e6:.1f}M)"),
        ("dtype", str(model.embed_tokens.weight.dtype).removeprefix("torch.")),
        ("context length", f"{c.max_position_embeddings:,}"),
        ("layers", str(c.num_hidden_layers)),
        ("hidden size", str(c.hidden_size)),
        ("vocabulary", f"{c.vocab_size:,}"),
    ]
    if c.is_mla:
        q = "direct" if c.q_lora_rank is None else f"q_lora_rank {c.q_lora_rank}"
        rows.append(("attention", f"MLA, {c.num_attention_heads} heads, kv_lora_rank {c.kv_lora_rank}, {q}"))
    else:
        rows.append(("attention", f"GQA, {c.num_attention_heads} heads, {c.num_key_value_heads} KV heads, "
                                  f"head_dim {c.head_dim}"))
    if c.n_routed_experts:
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        rows.append(("experts", f"{n_moe} MoE layers: {c.n_routed_experts} routed ({c.num_experts_per_tok} active), "
                                f"{c.n_shared_experts} shared, {c.scoring_func} gating"))
    if c.rope_scaling:
        rows.append(("rope", f"theta {c.rope_theta:g}, {c.rope_scaling['rope_type']} scaling"))
    else:
        rows.append(("rope", f"theta {c.rope_theta:g}"))
    if c.num_nextn_predict_layers:
        rows.append(("mtp", f"{len(model.mtp)} module(s) loaded"))
    rows.append(("tied embeddings", str(c.tie_word_embeddings).lower()))
    quantized = describe_quantization(model)
    if quantized:
        rows.append(("quantization", quantized))
    return rows


def cmd_info(args) -> None:
    from ouvert import load_model

    model = load_model(args.model)
    rows = describe(model)
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def cmd_init(args) -> None:
    """A new model with random weights from a preset (for the demo, and to start training)."""
    from ouvert import Transformer, load_tokenizer, preset, save_model

    cfg = preset(args.preset)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but preset {args.preset} only {cfg.vocab_size}")
    model = Transformer(cfg)
    model.init_weights(std=args.init_std, generator=torch.Generator().manual_seed(args.seed))
    model.to(DTYPES[args.dtype])
    save_model(model, args.out, tokenizer=tok)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n / 1e6:.1f}M parameters, preset {args.preset})")


def cmd_train(args) -> None:
    from ouvert.train.__main__ import main as train_main

    code = train_main([args.config, *args.rest] + (["--resume"] if args.resume else []))
    if code:
        raise SystemExit(code)


def cmd_tokenizer_train(args) -> None:
    from ouvert.data import expand_inputs
    from ouvert.tokenizer import train_tokenizer

    files = expand_inputs(args.input)
    tok = train_tokenizer(files, args.vocab_size, args.out)
    print(f"wrote {args.out}: {tok.vocab_size} tokens, trained on {len(files)} file(s)")


def cmd_data_prepare(args) -> None:
    from ouvert.data import prepare

    m = prepare(args.tokenizer, args.input, args.out, val_fraction=args.val_fraction, text_field=args.text_field,
                workers=args.workers)
    for p in m["problems"]:
        print(f"warning: {p}", file=sys.stderr)
    print(f"wrote {args.out}: {m['train_tokens']:,} train and {m['val_tokens']:,} validation tokens "
          f"from {len(m['sources'])} file(s), {len(m['train'])} train shard(s)")


def cmd_eval(args) -> None:
    from ouvert.eval.run import cmd_eval as run_eval

    run_eval(args)


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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ouvert.checkpoint.hf import CheckpointError
    from ouvert.config import ConfigError
    from ouvert.tokenizer import TokenizerError

    try:
        args.func(args)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, FileNotFoundError) as e:  # DataError too
        print(f"ouvert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
