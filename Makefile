# sandboxsec: `make run` starts the service, `make test` runs the whole suite.
# Both install what is missing first (Debian packages, a venv with the package).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Needed to build and run the service (tpm2-pytss links libtss2), plus the vTPM and HSM;
# a C compiler, Python and OpenSSL headers build the native audit verifier and proof
# signature checks (optional).
APT_RUN := libtss2-dev pkg-config swtpm swtpm-tools softhsm2 gcc python3-dev libssl-dev
# Needed by the test suite only: the database server (and pg_auto_failover for the failover
# soak), a browser, TPM tools.
APT_TEST := postgresql-15 postgresql-15-auto-failover pg-auto-failover-cli chromium tpm2-tools
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint deps test-deps apt-run apt-test venv bench soak demo clean

deps: apt-run venv
test-deps: apt-run apt-test venv

apt-run: .stamp-apt-run
apt-test: .stamp-apt-test
.stamp-apt-%:
	@pkgs="$(if $(filter run,$*),$(APT_RUN),$(APT_TEST))"; missing=""; for p in $$pkgs; do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml setup.py sandboxsec/audit/_native.c sandboxsec/sessions/_p256.c clients/python/pyproject.toml | .stamp-apt-run
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null
	@# The client first, from this tree: the service depends on it by name.
	@$(BIN)/python -m pip install -q -e clients/python
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

run: deps
	@$(BIN)/sandboxsec serve --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check sandboxsec tests bench clients
	$(BIN)/mypy sandboxsec clients/python/src

test: test-deps
	@bash scripts/test.sh

bench: test-deps
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

soak: test-deps
	@SANDBOXSEC_SOAK=1 bash scripts/test.sh -m slow

demo: test-deps
	@$(BIN)/sandboxsec demo

clean:
	rm -rf $(VENV) .stamp-apt-* .pytest_cache .mypy_cache .ruff_cache
