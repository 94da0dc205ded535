# make test: create .venv if missing, install requirements.txt, run the tests.
# make bench: the speed and memory benchmarks (CPU here; GPU where one is present).
PY := .venv/bin/python

.PHONY: test bench venv

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
