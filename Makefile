# Two commands do all the set-up: `make demo` and `make test`. Both install into .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A CPU build by default; on a GPU machine: make install TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH  ?= torch==2.13.0
DEMO   ?= results/demo
# Test processes (pytest-xdist): the end-to-end tests spend much of their time starting Ray and MLflow and waiting
# on them, so two processes finish sooner than one even on two cores. A module's tests that share a costly
# fixture (a Ray cluster, a Postgres server, one finished sweep) stay in one process (xdist_group marks).
TEST_WORKERS ?= 2

.PHONY: install test test-fast demo gpu-bundle clean
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
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/isoflop sweep sweeps/demo.yaml
	$(VENV)/bin/isoflop analyze --experiment demo --tracking-uri sqlite:///$(DEMO)/mlflow.db --out $(DEMO)/analysis \
		--holdout-largest --floor entropy
	@echo
	@echo "Demo done. Report: $(DEMO)/analysis/report.md  fits: $(DEMO)/analysis/fits.json  plots: $(DEMO)/analysis/*.png"
	@echo "Browse the runs: $(VENV)/bin/isoflop ui --tracking-uri sqlite:///$(DEMO)/mlflow.db  (http://127.0.0.1:5000)"
	@echo "Sample or score a run (ids: isoflop runs ... --out runs.csv): $(VENV)/bin/isoflop sample --run RUN_ID" \
		"--tracking-uri sqlite:///$(DEMO)/mlflow.db --prompt '450 3';  isoflop score --run RUN_ID ... --tasks $(DEMO)/data/tasks.jsonl;" \
		" isoflop eval --run RUN_ID ... --tasks synthetic_choice (lm-eval; logs eval/synthetic_choice/acc to the run)"

# Wheels for a GPU machine with no network (Python 3.12 image): then `bash benchmarks/gpu_check.sh` there
gpu-bundle: $(STAMP)
	$(PY) benchmarks/gpu_bundle.py --out .whl

clean:
	rm -rf $(VENV) results
