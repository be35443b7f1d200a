# Entry points for a fresh Debian 12 machine, as root: `make demo`, `make test`, `make install`.
#
# Everything Python runs from a virtual environment (.venv, made with $(PY) -m venv), so Debian's
# own /usr/bin/python3 works (PEP 668 refuses `pip install` outside one) as does any other
# python3 >= 3.11: `make test PY=python3.12`.
PY ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
# pip runs again only when pyproject.toml changed (or the venv is new)
STAMP = $(VENV)/.netagent-installed
APT_PKGS = etcd-server etcd-client iproute2 iptables iputils-ping iperf3 ethtool openssl systemd \
           containernetworking-plugins podman runc uidmap fuse-overlayfs busybox-static gcc libc6-dev \
           docker.io containerd bird2 wireguard-go wireguard-tools tcpdump python3-venv procps kmod
# what `make install` needs on a host (no test tools)
INSTALL_PKGS = python3-venv iproute2 iptables
PYTEST_ARGS ?=
BENCH ?= bench/throughput.py
BENCH_ARGS ?=
# make install: where the venv, the commands and the units go
PREFIX ?= /opt/netagent
BINDIR ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
UNITS = netagent.service netagent-cni.service netagent-cni.socket
DROPIN = docker.service.d/10-netagent.conf

.PHONY: deps deps-apt venv test demo lint bench install uninstall check-python

deps: deps-apt venv

# apt-get update only when something is missing (keeps repeated runs fast)
define apt_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing; \
	fi
endef

deps-apt:
	$(call apt_install,$(APT_PKGS))

check-python:
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "netagent needs python3 >= 3.11; $(PY) is $$($(PY) --version 2>&1). Use make PY=python3.11" >&2; \
	  exit 1; }

venv: $(STAMP)

# order-only: apt (python3-venv) first, without re-running pip every time apt is checked
$(STAMP): pyproject.toml | deps-apt check-python
	@$(VPY) -c '' 2>/dev/null || { rm -rf $(VENV) && $(PY) -m venv $(VENV); }
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

# lint first: ruff and mypy are cheap and keep the tree clean for the next change
test: deps lint
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: deps
	$(VPY) contrib/demo.py

lint: venv
	$(VPY) -m ruff check netagent backends cni tests bench contrib
	# netagent/backends and netagent/cni are symlinks: one pass checks all three under their
	# installed names (netagent.backends...), not twice under generic ones
	$(VPY) -m mypy netagent
	@if [ -f .importlinter ]; then \
	  [ -x $(VENV)/bin/lint-imports ] || { echo "lint: .importlinter is there but import-linter is" \
	    "not installed: add it to the test extras in pyproject.toml" >&2; exit 1; }; \
	  echo "$(VENV)/bin/lint-imports"; $(VENV)/bin/lint-imports; fi

bench: deps
	$(VPY) $(BENCH) $(BENCH_ARGS)

# a copy of the code in its own venv (not the checkout), the commands where the units expect
# them, the units and the Docker drop-in; daemon-reload only where systemd runs
install: check-python
	@[ "$$(id -u)" = 0 ] || { echo "make install needs root" >&2; exit 1; }
	$(call apt_install,$(INSTALL_PKGS))
	@$(PREFIX)/bin/python -c '' 2>/dev/null || { rm -rf $(PREFIX) && $(PY) -m venv $(PREFIX); }
	$(PREFIX)/bin/python -m pip install -q --disable-pip-version-check --upgrade .
	install -d $(BINDIR) $(UNITDIR)/docker.service.d
	ln -sfn $(PREFIX)/bin/netagent $(BINDIR)/netagent
	ln -sfn $(PREFIX)/bin/netagent-cni $(BINDIR)/netagent-cni
	install -m 0644 $(addprefix contrib/systemd/,$(UNITS)) $(UNITDIR)/
	install -m 0644 contrib/systemd/$(DROPIN) $(UNITDIR)/$(DROPIN)
	@if [ -d /run/systemd/system ]; then echo systemctl daemon-reload; systemctl daemon-reload; \
	else echo "systemd is not running: no daemon-reload"; fi
	@echo "installed; next: systemctl enable --now netagent && systemctl restart docker"

uninstall:
	@[ "$$(id -u)" = 0 ] || { echo "make uninstall needs root" >&2; exit 1; }
	@if [ -d /run/systemd/system ]; then \
	  systemctl disable --now netagent-cni.socket netagent-cni.service netagent.service 2>/dev/null || true; fi
	rm -f $(addprefix $(UNITDIR)/,$(UNITS)) $(UNITDIR)/$(DROPIN)
	-rmdir $(UNITDIR)/docker.service.d 2>/dev/null
	@for c in netagent netagent-cni; do \
	  if [ "$$(readlink $(BINDIR)/$$c)" = "$(PREFIX)/bin/$$c" ]; then rm -f $(BINDIR)/$$c; fi; done
	rm -rf $(PREFIX)
	@if [ -d /run/systemd/system ]; then echo systemctl daemon-reload; systemctl daemon-reload; fi
