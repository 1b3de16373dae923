#!/bin/sh
# What the hub writes to disk, in MB a day (from /proc/PID/io write_bytes), for the example house
# (config/house.toml) living an ordinary day with the house simulator, then the same with one more
# motion sensor flapping at 100 Hz (the simulator's load mode on that one device).
#
#   cargo build --release -p domoticpi -p domoticpi-house
#   bench/disk-wear.sh [HUB_BIN] [HOUSE_BIN] [SECONDS]
#
# Each run lasts SECONDS (default 120) and is scaled to a day. The data dir is on the disk the
# repository is on (under target/), not a tmpfs, so that what SQLite writes is counted. Loopback only.
set -eu
HUB=${1:-target/release/domoticpi}
HOUSE=${2:-target/release/domoticpi-house}
SECS=${3:-120}
PORT=$((20000 + $$ % 20000))

dir=$(mktemp -d "${PWD}/target/disk-wear.XXXXXX")
trap 'kill "$hub" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$dir"' EXIT
# The example house, its own data dir and port, no web app, and a sensor to flap.
sed -e "s|^data_dir = .*|data_dir = \"$dir/data\"|" \
    -e "s|^tls_listen = .*|tls_listen = \"127.0.0.1:$PORT\"\n[web]\nlisten = \"\"|" \
    config/house.toml > "$dir/story.toml"
{ cat "$dir/story.toml"; printf '\n[[device]]\nid = "flapper"\nkind = "motion"\n'; } > "$dir/hub.toml"
"$HUB" --config "$dir/hub.toml" check-config > /dev/null
mkdir "$dir/creds" "$dir/flap"
# Every id in the file: `device creds` refuses rooms' and scenes' ids, which are dropped.
for id in $(sed -n 's/^id = "\([a-z0-9-]*\)".*/\1/p' "$dir/hub.toml"); do
    "$HUB" --config "$dir/hub.toml" device creds "$id" > "$dir/creds/$id.txt" 2>/dev/null || rm -f "$dir/creds/$id.txt"
done
mv "$dir/creds/flapper.txt" "$dir/flap/"
printf '[broker]\ntls_listen = "127.0.0.1:%s"\n[[device]]\nid = "flapper"\nkind = "motion"\n' "$PORT" > "$dir/flap.toml"
"$HUB" --config "$dir/hub.toml" run 2> "$dir/hub.log" &
hub=$!
for _ in $(seq 50); do grep -q "hub ready" "$dir/hub.log" && break; sleep 0.1; done

written() { awk '/^write_bytes/ { print $2 }' "/proc/$hub/io"; }
per_day() { awk -v b="$1" -v s="$SECS" 'BEGIN { printf "%.1f", b * 86400 / s / 1e6 }'; }

before=$(written)
"$HOUSE" --config "$dir/story.toml" --creds-dir "$dir/creds" --duration "$SECS" > "$dir/story1.log" 2>&1 || true
story=$(( $(written) - before ))

before=$(written)
"$HOUSE" --config "$dir/story.toml" --creds-dir "$dir/creds" --duration "$SECS" > "$dir/story2.log" 2>&1 &
story_pid=$!
"$HOUSE" --config "$dir/flap.toml" --creds-dir "$dir/flap" --devices 1 --rate 100 --duration "$SECS" > "$dir/flap.log" 2>&1 || true
wait "$story_pid" || true
flapping=$(( $(written) - before ))

echo "| run ($SECS s, scaled to a day) | MB written a day |"
echo "| --- | --- |"
echo "| example house, ordinary day | $(per_day "$story") |"
echo "| the same, and one sensor flapping at 100 Hz | $(per_day "$flapping") |"
echo "database after both: $(du -k "$dir/data/hub.db" | cut -f1) KiB; flapper: $(tail -n 1 "$dir/flap.log")"
