# pytest-vmfork: everything a fresh Debian 12 machine needs, from two commands.
#   make demo   - fork a VM per test of the demo suite and print the timing summary
#   make test   - run the project's tests (unit, plugin and real-VM tests)
# Both install what they need (apt packages, .venv/, the guest image) and are
# idempotent: a second run reuses the venv and the cached image and snapshot.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# mmdebstrap builds the guest root (uidmap: its unshare mode for non-root users; fakechroot +
# fakeroot: the fallback without /etc/subuid entries, and owners kept in the ext4 image);
# python3-venv: the tests install the wheel into a fresh venv as a new non-root user;
# kmod (depmod) + squashfs-tools (mksquashfs): the guest kernel's module tree disk.
APT_PKGS := qemu-system-x86 e2fsprogs util-linux lz4 mmdebstrap uidmap fakechroot fakeroot \
            debian-archive-keyring python3-venv kmod squashfs-tools
# xdist workers for the test run: VM tests fork in parallel on both cores.
TEST_WORKERS ?= 2

.PHONY: setup apt venv image demo test unit bench proto clean-cache

setup: apt venv

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

image: setup
	$(BIN)/vmfork build

demo: setup
	$(BIN)/pytest fixtures/demo -v -p no:cacheprovider

test: setup
	$(BIN)/pytest tests --ignore=tests/bench -n $(TEST_WORKERS) -p no:cacheprovider

unit: setup
	$(BIN)/pytest tests/unit -q

bench: setup
	mkdir -p bench-results
	VMFORK_BENCH=1 $(BIN)/pytest tests/bench --benchmark-only --benchmark-json=bench-results/bench.json -p no:cacheprovider
	$(BIN)/python tests/bench/report.py bench-results/bench.json --svg bench-results/bench.svg

# Only agent_pb2.py is generated (the control channel is plain framed protobuf, no gRPC
# code). protoc comes from grpcio-tools in a venv of its own: neither the project nor the
# guest depends on it; its pin fixes the gencode version, the floor of protobuf in pyproject.
PROTO_VENV := .venv-proto
proto:
	[ -x $(PROTO_VENV)/bin/python ] || $(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/pip install -q grpcio-tools==1.85.1
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. pytest_vmfork/proto/agent.proto

clean-cache:
	rm -rf $${VMFORK_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/pytest-vmfork}
