# make test: create .venv if missing, install requirements.txt, run the tests.
# make demo: every stage that exists, in order, on TinyWorld (CPU, or a GPU when present).
# make bench: the speed and memory benchmarks (CPU here; GPU where one is present).
PY := .venv/bin/python

.PHONY: test bench venv demo

venv: .venv/.installed

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/kernels.py

demo: venv
	$(PY) -m data.tinyworld
	$(PY) -m data.tokenizer
	$(PY) train_pretrain.py
	$(PY) train_sft.py
	$(PY) sample.py --init=scratch --prompt="Lucy's favourite colour is" --max_new_tokens=20
	$(PY) sample.py --init=out/pretrain/ckpt.pt --prompt="Lucy's favourite colour is" --max_new_tokens=20 --temperature=0
	$(PY) sample.py --init=out/sft/ckpt.pt --chat --temperature=0 --prompt="Where does Lucy live?"
