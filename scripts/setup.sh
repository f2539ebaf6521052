#!/usr/bin/env bash
# Installs what the tests start for real: rustup targets for the no_std builds and firmware,
# QEMU for the emulated boards, etcd, a DynamoDB-compatible server (dynalite), PostgreSQL's
# server programs (the fenced-write tests run initdb and a server of their own), and socat
# (pseudo-terminal pairs standing in for serial ports).
# Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-arm >/dev/null || need_apt+=(qemu-system-arm)
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v socat >/dev/null || need_apt+=(socat)
command -v node >/dev/null || need_apt+=(nodejs npm)
# Debian keeps initdb off PATH, in /usr/lib/postgresql/<major>/bin.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

installed=$(rustup target list --installed)
for t in thumbv6m-none-eabi thumbv7m-none-eabi; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

if [ -f tools/dynalite/package.json ] && [ ! -d tools/dynalite/node_modules/dynalite ]; then
  (cd tools/dynalite && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "setup: done"
