"""Evaluation: multiple choice, perplexity / bits per byte and generative tasks against references
computed here by hand (a plain transformers forward, log_softmax, greedy argmax), the verifiers,
task-file errors, and the lm-eval adapter against our own numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ouvert import ModelConfig, Transformer, load_tokenizer, save_model
from ouvert.cli import main as cli_main
from ouvert.eval import EvalConfig, TaskError, load_task, run
from ouvert.eval.score import windows
from ouvert.eval.verify import exact_match, last_number, normalize_answer, numeric_match

MC = [
    {"context": "The king said to the queen", "choices": ["good night", "my lord", "café"], "label": 1},
    {"context": "To be, or not to be:", "choices": ["that is the question", "no", "yes indeed"], "label": 0},
    {"context": "O Romeo, Romeo,", "choices": [" wherefore art thou", "Romeo", "where"], "label": 0},
    {"context": "Now is the winter of our", "choices": ["discontent", "summer", "night and day"], "label": 0},
    {"context": "Friends, Romans, countrymen, ", "choices": ["lend me your ears", "go", "run away"], "label": 0},
    {"context": "A horse! a horse!", "choices": ["my kingdom", "for a horse", "the end"], "label": 2},
]

PROMPTS = ["Question: who is the prince of Denmark?\nAnswer:", "Q: what is the moon made of?\nA:", "Say:"]
TEXTS = ["Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day. " * 3,  # 123 tokens
         "Is this a dagger which I see before me?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_tokenizer):
    """A tiny random Llama saved with the corpus tokenizer (the fixtures' tiny_ckpt has no tokenizer)."""
    tok = load_tokenizer(corpus_tokenizer)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Transformer(cfg)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("eval") / "tiny"
    save_model(model, out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def ref(model_dir):
    """The reference: transformers' own Llama on the same checkpoint, and the tokenizer."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), load_tokenizer(model_dir)


@torch.no_grad()
def ref_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded sequence."""
    logits = hf(torch.tensor([ids[:-1]])).logits[0].float()
    return F.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(model_dir, *tasks, **kw) -> EvalConfig:
    return EvalConfig(model=str(model_dir), tasks=[str(t) for t in tasks], device="cpu", batch_size=4, **kw)


def test_multiple_choice_matches_hand_computed_loglikelihoods(model_dir, ref, tmp_path):
    hf, tok = ref
    task = write_jsonl(tmp_path / "mc.jsonl", MC)
    res = run(cfg(model_dir, task, log_samples=True))["results"]["mc"]
    # By hand, lm-eval's rule: move the context's trailing spaces to the continuation, encode the whole
    # (context + " " + choice), split at the context's own length, BOS in front.
    acc = acc_norm = acc_bytes = 0
    all_lls = []
    for d in MC:
        ctx, lls = d["context"], []
        ctx_ids = tok.encode(ctx.rstrip(), add_special_tokens=False)
        for c in d["choices"]:
            whole = tok.encode(ctx + " " + c, add_special_tokens=False)
            n = len(whole) - len(ctx_ids)
            lls.append(ref_logprobs(hf, [tok.bos_token_id, *whole])[-n:].sum().item())
        all_lls.append(lls)
        best = max(range(len(lls)), key=lambda i: lls[i])
        acc += best == d["label"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(d["choices"][i])) == d["label"]
        acc_bytes += max(range(len(lls)), key=lambda i: lls[i] / len(d["choices"][i].encode())) == d["label"]
    assert res["acc"] == acc / len(MC)
    assert res["acc_norm"] == acc_norm / len(MC)
    assert res["acc_bytes"] == acc_bytes / len(MC)
    assert res["n"] == len(MC)
    got = run(cfg(model_dir, task, log_samples=True, record=False))["samples"]["mc"]
    for s, lls in zip(got, all_lls):
        assert s["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
    # recorded in the checkpoint's provenance
    record = json.loads((model_dir / "ouvert.json").read_text())
    assert record["eval"]["mc"]["acc"] == res["acc"]


def test_fewshot_prefix(tmp_path):
    task = load_task(str(write_jsonl(tmp_path / "mc.jsonl", MC)), num_fewshot=2)
    for i in range(len(MC)):
        prefix = task.fewshot_prefix(i)
        shots = prefix.split("\n\n")[:-1]
        assert len(shots) == 2 and prefix.endswith("\n\n")
        assert not any(s.startswith(MC[i]["context"] + " ") for s in shots)  # never the scored document
        for s in shots:
            d = next(d for d in MC if s.startswith(d["context"] + " "))
            assert s == d["context"] + " " + d["choices"][d["label"]]
        assert prefix == task.fewshot_prefix(i)  # seeded
    assert len({task.fewshot_prefix(i) for i in range(len(MC))}) > 1
    with pytest.raises(TaskError, match="6-shot needs 7 documents, the file has 6"):
        load_task(str(tmp_path / "mc.jsonl"), num_fewshot=6).fewshot_prefix(0)


def test_cli_limit_and_fewshot(model_dir, tmp_path, capsys):
    task = write_jsonl(tmp_path / "mc1.jsonl", MC)
    out = tmp_path / "r.json"
    assert cli_main(["eval", "--model", str(model_dir), "--task", str(task), "--device", "cpu", "--limit", "3",
                     "--num-fewshot", "1", "--out", str(out), "--log-samples"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["task", "metric", "value", "n"] and json.loads(printed[-1]) == json.loads(
        out.read_text())
    res = json.loads(out.read_text())
    assert res["results"]["mc1"]["n"] == 3 and res["results"]["mc1"]["num_fewshot"] == 1
    zero = run(cfg(model_dir, task, limit=3, log_samples=True, record=False))["samples"]["mc1"]
    assert [s["loglikelihoods"] for s in res["samples"]["mc1"]] != [s["loglikelihoods"] for s in zero]
    recorded = json.loads((model_dir / "ouvert.json").read_text())["eval"]["mc1"]
    assert recorded["num_fewshot"] == 1 and recorded["acc"] == res["results"]["mc1"]["acc"]
    assert cli_main(["eval", "--model", str(model_dir), "--task", str(task), "--limit", "0"]) == 2


def test_perplexity_on_text_matches_hand_computed(model_dir, ref, tmp_path):
    hf, tok = ref
    text = "Good night, good night! Parting is such sweet sorrow. — Juliet\n"
    f = tmp_path / "juliet.txt"
    f.write_text(text, encoding="utf-8")
    ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
    assert len(ids) <= 96  # one window
    nll = -ref_logprobs(hf, ids).sum().item()
    out = tmp_path / "res.json"
    assert cli_main(["eval", "--model", str(model_dir), "--task", f"perplexity:{f}", "--device", "cpu",
                     "--out", str(out), "--no-record"]) == 0
    m = json.loads(out.read_text())["results"]["perplexity/juliet"]
    assert m["tokens"] == len(ids) - 1 and m["bytes"] == len(text.encode("utf-8"))
    assert m["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)


def test_perplexity_strided_windows(model_dir, ref, tmp_path):
    """A text longer than the window: with stride 1 every token sees the full window before it."""
    from lm_eval.utils import get_rolling_token_windows

    hf, tok = ref
    # windows: each target once; stride == window reproduces lm-eval's rolling windows
    for n, L, S in [(10, 4, 4), (10, 4, 1), (9, 4, 3), (3, 8, 2), (8, 8, 8)]:
        w = windows(n, L, S)
        targets = [t for _, end, new in w for t in range(end - new + 1, end + 1)]
        assert targets == list(range(1, n + 1))
        assert all(end - start <= L for start, end, _ in w)
        if S == L:
            s = list(range(n + 1))
            ours = [(s[a:e], s[e - new + 1 : e + 1]) for a, e, new in w]
            assert ours == [tuple(x) for x in get_rolling_token_windows(s[1:], 0, L, 1)]
    f = tmp_path / "long.txt"
    f.write_text(TEXTS[0])
    ids = [tok.bos_token_id, *tok.encode(f.read_text(), add_special_tokens=False)]
    L = 16
    nll = 0.0
    for t in range(1, len(ids)):  # by hand: token t after the (up to) L tokens before it
        nll -= ref_logprobs(hf, ids[max(0, t - L) : t + 1])[-1].item()
    m = run(cfg(model_dir, f"perplexity:{f}", max_length=L, stride=1, record=False))["results"]["perplexity/long"]
    assert m["tokens"] == len(ids) - 1 > 3 * L
    assert m["nll_per_token"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


def test_perplexity_on_shards(model_dir, ref, tmp_path, corpus_tokenizer, llama3_tokenizer_dir):
    from ouvert.data import prepare

    hf, tok = ref
    text = "Out, out, brief candle!\nLife's but a walking shadow.\n"
    (tmp_path / "src.txt").write_text(text)
    prepare(corpus_tokenizer, [str(tmp_path / "src.txt")], tmp_path / "shards", workers=1)
    m = run(cfg(model_dir, tmp_path / "shards", record=False))["results"]["perplexity/shards"]
    ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    nll = -ref_logprobs(hf, ids).sum().item()
    assert m["tokens"] == len(ids) - 1 and m["bytes"] == len(text.encode())
    assert m["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    with pytest.raises(TaskError, match="shards were made with another tokenizer"):
        run(cfg(model_dir, tmp_path / "shards", tokenizer=str(llama3_tokenizer_dir), record=False))


def test_verifiers():
    assert normalize_answer("  The Quick, brown fox!  ") == "quick brown fox"
    assert exact_match("the Eiffel Tower.", "Eiffel tower")
    assert not exact_match("Eiffel", "Eiffel tower")
    assert exact_match("An apple", "apple") and not exact_match("pineapple", "apple")
    assert last_number("3 apples and 1,234.5 pears") == 1234.5
    assert last_number("it is -7.") == -7.0 and last_number("none") is None
    assert numeric_match("so 12 + 30 = 42", "42") and numeric_match("42.0", 42)
    assert numeric_match("The answer is 1,000", "#### 1000")
    assert not numeric_match("41", "42") and not numeric_match("forty-two", "42")


@torch.no_grad()
def ref_greedy(hf, tok, prompt: str, max_new: int) -> str:
    """Greedy decoding by full recompute, stopping at EOS or a blank line."""
    ids = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]
    new: list[int] = []
    for _ in range(max_new):
        t = int(hf(torch.tensor([ids + new])).logits[0, -1].argmax())
        if t in tok.stop_token_ids:
            break
        new.append(t)
        text = tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
        if "\n\n" in text:
            break
    text = tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    return text.split("\n\n")[0]


def test_generative_task_end_to_end(model_dir, ref, tmp_path):
    hf, tok = ref
    outs = [ref_greedy(hf, tok, p, 8) for p in PROMPTS]
    assert any(normalize_answer(o) for o in outs)  # the tiny model says something
    # The first answer is what the model says, the third one differs only in case, articles and punctuation,
    # the second one is wrong: 2 of 3 correct.
    rows = [{"prompt": PROMPTS[0], "answer": outs[0]}, {"prompt": PROMPTS[1], "answer": outs[1] + " zebra"},
            {"prompt": PROMPTS[2], "answer": "The " + outs[2].upper() + "!"}]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    (tmp_path / "gen.yaml").write_text("name: gen3\npath: gen.jsonl\nmax_new_tokens: 8\nstop: [\"\\n\\n\"]\n")
    res = run(cfg(model_dir, tmp_path / "gen.yaml", log_samples=True, record=False))
    assert [s["output"] for s in res["samples"]["gen3"]] == outs
    assert res["results"]["gen3"]["exact_match"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("line, message", [
    ({"context": "a", "choices": ["x", "y"]}, "bad.jsonl:2: missing field 'label'"),
    ({"context": "a", "choices": ["x", "y"], "label": 5}, "bad.jsonl:2: field 'label' is 5"),
    ({"context": "a", "choices": "xy", "label": 0}, "bad.jsonl:2: field 'choices' has the wrong type"),
])
def test_bad_task_file_names_file_line_field(tmp_path, line, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [MC[0], line])
    with pytest.raises(TaskError, match=message):
        load_task(str(f))


def test_bad_task_errors_from_the_cli(model_dir, tmp_path, capsys):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3="}])
    assert cli_main(["eval", "--model", str(model_dir), "--task", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}:2: missing field 'answer'" in err
    (tmp_path / "spec.json").write_text(json.dumps({"path": "bad.jsonl", "shots": 3}))
    assert cli_main(["eval", "--model", str(model_dir), "--task", str(tmp_path / "spec.json")]) == 2
    assert "spec.json: unknown field 'shots'" in capsys.readouterr().err
    (tmp_path / "spec.json").write_text(json.dumps({"path": "missing.jsonl"}))
    with pytest.raises(TaskError, match="spec.json: field 'path' names .*missing.jsonl, which does not exist"):
        load_task(str(tmp_path / "spec.json"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(TaskError, match="latin1.jsonl:2: not UTF-8"):
        load_task(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "odd.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(TaskError, match="odd.jsonl:1: cannot tell the task kind"):
        load_task(str(tmp_path / "odd.jsonl"))


def lm_eval_task(name: str, data, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


def test_lm_eval_adapter_matches_ours(model_dir, tmp_path):
    """lm_eval's own command, offline, on local YAML tasks of all three request types: the same
    log-likelihoods, accuracies, bits per byte and generated text as `ouvert eval`."""
    pytest.importorskip("lm_eval")
    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS])
    ppl = write_jsonl(tmp_path / "ppl.jsonl", [{"text": t} for t in TEXTS])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(lm_eval_task("tiny_mc", mc, (
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n')))
    (tasks / "tiny_gen.yaml").write_text(lm_eval_task("tiny_gen", gen, (
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")))
    (tasks / "tiny_ppl.yaml").write_text(lm_eval_task("tiny_ppl", ppl, (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n")))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [sys.executable, "-m", "ouvert.eval.lm_eval", "--model", "ouvert", "--model_args", f"path={model_dir}",
         "--device", "cpu", "--tasks", "tiny_mc,tiny_gen,tiny_ppl", "--include_path", str(tasks),
         "--batch_size", "4", "--output_path", str(out), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]

    def their_samples(task):
        rows = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        return sorted(rows, key=lambda s: s["doc_id"])

    res = run(cfg(model_dir, mc, log_samples=True, record=False))
    ours = res["results"]["mc"]
    for s in their_samples("tiny_mc"):  # the same log-likelihoods, choice by choice
        theirs_ll = [float(r[0]) for r in s["filtered_resps"]]
        assert theirs_ll == pytest.approx(res["samples"]["mc"][s["doc_id"]]["loglikelihoods"], abs=1e-4)
    for m in ("acc", "acc_norm", "acc_bytes"):
        assert theirs["tiny_mc"][f"{m},none"] == ours[m]

    gen_spec = tmp_path / "gen.json"
    gen_spec.write_text(json.dumps({"path": "gen.jsonl", "max_new_tokens": 8}))
    res = run(cfg(model_dir, gen_spec, log_samples=True, record=False))
    assert [s["filtered_resps"][0] for s in their_samples("tiny_gen")] == [s["output"] for s in res["samples"]["gen"]]

    files = []
    for i, t in enumerate(TEXTS):
        (tmp_path / f"text{i}.txt").write_text(t)
        files.append(tmp_path / f"text{i}.txt")
    # lm-eval's rolling windows are disjoint: stride = window
    m = run(cfg(model_dir, f"perplexity:{tmp_path}/text*.txt", stride=96, record=False))["results"]
    assert m["perplexity/text*"]["bits_per_byte"] == pytest.approx(theirs["tiny_ppl"]["bits_per_byte,none"], rel=1e-5)
