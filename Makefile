# make demo: build a small model from the demo preset and generate with it.
# make test: ruff, then pytest. Both create .venv and install into it when needed.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ASSETS := .cache/tokenizers/llama3/tokenizer.json
DEMO   := .cache/demo-model

.PHONY: demo test lint bench clean

$(STAMP): requirements-torch.txt requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(ASSETS):
	bash scripts/fetch_assets.sh

demo: $(STAMP) $(ASSETS)
	$(VENV)/bin/ouvert init --preset demo --tokenizer .cache/tokenizers/llama3 --out $(DEMO) --seed 0
	$(VENV)/bin/ouvert info --model $(DEMO)
	$(VENV)/bin/ouvert generate --model $(DEMO) --max-new-tokens 24 --temperature 0.8 --seed 0 "Open models win because"

lint: $(STAMP)
	$(VENV)/bin/ruff check ouvert tests bench

test: lint $(ASSETS)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/bench_decode.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
