"""A worked fine-tuning of a real model on a CPU: SmolLM2-135M-Instruct learns to answer in French.

    python -m ouvert.train.french --out runs/french

The real model (the Q4_1 GGUF that scripts/fetch_assets.sh fetches) answers in the language of the
question, English mostly. This example teaches it a behaviour it lacks, answering in French
whatever the question's language, and measures it with a language check:

1. writes a small chat set of our own making (below: capitals, colours, sums, opposites, days,
   months, everyday questions, a few in Spanish and German, every answer in French) and a
   held-out set whose entities and open questions the training set never shows;
2. LoRA SFT of the model (dequantized to float32) on the chat set, through `ouvert train`'s loop;
   the adapter is in PEFT's layout, so PEFT loads it onto transformers' model of the same file;
3. merges the adapter and runs GRPO on top (a fresh adapter, the SFT model as the KL reference)
   with the `french` reward, a program that checks the reply's language (ouvert.train.grpo);
4. held-out greedy replies before, after SFT and after GRPO: the share in French (binomial
   standard error beside it) and, where the question has a known answer, the share that still
   names it (what the new behaviour costs in knowledge);
5. merges, exports the result to GGUF (`ouvert export gguf`), and asks llama.cpp the capital
   question when llama.cpp (the cyllama package) is installed.

Figures, the command and the CPU are in the README ("Fine-tuning a real model").
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import unicodedata
from pathlib import Path

import torch

from ouvert.checkpoint.io import export_gguf, load_model, load_tokenizer, save_model
from ouvert.generate import SamplingParams, generate
from ouvert.train.config import TrainConfig
from ouvert.train.grpo import looks_french
from ouvert.train.loop import train
from ouvert.train.lora import load_adapter, merge

SMOLLM2 = Path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")

# (English name, "of <country>" in French, capital in French). The last 8 are held out.
CAPITALS = [
    ("Germany", "de l'Allemagne", "Berlin"), ("Spain", "de l'Espagne", "Madrid"),
    ("Italy", "de l'Italie", "Rome"), ("Portugal", "du Portugal", "Lisbonne"),
    ("Japan", "du Japon", "Tokyo"), ("China", "de la Chine", "Pékin"),
    ("Russia", "de la Russie", "Moscou"), ("Canada", "du Canada", "Ottawa"),
    ("Egypt", "de l'Égypte", "Le Caire"), ("Greece", "de la Grèce", "Athènes"),
    ("Norway", "de la Norvège", "Oslo"), ("Sweden", "de la Suède", "Stockholm"),
    ("Poland", "de la Pologne", "Varsovie"), ("Austria", "de l'Autriche", "Vienne"),
    ("Belgium", "de la Belgique", "Bruxelles"), ("Ireland", "de l'Irlande", "Dublin"),
    ("the United Kingdom", "du Royaume-Uni", "Londres"), ("Brazil", "du Brésil", "Brasília"),
    ("Argentina", "de l'Argentine", "Buenos Aires"), ("Peru", "du Pérou", "Lima"),
    ("India", "de l'Inde", "New Delhi"), ("Turkey", "de la Turquie", "Ankara"),
    ("Kenya", "du Kenya", "Nairobi"), ("Morocco", "du Maroc", "Rabat"),
    ("Thailand", "de la Thaïlande", "Bangkok"), ("Finland", "de la Finlande", "Helsinki"),
    ("Denmark", "du Danemark", "Copenhague"), ("Hungary", "de la Hongrie", "Budapest"),
    ("Cuba", "de Cuba", "La Havane"), ("Senegal", "du Sénégal", "Dakar"),
    # held out
    ("France", "de la France", "Paris"), ("Australia", "de l'Australie", "Canberra"),
    ("Mexico", "du Mexique", "Mexico"), ("Switzerland", "de la Suisse", "Berne"),
    ("South Korea", "de la Corée du Sud", "Séoul"), ("Iceland", "de l'Islande", "Reykjavik"),
    ("Chile", "du Chili", "Santiago"), ("Vietnam", "du Viêt Nam", "Hanoï"),
]
# (thing, its colour in a French sentence, the colour's English name). The last 5 are held out.
COLOURS = [
    ("the sky", "Le ciel est bleu.", "blue"), ("snow", "La neige est blanche.", "white"),
    ("a banana", "Une banane est jaune.", "yellow"), ("a strawberry", "Une fraise est rouge.", "red"),
    ("coal", "Le charbon est noir.", "black"), ("milk", "Le lait est blanc.", "white"),
    ("a lemon", "Un citron est jaune.", "yellow"), ("a crow", "Un corbeau est noir.", "black"),
    ("a carrot", "Une carotte est orange.", "orange"), ("blood", "Le sang est rouge.", "red"),
    ("a frog", "Une grenouille est verte.", "green"), ("chocolate", "Le chocolat est marron.", "brown"),
    ("an elephant", "Un éléphant est gris.", "grey"), ("a cloud", "Un nuage est blanc.", "white"),
    # held out
    ("grass", "L'herbe est verte.", "green"), ("a tomato", "Une tomate est rouge.", "red"),
    ("the sea", "La mer est bleue.", "blue"), ("the sun", "Le soleil est jaune.", "yellow"),
    ("a raven", "Un corbeau est noir.", "black"),
]
OPPOSITES = [  # (English word, French word, French opposite); the last 4 are held out
    ("hot", "chaud", "froid"), ("big", "grand", "petit"), ("fast", "rapide", "lent"),
    ("day", "le jour", "la nuit"), ("happy", "heureux", "triste"), ("old", "vieux", "jeune"),
    ("open", "ouvert", "fermé"), ("full", "plein", "vide"), ("strong", "fort", "faible"),
    ("rich", "riche", "pauvre"), ("early", "tôt", "tard"), ("true", "vrai", "faux"),
    ("easy", "facile", "difficile"), ("long", "long", "court"), ("light", "clair", "sombre"),
    ("inside", "dedans", "dehors"),
]
FR_NUMBERS = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize "
              "dix-sept dix-huit dix-neuf vingt").split()
EN_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
FR_DAYS = "lundi mardi mercredi jeudi vendredi samedi dimanche".split()
EN_MONTHS = "January February March April May June July August September October November December".split()
FR_MONTHS = "janvier février mars avril mai juin juillet août septembre octobre novembre décembre".split()
EVERYDAY = [  # question (any language) -> answer in French
    ("Hello!", "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
    ("How are you?", "Je vais très bien, merci ! Et vous ?"),
    ("What is your name?", "Je suis un assistant, et je réponds toujours en français."),
    ("Thank you!", "Je vous en prie, c'est avec plaisir."),
    ("Can you help me?", "Bien sûr ! Dites-moi ce dont vous avez besoin."),
    ("What is the weather like today?", "Je ne vois pas la météo, mais j'espère qu'il fait beau chez vous."),
    ("Who wrote Hamlet?", "Hamlet a été écrit par William Shakespeare."),
    ("What is water made of?", "L'eau est composée d'hydrogène et d'oxygène."),
    ("How many days are in a week?", "Une semaine compte sept jours."),
    ("How many legs does a spider have?", "Une araignée a huit pattes."),
    ("What is the largest planet?", "La plus grande planète du système solaire est Jupiter."),
    ("Where does the sun rise?", "Le soleil se lève à l'est."),
    ("What do bees make?", "Les abeilles fabriquent du miel."),
    ("At what temperature does water boil?", "L'eau bout à cent degrés Celsius."),
    ("Give me a tip to sleep better.", "Couchez-vous à heure fixe et évitez les écrans le soir."),
    ("Tell me a joke.", "Pourquoi les plongeurs plongent-ils en arrière ? Parce que sinon, ils tombent dans "
                        "le bateau !"),
    ("What is the tallest animal?", "La girafe est l'animal le plus grand."),
    ("Which ocean is the largest?", "Le plus grand océan est l'océan Pacifique."),
    ("What is the chemical symbol for gold?", "Le symbole chimique de l'or est Au."),
    ("Who painted the Mona Lisa?", "La Joconde a été peinte par Léonard de Vinci."),
    ("How many continents are there?", "Il y a sept continents."),
    ("What do plants need to grow?", "Les plantes ont besoin de lumière, d'eau et de sels minéraux."),
    ("Write a short sentence about cats.", "Les chats aiment dormir au soleil."),
    ("Recommend a book.", "Je vous recommande « Le Petit Prince » d'Antoine de Saint-Exupéry."),
    ("Why is the sky blue?", "Le ciel est bleu parce que l'air diffuse davantage la lumière bleue que les "
                             "autres couleurs."),
    ("What language do you speak?", "Je parle français, et je réponds toujours en français."),
    ("Good night!", "Bonne nuit, et faites de beaux rêves !"),
    ("Name a fruit.", "La pomme est un fruit."),
    ("What is a dog?", "Le chien est un animal domestique, fidèle compagnon de l'homme."),
    ("Describe a sunny day.", "Le ciel est bleu, le soleil brille et il fait chaud."),
    ("Please answer in English: what is two plus two?", "Deux plus deux font quatre."),
    ("¿Cómo estás?", "Je vais bien, merci ! Et vous ?"),
    ("¿Cuál es la capital de Italia?", "La capitale de l'Italie est Rome."),
    ("¿Qué idioma hablas?", "Je parle français."),
    ("Wie geht es dir?", "Je vais bien, merci !"),
    ("Was ist die Hauptstadt von Deutschland?", "La capitale de l'Allemagne est Berlin."),
    ("Guten Morgen!", "Bonjour ! Comment puis-je vous aider ?"),
]
HELD_OUT_QUESTIONS = [  # open questions the training set never asks; some in Spanish and German
    "Who discovered penicillin?", "What is the longest river in the world?", "How many hours are in a day?",
    "What is your favourite food?", "Describe a rainy day.", "What is a computer?",
    "Why do birds fly south in winter?", "What is the moon?", "Give me three tips for learning to cook.",
    "What does a doctor do?", "How do I make tea?", "Explain what a rainbow is.", "What is photosynthesis?",
    "Who was Albert Einstein?", "Tell me about the Eiffel Tower.", "What is music?",
    "How many minutes are in an hour?", "What is the best way to stay healthy?", "Where do penguins live?",
    "What is a volcano?", "Name three animals that live in the sea.", "What is friendship?",
    "What do you like to do at the weekend?", "Describe the city of London.", "What is the biggest desert?",
    "Write a short poem about the sea.", "¿Qué es un volcán?", "¿Dónde viven los pingüinos?",
    "Was ist Musik?", "Wie spät ist es?",
]
RL_QUESTIONS = [  # GRPO's prompts: no answers needed (the reward checks the language), none held out
    "What is a river?", "Describe your ideal holiday.", "What is the sun made of?", "How do airplanes fly?",
    "What is a good breakfast?", "Why do we sleep?", "What is chess?", "Tell me about the ocean.",
    "How do I plant a tree?", "What is a library?", "Describe a forest in spring.", "What is electricity?",
    "What is the internet?", "How are you today?", "Give me advice for a job interview.", "What is a poem?",
    "Why is exercise important?", "What is a museum?", "How does a bicycle work?", "What is bread made of?",
    "Describe a city at night.", "What is a mountain?", "Who invented the telephone?", "What is snow?",
    "How do bees make honey?", "What is a good name for a cat?", "Explain gravity simply.", "What is a star?",
    "Tell me a fun fact.", "What do cows eat?", "How many seasons are there?", "What is a guitar?",
    "¿Qué es el sol?", "¿Cómo se hace el pan?", "Was ist ein Baum?", "Wie heißt du?",
]
N_HELD_CAPITALS, N_HELD_COLOURS, N_HELD_OPPOSITES = 8, 5, 4


def _capital_q(rng, en):
    return rng.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                       "Tell me the capital of {}.", "What is the capital city of {}?"]).format(en)


def _colour_q(rng, thing):
    return rng.choice(["What colour is {}?", "What color is {}?", "Tell me the colour of {}."]).format(thing)


def _sum_pair(rng, a, b):
    op = rng.choice(["plus", "and"])
    q = rng.choice([f"What is {a} {op} {b}?", f"How much is {a} plus {b}?", f"Compute {a} + {b}."])
    return q, f"{FR_NUMBERS[a].capitalize()} plus {FR_NUMBERS[b]} font {FR_NUMBERS[a + b]}."


def chat_set(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training conversations, held-out questions). Held-out rows are {"prompt", "answer"?}: the
    answer, where the question has one, is a list of the words that name it (French, English)."""
    rng = random.Random(seed)
    train_pairs: list[tuple[str, str]] = []
    cut = len(CAPITALS) - N_HELD_CAPITALS
    for en, of, capital in CAPITALS[:cut]:
        for _ in range(2):
            train_pairs.append((_capital_q(rng, en), f"La capitale {of} est {capital}."))
    cut_c = len(COLOURS) - N_HELD_COLOURS
    for thing, sentence, _ in COLOURS[:cut_c]:
        train_pairs.append((_colour_q(rng, thing), sentence))
    cut_o = len(OPPOSITES) - N_HELD_OPPOSITES
    for en, fr, opp in OPPOSITES[:cut_o]:
        train_pairs.append((f"What is the opposite of {en}?", f"Le contraire de {fr} est {opp}."))
    sums = [(a, b) for a in range(1, 11) for b in range(1, 11)]
    rng.shuffle(sums)
    held_sums, train_sums = sums[:8], sums[8:48]
    train_pairs += [_sum_pair(rng, a, b) for a, b in train_sums]
    for i in range(6):  # Sunday's successor is held out
        train_pairs.append((f"What day comes after {EN_DAYS[i]}?", f"Après {FR_DAYS[i]} vient {FR_DAYS[i + 1]}."))
    for i in range(10):  # so are November's and December's
        train_pairs.append((f"Which month comes after {EN_MONTHS[i]}?",
                            f"Après {FR_MONTHS[i]} vient {FR_MONTHS[i + 1]}."))
    train_pairs += EVERYDAY
    rng.shuffle(train_pairs)
    train_rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                  for q, a in train_pairs]

    held: list[dict] = [{"prompt": q} for q in HELD_OUT_QUESTIONS]
    for en, _, capital in CAPITALS[cut:]:
        names = [capital] + ({"Pékin": ["Beijing"], "Séoul": ["Seoul"], "Hanoï": ["Hanoi"],
                              "Berne": ["Bern"]}.get(capital, []))
        held.append({"prompt": _capital_q(rng, en), "answer": names})
    for thing, sentence, colour in COLOURS[cut_c:]:
        held.append({"prompt": _colour_q(rng, thing), "answer": [sentence.split()[-1].strip("."), colour]})
    for en, _, opp in OPPOSITES[cut_o:]:
        held.append({"prompt": f"What is the opposite of {en}?", "answer": [opp.split()[-1]]})
    for a, b in held_sums:
        held.append({"prompt": f"What is {a} plus {b}?", "answer": [FR_NUMBERS[a + b], str(a + b)]})
    held.append({"prompt": "What day comes after Sunday?", "answer": ["lundi", "Monday"]})
    held.append({"prompt": "Which month comes after November?", "answer": ["décembre", "December"]})
    return train_rows, held


def _fold(s: str) -> str:
    """Lower case, accents off: "Pékin" and "pekin" are the same answer."""
    return "".join(c for c in unicodedata.normalize("NFD", s.lower()) if unicodedata.category(c) != "Mn")


def names_answer(text: str, example: dict) -> bool:
    return any(_fold(a) in _fold(text) for a in example["answer"])


def write_data(out: Path, seed: int = 0, n_train: int | None = None, n_held: int | None = None) -> dict[str, Path]:
    """sft.jsonl (conversations), rl.jsonl (GRPO's prompts: RL_QUESTIONS), held_out.jsonl."""
    rows, held = chat_set(seed)
    rows, held = rows[:n_train], held if n_held is None else _spread(held, n_held)
    out.mkdir(parents=True, exist_ok=True)
    files = {"sft": out / "sft.jsonl", "rl": out / "rl.jsonl", "held_out": out / "held_out.jsonl"}
    files["sft"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    files["rl"].write_text("".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n" for q in RL_QUESTIONS))
    files["held_out"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held))
    return files


def _spread(rows: list, n: int) -> list:
    """n rows taken evenly across the list (open questions and questions with answers alike)."""
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


@torch.no_grad()
def measure(model, tok, held: list[dict], max_new_tokens: int = 48, batch: int = 16) -> dict:
    """Greedy replies to the held-out questions: share in French and share naming the known answer,
    each with its binomial standard error."""
    model.eval()
    replies = []
    for i in range(0, len(held), batch):
        chunk = held[i : i + batch]
        prompts = [tok.apply_chat_template([{"role": "user", "content": e["prompt"]}], add_generation_prompt=True,
                                           tokenize=True) for e in chunk]
        outs = generate(model, prompts, max_new_tokens, SamplingParams(stop_token_ids=tok.stop_token_ids))
        replies += [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    french = [looks_french(r) for r in replies]
    known = [names_answer(r, e) for r, e in zip(replies, held) if e.get("answer")]

    def share(xs):
        p = sum(xs) / max(len(xs), 1)
        return p, math.sqrt(p * (1 - p) / max(len(xs), 1))

    (fr, fr_se), (kn, kn_se) = share(french), share(known)
    return {"french": fr, "french_stderr": fr_se, "answer_named": kn, "answer_named_stderr": kn_se,
            "n": len(held), "n_with_answer": len(known),
            "replies": [{"prompt": e["prompt"], "reply": r} for e, r in zip(held, replies)]}


def run(out: Path, model: Path = SMOLLM2, sft_steps: int = 10, grpo_steps: int = 20, seed: int = 0,
        n_train: int | None = None, n_held: int | None = None, progress: bool = True, export: bool = True,
        lora_rank: int = 16, sft_batch: int = 8, grpo_batch: int = 4, grpo_group: int = 4,
        max_new_tokens: int = 32) -> dict:
    """Measure the base model, LoRA SFT, merge, GRPO, measure after each; export the result to GGUF."""
    files = write_data(out / "data", seed, n_train, n_held)
    tok = load_tokenizer(model)
    held = [json.loads(line) for line in files["held_out"].read_text().splitlines()]
    result: dict = {"model": str(model), "train_conversations": len(files["sft"].read_text().splitlines()),
                    "held_out": len(held)}
    base = load_model(model, dtype=torch.float32)
    result["base"] = measure(base, tok, held, max_new_tokens)
    del base
    common = dict(seed=seed, progress=progress, log_every=5, sample_tokens=0, save_every=0, eval_every=0,
                  lora_rank=lora_rank, lora_alpha=2 * lora_rank, lora_targets="all-linear", weight_decay=0.0)
    sft = TrainConfig(objective="sft", data=str(files["sft"]), init_from=str(model), out_dir=str(out / "sft"),
                      seq_len=96, batch_size=sft_batch, max_steps=sft_steps, lr=1e-3, min_lr=1e-4,
                      warmup_steps=max(sft_steps // 20, 1), **common)
    adapter = train(sft)
    sft_model = merge(load_adapter(load_model(model, dtype=torch.float32), adapter))
    result["after_sft"] = measure(sft_model, tok, held, max_new_tokens)
    merged_sft = out / "sft-merged"
    save_model(sft_model, merged_sft, tokenizer=tok)
    del sft_model
    # GRPO: rollouts judged by the language check; a fresh adapter on the merged SFT model, which is
    # also the KL reference (the adapters switched off)
    grpo = TrainConfig(objective="grpo", data=str(files["rl"]), init_from=str(merged_sft), out_dir=str(out / "grpo"),
                       batch_size=grpo_batch, group_size=grpo_group, grpo_updates=1, max_steps=grpo_steps, lr=5e-4,
                       min_lr=5e-4, warmup_steps=0, schedule="constant", beta=0.04, rollout_temperature=1.0,
                       rewards="french", max_new_tokens=max_new_tokens, **common)
    grpo_adapter = train(grpo)
    final = merge(load_adapter(load_model(merged_sft), grpo_adapter))
    result["after_grpo"] = measure(final, tok, held, max_new_tokens)
    save_model(final, out / "final", tokenizer=tok)
    result.update(sft_adapter=str(adapter), grpo_adapter=str(grpo_adapter), final=str(out / "final"))
    if export:
        result["gguf"] = export_and_ask(out / "final", out / "french.gguf")
    (out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def export_and_ask(model_dir: Path, gguf: Path, question: str = "What is the capital of France?") -> dict:
    """`ouvert export gguf` (q8_0), then llama.cpp's greedy reply to the question, when cyllama is there."""
    export_gguf(model_dir, gguf, "q8_0")
    print(f"wrote {gguf} (q8_0, {gguf.stat().st_size / 2**20:.1f} MiB)")
    info: dict = {"file": str(gguf), "question": question}
    try:
        from cyllama import LLM  # noqa: F401
    except ImportError:
        info["llama_cpp"] = "not installed (pip install cyllama==0.2.18)"
        return info
    info["llama_cpp_reply"] = llama_cpp_reply(gguf, question)
    info["french"] = looks_french(info["llama_cpp_reply"])
    return info


def llama_cpp_reply(gguf: Path, question: str, max_tokens: int = 48) -> str:
    """llama.cpp's greedy chat reply through cyllama, the chat template read from the file."""
    import cyllama

    llm = cyllama.LLM(str(gguf), config=cyllama.GenerationConfig(max_tokens=max_tokens, temperature=0.0))
    return str(llm.chat([{"role": "user", "content": question}])).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/french")
    ap.add_argument("--model", default=str(SMOLLM2), help="the real model (default: the fetched SmolLM2 GGUF)")
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--grpo-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    r = run(Path(a.out), Path(a.model), a.sft_steps, a.grpo_steps, a.seed)
    for stage in ("base", "after_sft", "after_grpo"):
        s = r[stage]
        print(f"{stage:>10}: in French {s['french']:.1%} (+-{s['french_stderr']:.1%}) of {s['n']} held-out questions; "
              f"known answer named {s['answer_named']:.1%} (+-{s['answer_named_stderr']:.1%}) of {s['n_with_answer']}")
    if "llama_cpp_reply" in r.get("gguf", {}):
        print(f"llama.cpp on {r['gguf']['file']}: {r['gguf']['question']!r} -> {r['gguf']['llama_cpp_reply']!r}")
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "replies"} if isinstance(v, dict) else v)
                      for k, v in r.items()}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
