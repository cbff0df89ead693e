#!/usr/bin/env bash
# make demo: a whole conversation on loopback, with nothing left behind.
# Starts `rendezvous serve` with a throwaway SQLite database, registers alice and
# bob (each with their own profile), makes them buddies, exchanges messages both
# ways, sends one while bob is offline and shows it delivered at his login, then
# links a second device to alice's account and shows a message reach both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
work=$(mktemp -d /tmp/p2pim-demo.XXXXXX)
export XDG_DATA_HOME=$work/data P2PIM_PASSWORD="demo password"
port=$(( 20000 + RANDOM % 20000 ))
server=""
listener=""
cleanup() {
  [ -n "$listener" ] && kill "$listener" 2>/dev/null || true
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
alice() { echo "alice\$ p2pim $*"; "$BIN/p2pim" "$@" --profile alice | sed 's/^/  /'; }
bob() { echo "bob\$   p2pim $*"; "$BIN/p2pim" "$@" --profile bob | sed 's/^/  /'; }
laptop() { echo "alice's laptop\$ p2pim $*"; "$BIN/p2pim" "$@" --profile laptop | sed 's/^/  /'; }

say "rendezvous serve (throwaway database in $work)"
"$BIN/rendezvous" serve --port "$port" --stun-port $((port + 1)) --stun-alt-port $((port + 2)) \
  --db "$work/server.db" > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 50); do grep -q "control on" "$work/server.log" && break; sleep 0.1; done
cat "$work/server.log"
S="--server ws://127.0.0.1:$port"

say "register (each profile gets its own identity key)"
alice register alice $S
bob register bob $S

say "buddies: alice asks, bob accepts"
alice buddy add bob
bob buddy list
bob buddy accept alice
alice buddy list

say "bob listens; alice writes (relayed, end-to-end encrypted)"
"$BIN/p2pim" listen --profile bob --exit-after 5 > "$work/bob.out" &
listener=$!
sleep 1.2
alice send bob "hi bob, it's alice"
alice send bob "are you there?"
bob send alice "hi alice! got both"
say "alice probes the path to bob: the relay at once, then a punched direct path"
alice ping bob --interval 0.3
wait "$listener" || true
listener=""
echo "bob's listen printed:"; sed 's/^/  /' "$work/bob.out"

say "bob is offline now; alice writes anyway (the server keeps only ciphertext)"
alice send bob "this one waits on the server until you log in"
echo "server database holds the plaintext? $(grep -c 'waits on the server' "$work"/server.db* | awk -F: '{s+=$2} END {print (s ? "YES (bug!)" : "no")}')"

say "bob logs in and gets it"
bob login bob
bob history alice

say "alice's view (states: delivered, read, stored)"
alice history bob
alice fingerprint bob
bob fingerprint

say "a second device: alice links her laptop with a one-time code (SPAKE2; the server never sees the words)"
"$BIN/p2pim" device link --profile alice --json > "$work/link.out" &
linker=$!
for _ in $(seq 50); do grep -q code "$work/link.out" && break; sleep 0.1; done
code=$("$BIN/python" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["code"])' "$work/link.out")
echo "alice\$ p2pim device link   ->   code $code"
laptop device join "$code" $S
wait "$linker"
alice device list
bob send alice "to both of your devices"
laptop login alice
alice login alice
