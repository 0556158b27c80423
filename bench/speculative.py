"""Speculative decoding against plain greedy decoding: acceptance rate, tokens per target forward,
and wall-clock speed-up, batch 1 on CPU.

  plain        ouvert.generate, temperature 0 (prefill + one decode step per token).
  speculative  ouvert.generate.speculative.speculative_generate with the model's MTP module
               (default) or a draft model (--draft DIR, --k drafts per step), temperature 0.
               Its tokens are checked to equal plain greedy's.
With --temperature T > 0 both sample instead (seeded; the tokens then differ, the distribution not).

Ceiling beside the speed-up: tokens per target forward, what speculation would gain if drafting
cost nothing and a forward over k+1 tokens cost what a forward over one does (on a CPU at this
size neither holds; a small model's forward is bound by overheads more than by reading weights).

Prompts: random slices of one play of the Shakespeare corpus (.cache/corpus/shakespeare, the last
by name), encoded with the model directory's tokenizer; random ids when it has none. A model trained
on that corpus has seen most of these lines, which flatters acceptance. Without --model a random
tiny-deepseek model is built: its MTP module drafts almost nothing right, so the
figures show the overhead alone. Ends with one line of JSON.

    .venv/bin/python bench/speculative.py --model .cache/spec/run/step-001200
    .venv/bin/python bench/speculative.py --model TARGET --draft DRAFT --k 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import ouvert
from ouvert.generate.sampling import SamplingParams
from ouvert.generate.speculative import speculative_generate

CORPUS = Path(__file__).resolve().parent.parent / ".cache" / "corpus" / "shakespeare"


def loadavg() -> float:
    return os.getloadavg()[0]


def prompts_for(model, model_dir: str | None, n: int, length: int, seed: int) -> tuple[list[list[int]], str]:
    """n prompts of `length` tokens, and where they come from."""
    g = torch.Generator().manual_seed(seed)
    tok_dir = Path(model_dir) if model_dir else None
    files = sorted(CORPUS.glob("*.txt"))
    if tok_dir is not None and (tok_dir / "tokenizer.json").is_file() and files:
        tok = ouvert.load_tokenizer(tok_dir)
        ids = tok.encode(files[-1].read_text(encoding="utf-8"))
        starts = torch.randint(0, len(ids) - length, (n,), generator=g).tolist()
        return [ids[s : s + length] for s in starts], f"{files[-1].name}, {tok_dir.name}'s tokenizer"
    V = model.config.vocab_size
    return [torch.randint(3, V, (length,), generator=g).tolist() for _ in range(n)], "random ids"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="target checkpoint directory (default: a random tiny-deepseek)")
    ap.add_argument("--draft", help="draft model directory (default: the target's MTP module)")
    ap.add_argument("--k", type=int, default=4, help="drafts per step with --draft")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per prompt and method; the best counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = loadavg()
    if load0 > 0.5:
        print(f"warning: load average {load0:.2f}; timings are noisy", flush=True)

    if args.model:
        model = ouvert.load_model(args.model)
    else:
        model = ouvert.Transformer(ouvert.preset("tiny-deepseek"))
        model.init_weights(std=0.02, generator=torch.Generator().manual_seed(args.seed))
    model.eval()
    draft = ouvert.load_model(args.draft).eval() if args.draft else "mtp"
    k = args.k if args.draft else 1
    prompts, source = prompts_for(model, args.model, args.prompts, args.prompt_len, args.seed)

    params = SamplingParams(temperature=args.temperature, seed=args.seed, stop_token_ids=[])

    def plain(p):
        return ouvert.generate(model, p, args.new_tokens, params)[0]

    def spec(p):
        return speculative_generate(model, p, args.new_tokens, draft, params, k=k)

    plain(prompts[0][:8])  # warm up both paths
    spec(prompts[0][:8])
    rows = []
    for i, p in enumerate(prompts):
        t_plain, t_spec = [], []
        for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
            t0 = time.perf_counter()
            ref = plain(p)
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = spec(p)
            t_spec.append(time.perf_counter() - t0)
        if args.temperature == 0 and out.tokens != ref:
            raise SystemExit(f"prompt {i}: speculative greedy differs from plain greedy")
        row = dict(acceptance=out.acceptance_rate, tokens_per_forward=out.tokens_per_forward,
                   plain_tok_s=len(ref) / min(t_plain), spec_tok_s=len(out.tokens) / min(t_spec))
        row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
        rows.append(row)
        print(f"prompt {i}: acceptance {row['acceptance']:.2f}, {row['tokens_per_forward']:.2f} tokens/forward, "
              f"plain {row['plain_tok_s']:.1f} tok/s, speculative {row['spec_tok_s']:.1f} tok/s, "
              f"speed-up {row['speedup']:.2f}x (ceiling {row['tokens_per_forward']:.2f}x)", flush=True)

    mean = {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}
    result = dict(
        model=args.model or "random tiny-deepseek", drafter=args.draft or "mtp", k=k, temperature=args.temperature,
        prompts=source,
        n_prompts=len(prompts), prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=args.threads,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""), loadavg_start=load0, loadavg_end=loadavg(),
        **{f"mean_{key}": round(v, 3) for key, v in mean.items()},
    )
    print(f"mean: acceptance {mean['acceptance']:.2f}, {mean['tokens_per_forward']:.2f} tokens/forward, "
          f"speed-up {mean['speedup']:.2f}x (ceiling {mean['tokens_per_forward']:.2f}x); "
          f"load average {load0:.2f} -> {result['loadavg_end']:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
