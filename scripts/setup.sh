#!/usr/bin/env bash
# Installs everything netaccel needs on a Debian 12 machine, as root, and
# builds the venv at .venv. Quick (a few seconds) when all is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev python3-bpfcc python3-libvirt   # Debian's Python: bcc, libvirt
  linux-headers-amd64                                       # fallback headers for bcc
  iproute2 ethtool bpftool clang                            # inspection, doctor
  qperf sockperf iperf3 gcc                                 # benchmarks, AF_UNIX floor tool
  iptables nftables haproxy                                 # testbed mesh: sidecar rules, proxy
  liburing-dev                                              # socket API tests: io_uring helper
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
  dnsmasq-base busybox-static cpio kmod socat               # testbed guests and DHCP
  make git iputils-ping procps psmisc
)
STAMP=.venv/.netaccel-setup

log() { printf '[setup] %s\n' "$*"; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles at run time and needs kernel headers for the running kernel.
# Where there are none (custom kernels), link Debian's newest header set in:
# sock_ops/sk_msg only use the stable uapi, so older headers compile fine.
# node_helper/kernel.py does the same at run time when the links are missing.
release=$(uname -r)
if [ ! -e "/lib/modules/$release/build/include" ]; then
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$build" ]; then
    common="${build%-amd64}-common"
    log "no kernel headers for $release: linking $build (fallback for bcc)"
    mkdir -p "/lib/modules/$release"
    ln -sfn "$build" "/lib/modules/$release/build"
    ln -sfn "$common" "/lib/modules/$release/source"
  else
    log "WARNING: no kernel headers found; bcc will not compile (install linux-headers-amd64)"
  fi
fi

# The venv must use Debian's Python (3.11.2) so that bcc and libvirt from
# dist-packages are importable.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc, libvirt' 2>/dev/null; then
  log "creating .venv (Debian python3 with system site-packages)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ lab/pyproject.toml -nt "$STAMP" ] \
    || [ ! -x .venv/bin/netaccel-lab ]; then
  log "installing the agent, the lab and their Python dependencies into .venv"
  {
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[node,dev]' -e ./lab
  } >.venv/pip-install.log 2>&1 || { tail -n 40 .venv/pip-install.log; exit 1; }
  touch "$STAMP"
fi

# bpffs is not always mounted at boot.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
log "ready"
