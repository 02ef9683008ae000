# drtool: the two commands a newcomer needs are `make demo` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
PYTEST  := $(VENV)/bin/pytest
STAMP   := $(VENV)/.installed

# Debian packages the tests and the demo use (installed when run as root).  prometheus: for
# promtool, which checks docs/prometheus/drtool.rules.yml (tests/test_metrics.py).
DEB_PACKAGES := b3sum qemu-utils libnbd-bin nbdkit fio e2fsprogs openssh-server iproute2 curl fuse3 openssl python3-venv systemd prometheus

.PHONY: demo test test-fast test-slow bench deps venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else echo "not root: skipping Debian packages ($(DEB_PACKAGES))"; fi

demo: $(STAMP) deps
	$(PY) demo/demo.py

test: $(STAMP) deps
	$(PYTEST) -q

test-fast: $(STAMP)
	$(PYTEST) -q -m "not slow and not lab"

test-slow: $(STAMP) deps
	$(PYTEST) -q -m "slow or lab"

bench: $(STAMP) deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .demo build dist *.egg-info .pytest_cache
