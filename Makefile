# The two commands of the README: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/netaccel-lab bench pods --json demo-pods.json --plot demo-pods.png

# The k8s tests run a real kube-apiserver + etcd: built once (needs Go, ~6 min on 2 cores),
# cached under /var/cache/netaccel; a no-op afterwards.
test: setup
	$(VENV)/bin/ruff check .
	bash scripts/build-kube-apiserver.sh
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	-$(VENV)/bin/netaccel-lab testbed down --all
	-$(VENV)/bin/netaccel bypass off
