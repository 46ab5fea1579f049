# Two commands do all the set-up: `make demo` and `make test`. Both install into .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A CPU build by default; on a GPU machine: make install TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH  ?= torch==2.13.0
DEMO   ?= results/demo

.PHONY: install test test-fast demo clean
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	# DeepSpeed's setup.py imports torch, so it builds against the torch just installed
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/isoflop data synthetic --out $(DEMO)/data --tokens 2000000 --seed 0 || test -f $(DEMO)/data/meta.json
	$(VENV)/bin/isoflop train --family mdm --model cpu-111k --flops 3e11 --data $(DEMO)/data --out $(DEMO)/mdm \
		--set seq_len=128 --set batch_size=32 --set lr=3e-3 --set warmup_min_steps=10 --set eval_samples=16
	$(VENV)/bin/isoflop train --family arm --model cpu-111k --flops 3e11 --data $(DEMO)/data --out $(DEMO)/arm \
		--set seq_len=128 --set batch_size=32 --set lr=3e-3 --set warmup_min_steps=10 --set eval_samples=16
	@echo "results under $(DEMO)/"

clean:
	rm -rf $(VENV) results
