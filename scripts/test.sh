#!/usr/bin/env bash
# Sets up a fresh machine and runs every ftvmm test: installs the Debian
# packages the tests need, builds the tiny Linux guest (cached under
# resources/linux/out), then runs the whole cargo test suite.
#
#   ./scripts/test.sh            # everything
#   ./scripts/test.sh -p ftvmm --test boot   # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v objdump >/dev/null || need+=(binutils)
command -v unshare >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
command -v etcd >/dev/null || need+=(etcd-server)
# The RDMA transport (cargo feature `rdma`): rdma-sys links libibverbs and
# runs bindgen (libclang) at build time, found through pkg-config.
for pkg in libibverbs-dev librdmacm-dev clang libclang-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "test.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The tiny Linux guest (kernel + initramfs); a no-op when already built.
resources/linux/build.sh
export FTVMM_LINUX_DIR="$PWD/resources/linux/out"
export FTVMM_REQUIRE_LINUX=1

cargo build --workspace --all-targets
if (($# == 0)); then
    # The RDMA transport, behind its cargo feature: its unit tests run over
    # an in-process software fabric (no device needed); the end-to-end
    # failover through the binary built with the feature runs over RDMA
    # where ibv_get_device_list finds a device, and prints SKIP elsewhere.
    cargo test -p ftvmm-transport --features rdma
    cargo test -p ftvmm --features rdma --test rdma
fi
# One test at a time: many tests run whole VMs (busy vCPUs, emulated guest
# kernels) with failure detectors; on a 2-core machine, running them side by
# side starves heartbeat threads into false failovers. --no-fail-fast reports
# every failing test, not just the first binary's.
cargo test --workspace --no-fail-fast "$@" -- --test-threads=1
