#!/usr/bin/env bash
# Instructions each broker runs per message at a house's pace, counted by callgrind: the hub
# against Mosquitto, 10 publishers (`mosquitto_pub -l`, QoS 1, 64 B) at RATE msg/s in all to one
# subscriber on `bench/#` (`mosquitto_sub`, QoS 1), plain TCP on loopback. The counters are zeroed
# once every client is in and dumped SECONDS later; a message is one the subscriber printed in
# between. User-space instructions only (the kernel's are not counted), but exact: the same build
# gives the same count to within a few per message, where CPU time on a shared machine moves by
# a third from run to run.
#
#   bench/instructions.sh [HUB_BIN] [RATE] [SECONDS]
#
# HUB_BIN defaults to target/release/domoticpi; RATE to 50; SECONDS to 20. Needs valgrind,
# mosquitto, mosquitto-clients and python3 (Debian: apt-get install valgrind mosquitto
# mosquitto-clients python3). Takes about 2 minutes: the hub's logins are argon2 checks, slow
# under valgrind.
set -euo pipefail

hub_bin=$(realpath "${1:-target/release/domoticpi}")
rate=${2:-50}
secs=${3:-20}
for tool in valgrind callgrind_control callgrind_annotate mosquitto mosquitto_passwd mosquitto_pub mosquitto_sub python3; do
    command -v "$tool" > /dev/null || { echo "instructions.sh: $tool is not installed" >&2; exit 1; }
done
[ -x "$hub_bin" ] || { echo "instructions.sh: no hub binary at $hub_bin (cargo build --release)" >&2; exit 1; }

dir=$(mktemp -d /tmp/domoticpi-instructions-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

password="instructions-$$-$RANDOM"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The hub, on built-in defaults but for its listeners, with one admin user.
hub_port=$(free_port)
cat > "$dir/hub.toml" << EOF
data_dir = "$dir/hub-data"
log_level = "warn"
[web]
listen = "127.0.0.1:0"
[broker]
tls_listen = "127.0.0.1:0"
plain_listen = "127.0.0.1:$hub_port"
EOF
"$hub_bin" --config "$dir/hub.toml" init > /dev/null
echo "$password" | "$hub_bin" --config "$dir/hub.toml" user add bench --role admin --password-stdin > /dev/null

# Mosquitto, as the benchmark configures it.
mosquitto_port=$(free_port)
touch "$dir/mosquitto.passwd"
mosquitto_passwd -b "$dir/mosquitto.passwd" bench "$password"
{
    echo "per_listener_settings false"
    echo "allow_anonymous false"
    echo "password_file $dir/mosquitto.passwd"
    echo "persistence false"
    echo "max_queued_messages 0"
    echo "max_inflight_messages 100"
    echo "set_tcp_nodelay true"
    echo "log_dest stderr"
    echo "log_type error"
    [ "$(id -u)" = 0 ] && echo "user root"
    echo "listener $mosquitto_port 127.0.0.1"
} > "$dir/mosquitto.conf"

# Paces lines into 10 `mosquitto_pub -l`, one publisher after the other, once they have logged in.
cat > "$dir/pace.py" << 'EOF'
import subprocess, sys, time
port, password, rate, secs, login_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
pubs = [subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-u", "bench", "-P", password, "-q", "1",
                          "-l", "-t", f"bench/pace/{i}", "-i", f"pace-{i}"], stdin=subprocess.PIPE) for i in range(10)]
time.sleep(login_s)
start, n = time.monotonic(), 0
while time.monotonic() - start < secs:
    pubs[n % 10].stdin.write(b"x" * 63 + b"\n")
    pubs[n % 10].stdin.flush()
    n += 1
    time.sleep(max(0.0, start + n / rate - time.monotonic()))
for p in pubs:
    p.stdin.close()
for p in pubs:
    p.wait()
EOF

# measure NAME PORT LOGIN_S CMD...: prints "messages instructions" for CMD under callgrind (call it
# without a subshell, so that the clean-up knows its processes).
measure() {
    local name=$1 port=$2 login_s=$3
    shift 3
    valgrind --tool=callgrind --callgrind-out-file="$dir/$name.out" "$@" > "$dir/$name.log" 2>&1 &
    local vg=$!
    pids+=("$vg")
    for _ in $(seq 1 600); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2> /dev/null && break
        sleep 0.5
    done
    mosquitto_sub -h 127.0.0.1 -p "$port" -u bench -P "$password" -q 1 -t 'bench/#' -i pace-sub > "$dir/$name.sub" &
    local sub=$!
    pids+=("$sub")
    python3 "$dir/pace.py" "$port" "$password" "$rate" $((secs + 8)) "$login_s" &
    local pace=$!
    sleep $((login_s + 3))
    callgrind_control -z "$vg" > /dev/null 2>&1
    local before after
    before=$(wc -l < "$dir/$name.sub")
    sleep "$secs"
    callgrind_control -d "$vg" > /dev/null 2>&1
    after=$(wc -l < "$dir/$name.sub")
    wait "$pace"
    kill "$sub" 2> /dev/null || true
    kill -INT "$vg" 2> /dev/null || true
    wait "$vg" 2> /dev/null || true
    local instructions
    instructions=$(callgrind_annotate "$dir/$name.out.1" 2> /dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    echo "$((after - before)) $instructions"
}

echo "instructions per message, $rate msg/s QoS 1 plain 10→1, ${secs} s under callgrind"
measure hub "$hub_port" 60 "$hub_bin" --config "$dir/hub.toml" run > "$dir/hub.result"
measure mosquitto "$mosquitto_port" 5 "$(command -v mosquitto)" -c "$dir/mosquitto.conf" > "$dir/mosquitto.result"
read -r hub_msgs hub_ir < "$dir/hub.result"
read -r mq_msgs mq_ir < "$dir/mosquitto.result"
printf '| %-10s | %8s | %14s | %10s |\n' broker messages instructions "per message"
printf '|%s|%s|%s|%s|\n' "------------" "----------:" "---------------:" "------------:"
printf '| %-10s | %8d | %14d | %10d |\n' hub "$hub_msgs" "$hub_ir" $((hub_ir / (hub_msgs > 0 ? hub_msgs : 1)))
printf '| %-10s | %8d | %14d | %10d |\n' mosquitto "$mq_msgs" "$mq_ir" $((mq_ir / (mq_msgs > 0 ? mq_msgs : 1)))
