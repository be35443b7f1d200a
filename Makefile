# Two entry points for a fresh Debian 12 machine, as root: `make demo` and `make test`.
PY ?= python3
APT_PKGS = etcd-server etcd-client iproute2 iptables iputils-ping iperf3 ethtool openssl systemd \
           containernetworking-plugins podman runc uidmap fuse-overlayfs busybox-static gcc libc6-dev
# the wireguard backend's tests and bench (wireguard-go: the userspace path, wg: the kernel path's client)
APT_PKGS += wireguard-go wireguard-tools tcpdump
PYTEST_ARGS ?=

.PHONY: deps deps-apt deps-pip test demo lint bench

deps: deps-apt deps-pip

# apt-get update only when something is missing (keeps repeated runs fast)
deps-apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing; \
	fi

deps-pip:
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'

# lint first: ruff and mypy are cheap and keep the tree clean for the next change
test: deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps
	$(PY) contrib/demo.py

lint: deps-pip
	$(PY) -m ruff check netagent backends cni tests bench contrib
	$(PY) -m mypy netagent backends cni
