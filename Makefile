# make test: create .venv if missing, install requirements.txt, run the tests.
# make demo: every stage in order on TinyWorld, then the report (CPU, or a GPU when present).
# make clean: remove out/ and data/tinyworld/, so that the next demo redoes every stage.
# make bench: the speed and memory benchmarks (CPU here; GPU where one is present).
PY := .venv/bin/python

.PHONY: test bench venv demo clean

venv: .venv/.installed

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q -n auto --dist loadfile tests

bench: venv
	$(PY) bench/kernels.py

# The demo's stages are file targets: a stage whose outputs exist (metrics.json is written last) is
# skipped; it runs again when its script or an earlier stage's output is newer. `make clean` redoes all.
TW := data/tinyworld/meta.json
STAGE = @printf "\n=== %s ===\n" "$(1)" && $(PY) $(2)

demo: venv out/report.md
	@echo "the whole journey: out/report.md (make clean && make demo runs every stage again)"

$(TW): data/tinyworld.py data/tinyworld_facts.py data/tinyworld_chat.py data/tinymath.py | venv
	$(call STAGE,TinyWorld: the data,-m data.tinyworld)
out/tokenizer/tokenizer.json: $(TW) data/tokenizer.py
	$(call STAGE,the tokenizer,-m data.tokenizer)
out/pretrain/metrics.json: out/tokenizer/tokenizer.json train_pretrain.py
	$(call STAGE,stage 1: pre-training,train_pretrain.py)
out/sft/metrics.json: out/pretrain/metrics.json train_sft.py
	$(call STAGE,stage 2: instruction fine-tuning,train_sft.py)
out/rm/metrics.json: out/sft/metrics.json train_rm.py
	$(call STAGE,stage 3a: the reward model,train_rm.py)
out/ppo/metrics.json: out/rm/metrics.json train_ppo.py
	$(call STAGE,stage 3b: RLHF with PPO,train_ppo.py)
out/dpo/metrics.json: out/sft/metrics.json train_dpo.py
	$(call STAGE,stage 3c: DPO,train_dpo.py)
# GRPO starts from PPO's policy; DPO only runs before it, as the stages are numbered
out/grpo/metrics.json: out/ppo/metrics.json train_grpo.py | out/dpo/metrics.json
	$(call STAGE,stage 4: reasoning RL with GRPO,train_grpo.py)
out/report.md: out/grpo/metrics.json out/dpo/metrics.json report.py evals.py
	$(call STAGE,the report,report.py)

clean:
	rm -rf out data/tinyworld
