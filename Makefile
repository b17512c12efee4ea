# twinsum — every entry point a person or CI uses.
# `make run` and `make test` do all set-up on a fresh machine.

CARGO ?= cargo
RELEASE_BIN := target/release/twinsum

.PHONY: all build run test deps lint bench crash-model fuzz images qemu clean

all: build

build:
	$(CARGO) build --release

# Build, create a 1 GiB sparse demo image if missing, serve it on
# ./twinsum.sock and print the QEMU and cloud-hypervisor command lines.
run: build
	scripts/run-demo.sh

# Debian packages for the guest tests (only the missing ones; needs root).
deps:
	scripts/install-deps.sh

# Everything: unit, crash-model, socket and guest tests.
test: deps images
	$(CARGO) build --release
	$(CARGO) test --release -- --test-threads=2

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	# The build that serves, without the tests' `testing` feature.
	$(CARGO) clippy --lib --bins -- -D warnings

bench: build
	$(CARGO) bench --bench core
	$(CARGO) bench --bench vhost

# The long crash-model run (10^5 seeds and more; SEEDS=N to change).
crash-model:
	TWINSUM_CRASH_SEEDS=$${SEEDS:-100000} $(CARGO) test --release --test crash_model -- --nocapture

# A long run of the randomized hostile front-end (tests/frontend_fuzz.rs):
# CASES=N cases (default 3000) from SEED (default: the clock). A failure
# prints the SEED and CASES that replay it.
fuzz:
	TWINSUM_FUZZ_CASES=$${CASES:-3000} TWINSUM_FUZZ_SEED=$${SEED:-$$(date +%s)} \
		$(CARGO) test --release --test frontend_fuzz -- --nocapture

# Guest kernel + initramfs for the QEMU tests, into images/build (reused).
images:
	images/build.sh

# Boot the guest interactively against the disk of a running `make run`.
qemu: deps images
	images/qemu.sh

clean:
	$(CARGO) clean
	rm -rf images/build demo
