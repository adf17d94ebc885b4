# The README's two Quickstart commands. Each installs what it needs first, so each works alone.
PY ?= python
DEMO ?= demo

.PHONY: setup demo test test-fast lint

setup:
	$(PY) -m pip install -q -e '.[test]'

# Precompute a small synthetic store with the offline tiny encoders, then a short training run.
demo: setup
	$(PY) precompute.py --out $(DEMO)/store.zarr --preset tiny --synthetic 64 --image-size 112
	$(PY) train.py --store $(DEMO)/store.zarr --preset tiny --max-steps 100 --batch-size 8 --grad-accum 1 \
		--out $(DEMO)/run --lr 1e-3 --warmup 20 --val-fraction 0.15 --log-every 10 --val-every 50 --save-every 50
	@echo "store: $(DEMO)/store.zarr   TensorBoard logs and checkpoints: $(DEMO)/run   (tensorboard --logdir $(DEMO))"

lint:
	$(PY) -m ruff check .

# One process per core; a file's tests stay together (they share module fixtures: stores, servers, models).
# Every test: the fast tier and the slow one (new processes, the S3 server, real precompute and training runs).
test: setup lint
	$(PY) -m pytest -q -n auto --dist loadfile

# The fast tier, after every change: no new process, no server, no real training run (about a minute on 2 cores).
test-fast: setup
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow"
