"""A worked task that proves SFT and GRPO on a CPU: addition (two-digit plus one-digit).

    python -m ouvert.train.arithmetic --out runs/arithmetic

writes the data (chat JSONL for SFT, prompt/answer JSONL for GRPO, held-out problems), trains a
tokenizer on it, SFTs a tiny Llama from scratch to partial accuracy, measures held-out greedy
accuracy, runs GRPO with the exact-answer and format rewards from there, and measures again.
Both runs go through the one training loop (`ouvert train` with objective sft, then grpo).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ouvert.train.loop import TrainConfig, train

MODEL = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True}


def problems(n: int, rng: random.Random, digits: tuple[int, int] = (2, 1)) -> list[dict]:
    """a + b with a of digits[0] digits and b of digits[1] (default: two-digit plus one-digit)."""
    out = []
    for _ in range(n):
        a, b = (rng.randint(10 ** (k - 1) if k > 1 else 0, 10**k - 1) for k in digits)
        out.append({"prompt": f"{a}+{b}", "answer": str(a + b)})
    return out


def write_data(out: Path, seed: int = 0, n_sft: int = 4000, n_rl: int = 2000, n_val: int = 100) -> dict[str, Path]:
    rng = random.Random(seed)
    seen: set[str] = set()
    val = []
    while len(val) < n_val:  # held-out problems never appear in training
        p = problems(1, rng)[0]
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            val.append(p)
    pool = [p for p in problems(n_sft + n_rl + n_val, rng) if p["prompt"] not in seen][: n_sft + n_rl]
    sft, rl = pool[:n_sft], pool[n_sft:]
    out.mkdir(parents=True, exist_ok=True)
    files = {"sft": out / "sft.jsonl", "rl": out / "rl.jsonl", "val": out / "val.jsonl", "text": out / "text.txt"}
    with open(files["sft"], "w") as f:
        for p in sft:
            msgs = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["answer"]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    for key, rows in (("rl", rl), ("val", val)):
        with open(files[key], "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in rows)
    files["text"].write_text("".join(f"{p['prompt']}={p['answer']}\nuser assistant\n" for p in sft))
    return files


def run(out: Path, sft_steps: int = 600, grpo_steps: int = 60, seed: int = 0, progress: bool = True) -> dict:
    from ouvert.checkpoint.hf import load_model
    from ouvert.tokenizer import load_tokenizer, train_tokenizer
    from ouvert.train.grpo import accuracy
    from ouvert.train.objectives import read_jsonl

    files = write_data(out / "data", seed)
    tok_dir = out / "tokenizer"
    train_tokenizer([files["text"]], 263, tok_dir, min_frequency=10 ** 9)  # bytes only: one digit, one token
    common = dict(seed=seed, progress=progress, log_every=10, save_every=0, sample_tokens=0, model=dict(MODEL))
    sft = TrainConfig(objective="sft", data=str(files["sft"]), tokenizer=str(tok_dir),
                      out_dir=str(out / "sft"), preset="tiny-llama", seq_len=48, batch_size=32, max_steps=sft_steps,
                      lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_every=0, **common)
    sft_ckpt = train(sft)
    tok = load_tokenizer(tok_dir)
    val = read_jsonl(files["val"], lambda r: r, [])

    def prompt_ids(e):
        return tok.apply_chat_template([{"role": "user", "content": e["prompt"]}], add_generation_prompt=True,
                                       tokenize=True)

    before = accuracy(load_model(sft_ckpt), tok, val, 8, prompt_ids)
    grpo = TrainConfig(objective="grpo", data=str(files["rl"]), val_data=str(files["val"]), init_from=str(sft_ckpt),
                       out_dir=str(out / "grpo"), batch_size=32, group_size=8, grpo_updates=2, max_steps=grpo_steps,
                       lr=1e-4, min_lr=1e-4, warmup_steps=0, schedule="constant", beta=0.02, max_new_tokens=8,
                       eval_every=max(grpo_steps // 3, 1), weight_decay=0.0, **common)
    grpo_ckpt = train(grpo)
    after = accuracy(load_model(grpo_ckpt), tok, val, 8, prompt_ids)
    result = {"held_out": len(val), "accuracy_after_sft": before, "accuracy_after_grpo": after,
              "sft_steps": sft_steps, "grpo_steps": grpo_steps}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/arithmetic")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    r = run(Path(a.out), a.sft_steps, a.grpo_steps, a.seed)
    print(f"held-out accuracy ({r['held_out']} problems): after SFT {r['accuracy_after_sft']:.1%}, "
          f"after GRPO {r['accuracy_after_grpo']:.1%}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
