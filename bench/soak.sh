#!/bin/bash
# A soak: the hub (release) with 200 simulated sensors publishing for MINUTES minutes (default 60),
# the whole house reconnecting every 5 minutes (the simulator restarted), and a resident's app
# connecting with a fresh client id once a second (mosquitto_pub). Every minute: the hub's RSS,
# its CPU time per message so far, and the SQLite files' size. RSS must plateau.
#
#   cargo build --release -p domoticpi -p domoticpi-house
#   bench/soak.sh [MINUTES] [HUB_BIN] [HOUSE_BIN]
#
# APP_LOGINS=0 leaves the resident's app out: its argon2 password checks (tens of ms of CPU each)
# would otherwise dominate the CPU per message.
#
# Loopback only; the data dir is under target/ (on disk). Needs mosquitto_pub.
set -euo pipefail
MINUTES=${1:-60}
HUB=${2:-target/release/domoticpi}
HOUSE=${3:-target/release/domoticpi-house}
DEVICES=200
RATE=200
PORT=$((20000 + $$ % 20000))

dir=$(mktemp -d "${PWD}/target/soak.XXXXXX")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; pkill -f -- "--creds-dir $dir/creds" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$dir"' EXIT
{
  printf 'data_dir = "%s/data"\n[web]\nlisten = ""\n[broker]\ntls_listen = "127.0.0.1:%s"\n' "$dir" "$PORT"
  for i in $(seq 1 "$DEVICES"); do
    kinds=(motion contact temperature lux)
    printf '[[device]]\nid = "sensor-%03d"\nkind = "%s"\n' "$i" "${kinds[$((i % 4))]}"
  done
} > "$dir/hub.toml"
"$HUB" --config "$dir/hub.toml" check-config > /dev/null
echo "soak-password" | "$HUB" --config "$dir/hub.toml" user add soak --role resident --password-stdin > /dev/null
mkdir "$dir/creds"
for i in $(seq 1 "$DEVICES"); do
  id=$(printf 'sensor-%03d' "$i")
  "$HUB" --config "$dir/hub.toml" device creds "$id" > "$dir/creds/$id.txt"
done
"$HUB" --config "$dir/hub.toml" run 2> "$dir/hub.log" &
hub=$!
pids+=("$hub")
for _ in $(seq 100); do grep -q "hub ready" "$dir/hub.log" && break; sleep 0.1; done

# The house, restarted every 5 minutes: every device reconnects.
(
  while true; do
    timeout 300 "$HOUSE" --config "$dir/hub.toml" --creds-dir "$dir/creds" --devices "$DEVICES" --rate "$RATE" \
      >> "$dir/house.log" 2>&1 || true
  done
) &
pids+=("$!")
# A resident's app with a fresh client id each time.
[ "${APP_LOGINS:-1}" = 0 ] || (
  n=0
  while true; do
    n=$((n + 1))
    mosquitto_pub -h 127.0.0.1 -p "$PORT" --cafile "$dir/data/certs/ca.pem" -i "app-$n" -u soak -P soak-password \
      -t dpi/sensor-001/set -m '{"on":true}' 2> /dev/null || true
    sleep 1
  done
) &
pids+=("$!")

ticks=$(getconf CLK_TCK)
cpu() { awk -v t="$ticks" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$hub/stat"; }
rss() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$hub/status"; }
size() { du -ck "$dir"/data/hub.db* | tail -1 | cut -f1; }
# The hub's own account of its memory: heap in use, freed but held, SQLite's part.
memory() { "$HUB" --config "$dir/hub.toml" status | awk '/^memory: heap/ { print $3 " | " $7 " | " $14 }'; }

echo "| minute | RSS MiB | heap in use KiB | heap free, held KiB | SQLite KiB | hub CPU s | messages (approx.) | CPU µs per message | hub.db + WAL KiB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
start_cpu=$(cpu)
for minute in $(seq 1 "$MINUTES"); do
  sleep 60
  used=$(awk -v a="$(cpu)" -v b="$start_cpu" 'BEGIN { printf "%.2f", a - b }')
  msgs=$((minute * 60 * RATE))
  per=$(awk -v c="$used" -v m="$msgs" 'BEGIN { printf "%.1f", c * 1e6 / m }')
  echo "| $minute | $(rss) | $(memory) | $used | $msgs | $per | $(size) |"
done
echo "house: $(grep -c 'done:' "$dir/house.log") restarts; last: $(grep 'done:' "$dir/house.log" | tail -1)"
