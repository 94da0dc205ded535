# make test: create .venv if missing, install requirements.txt and requirements-test.txt, run the tests.
# make demo: every stage in order on TinyWorld, then the report (CPU, or a GPU when present).
# make demo SEED=N: another world and other initialisations (N is passed to TinyWorld and every stage).
# make clean: remove out/ and data/tinyworld/, so that the next demo redoes every stage.
# make demo PRESET=smoke: every stage at toy size, a check of the plumbing in about a minute.
# make seeds (SEEDS="0 1 2"): the demo on each seed, then out/seeds.md: every figure per seed, min and median.
# make serve: the stage explorer (explorer/serve.py): every stage in out/ answers in the browser, and through an OpenAI API.
# make hacking: reward hacking seen and prevented (studies/hacking.py): PPO against a weak reward model without and
#   with its KL penalty, and against an ensemble, each scored by the gold rater; out/hacking/ (SEED, PRESET as for demo).
# make forgetting: what each way of fine-tuning (full, with replay, LoRA at two ranks) gains and forgets, for SFT,
#   DPO and GRPO from the demo's checkpoints (studies/forgetting.py); out/forgetting/ (SEED, PRESET as for demo).
# make docs: docs/example/ (the default seed's report and figures), docs/figures/ and README.md's table, rewritten
#   from out/ (the demo first if it has not run; make hacking before it for its picture): studies/docs.py.
# make bench: the speed and memory benchmarks (CPU here; GPU where one is present).
# make gpu: on a CUDA GPU, the kernel tests compiled, the GPU benchmarks and the journey at GPU size, all
#   in bench/RESULTS-gpu.md (under 8 minutes); without one, the same run dry (tiny shapes, Triton's
#   interpreter, the journey at PRESET=smoke) in out/gpu/RESULTS-dry.md.
# PY=python3 (or any interpreter that has the requirements) uses it as it is and installs nothing.
PY := .venv/bin/python
# pip installs without byte-compiling every file (half of the installation's time); Python writes the
# bytecode of the modules that are imported, the first time they are, which it may only where
# PYTHONDONTWRITEBYTECODE is not set: so it is not passed on to the commands below.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: test bench gpu serve hacking forgetting docs venv test-venv demo seeds clean FORCE

ifeq ($(PY),.venv/bin/python)
venv: .venv/.installed
test-venv: .venv/.installed-test
else
venv:
test-venv:
endif

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	touch $@

# what only the tests need (the real transformers and tokenizers, which an export is checked against)
.venv/.installed-test: requirements-test.txt .venv/.installed
	$(PY) -m pip install -q --no-compile -r requirements-test.txt
	touch $@

test: test-venv
	$(PY) -m pytest -q -n auto --dist loadfile tests

bench: venv
	$(PY) bench/speed.py

serve: venv
	$(PY) -m explorer.serve

# redone, from scratch, when the SFT model under it or the scripts it runs change
hacking: venv out/hacking/hacking.json
	@echo "reward hacking, seen and prevented: out/hacking/hacking.md and hacking.png"
out/hacking/hacking.json: out/rm/metrics.json studies/hacking.py train_rm.py train_ppo.py configs.py
	rm -rf out/hacking
	$(PY) -m studies.hacking $(RUN_SEED) $(if $(PRESET),--preset=$(PRESET))

# redone when the demo's stages or the scripts it runs change
forgetting: venv out/forgetting/forgetting.json
	@echo "what each way of fine-tuning gains and forgets: out/forgetting/forgetting.md"
out/forgetting/forgetting.json: out/grpo/metrics.json out/dpo/metrics.json studies/forgetting.py train_sft.py train_dpo.py train_grpo.py gpt_lora.py
	rm -rf out/forgetting
	$(PY) -m studies.forgetting $(RUN_SEED) $(if $(PRESET),--preset=$(PRESET))

# Chromium and Playwright (the explorer's picture) come with the test requirements
docs: test-venv out/report.md
	$(PY) -m studies.docs

# the GPU machines have every requirement installed and no network: make gpu uses .venv where it exists, else python3
gpu:
	$(if $(wildcard $(PY)),$(PY),python3) bench/gpu.py

# The demo's stages are file targets: a stage whose outputs exist (metrics.json is written last) is
# skipped; it runs again when its script, configs.py (its flags' defaults) or an earlier stage's output
# is newer. `make clean` redoes all.
TW := data/tinyworld/meta.json
PRESET ?=
STAGE = @printf "\n=== %s ===\n" "$(1)" && $(PY) $(2) $(if $(PRESET),--preset=$(PRESET))
# the report (studies/report.py) measures every stage on the held-out sets, so the demo skips the stages' own copies of those
# measures (the held-out QA and head-to-heads each script prints when run alone): each is computed once.
SKIP_EVALS := --qa_data=
# SEED=N draws world N and seeds every stage with 1337 + N; the default, 0, is the seeds the scripts default to.
# out/.seed remembers the last one (and PRESET), so that a new SEED redoes every stage and the same SEED none.
SEED ?= 0
RUN_SEED := --seed=$(shell expr 1337 + $(SEED))

demo: venv out/report.md
	@echo "the whole journey: out/report.md (make clean && make demo runs every stage again)"

out/.seed: FORCE
	@mkdir -p out && (echo $(SEED) $(PRESET) | cmp -s - $@ || echo $(SEED) $(PRESET) > $@)
FORCE:
$(TW): out/.seed data/tinyworld.py data/tinyworld_facts.py data/tinyworld_chat.py data/tinymath.py | venv
	$(call STAGE,TinyWorld: the data (seed $(SEED)),-m data.tinyworld --seed=$(SEED))
out/tokenizer/tokenizer.json: $(TW) data/tokenizer.py
	$(call STAGE,the tokenizer,-m data.tokenizer)
out/pretrain/metrics.json: out/tokenizer/tokenizer.json train_pretrain.py configs.py
	$(call STAGE,stage 1: pre-training,train_pretrain.py $(RUN_SEED))
out/sft/metrics.json: out/pretrain/metrics.json train_sft.py configs.py
	$(call STAGE,stage 2: instruction fine-tuning,train_sft.py $(SKIP_EVALS) $(RUN_SEED))
# the contrast: the same SFT budget on the same set with each worked answer cut to "#### n" (the report compares)
out/sft_answers_only/metrics.json: out/pretrain/metrics.json train_sft.py configs.py
	$(call STAGE,stage 2 contrast: SFT with answers only,train_sft.py --data=data/tinyworld/sft_answers_only.jsonl --qa_data= --out=out/sft_answers_only $(RUN_SEED))
out/rm/metrics.json: out/sft/metrics.json train_rm.py configs.py
	$(call STAGE,stage 3a: the reward model,train_rm.py $(RUN_SEED))
out/ppo/metrics.json: out/rm/metrics.json train_ppo.py configs.py
	$(call STAGE,stage 3b: RLHF with PPO,train_ppo.py $(SKIP_EVALS) --test_data= $(RUN_SEED))
out/dpo/metrics.json: out/sft/metrics.json train_dpo.py configs.py
	$(call STAGE,stage 3c: DPO,train_dpo.py $(SKIP_EVALS) --test_data= --world= $(RUN_SEED))
# GRPO starts from PPO's policy; DPO only runs before it, as the stages are numbered
out/grpo/metrics.json: out/ppo/metrics.json train_grpo.py configs.py | out/dpo/metrics.json
	$(call STAGE,stage 4: reasoning RL with GRPO,train_grpo.py $(RUN_SEED))
out/report.md: out/grpo/metrics.json out/dpo/metrics.json out/sft_answers_only/metrics.json studies/report.py studies/report_writing.py measures.py
	$(call STAGE,the report,-m studies.report $(RUN_SEED))

# make seeds: the demo once per seed of SEEDS, each seed's report, figures and stage metrics kept in
# out/seeds/<N>/, then out/seeds.md: every figure per seed with its minimum and median (studies/seeds.py).
SEEDS ?= 0 1 2
KEPT = report.md report.json report-*.png */metrics.json */log.jsonl rm/best_of_n.png
seeds: venv
	@set -e; for s in $(SEEDS); do \
	  start=$$(date +%s); \
	  $(MAKE) --no-print-directory demo SEED=$$s PRESET=$(PRESET); \
	  rm -rf out/seeds/$$s && mkdir -p out/seeds/$$s; \
	  (cd out && for f in $(KEPT); do [ -e "$$f" ] && cp --parents "$$f" seeds/$$s/ || true; done); \
	  echo "seed $$s: the demo in $$(( $$(date +%s) - start )) s, kept in out/seeds/$$s/"; \
	done
	$(PY) -m studies.seeds --seeds="$(SEEDS)"

clean:
	rm -rf out data/tinyworld
