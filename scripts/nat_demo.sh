#!/usr/bin/env bash
# make nat-demo: the STUN service and `p2pim nat` on loopback (127.0.0.1 and 127.0.0.2
# as the two server addresses), then, as root, the same behind every kernel NAT
# profile in natlab. Stops everything it started, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
port=$(( 20000 + RANDOM % 20000 ))
$BIN/rendezvous stun --ip 127.0.0.1 --alt-ip 127.0.0.2 --port $port --alt-port $((port + 1)) &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
sleep 0.7
echo
echo "== p2pim nat --server 127.0.0.1:$port   (no NAT on loopback: expect open internet)"
$BIN/p2pim nat --server 127.0.0.1:$port
echo
echo "== the same, as JSON for scripts"
$BIN/p2pim nat --server 127.0.0.1:$port --json
echo
echo "== no server listening: a clear 'blocked' and exit code 3"
set +e; $BIN/p2pim nat --server 127.0.0.1:$((port + 7)) --give-up 1 | head -3; echo "exit code ${PIPESTATUS[0]}"; set -e
if [ "$(id -u)" = 0 ] && command -v nft >/dev/null; then
  echo
  echo "== natlab classify: p2pim nat behind real kernel NATs (network namespaces)"
  $BIN/natlab classify
else
  echo
  echo "(natlab skipped: needs root and nftables; run 'make lab-demo' as root)"
fi
