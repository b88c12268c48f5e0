#!/usr/bin/env bash
# Forms a local 3-node RabbitMQ cluster from the distribution's RabbitMQ (nodes keyturn-c1..3 on
# 127.0.0.1:5701-5703), runs tests/cluster.rs against it, one test at a time (a worker with
# `amqp.urls` = the three nodes while the node leading the jobs queue is stopped mid-run; the
# failover proof of three workers on PostgreSQL), then stops every node it started. Everything the nodes write lives in one temporary directory, removed at the end
# (kept with KEYTURN_CLUSTER_KEEP_LOGS=1).
#
# The cluster is separate from the broker on 127.0.0.1:5672: its own node names, AMQP and
# distribution ports, data, logs, config and Erlang cookie. It registers with the machine's epmd
# like any node; no management plugin.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}"
[[ -x "$bin/rabbitmq-server" ]] || {
  echo "cluster: no RabbitMQ server at $bin (install the distribution's rabbitmq-server or set RABBITMQ_BIN)" >&2
  exit 1
}
base="$(mktemp -d /tmp/keyturn-cluster.XXXXXX)"
nodes=()
urls=()
for i in 1 2 3; do
  nodes+=("keyturn-c$i@localhost")
  urls+=("amqp://guest:guest@127.0.0.1:570$i/%2f")
done

# One cookie for the nodes and the CLI tools of this cluster only: they look for it in $HOME,
# which is the temporary directory for them (and only them: cargo needs the real one).
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$base/.erlang.cookie"
chmod 400 "$base/.erlang.cookie"
# An empty env file: the system one names the shared node.
: >"$base/rabbitmq-env.conf"
export RABBITMQ_CONF_ENV_FILE="$base/rabbitmq-env.conf"
printf '#!/bin/sh\nHOME="%s" exec "%s/rabbitmqctl" "$@"\n' "$base" "$bin" >"$base/rabbitmqctl"
chmod +x "$base/rabbitmqctl"
ctl() { "$base/rabbitmqctl" -q "$@"; }

started=()
stop_all() {
  local i pid
  for i in "${started[@]}"; do
    ctl -n "${nodes[i - 1]}" stop >/dev/null 2>&1 || true
  done
  # `stop` can report an error while the node halts: the VM's own pid says when it is gone, and
  # a VM still there after 30 s is killed.
  for i in "${started[@]}"; do
    pid="$(cat "$base/n$i/os.pid" 2>/dev/null)" || continue
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  [[ -n "${KEYTURN_CLUSTER_KEEP_LOGS:-}" ]] || rm -rf "$base"
}
trap stop_all EXIT

start_node() {
  local i="$1" dir="$base/n$1"
  mkdir -p "$dir"
  echo "[]." >"$dir/enabled_plugins"
  printf 'listeners.tcp.default = 127.0.0.1:570%s\nloopback_users = none\n' "$i" >"$dir/rabbitmq.conf"
  HOME="$base" \
    RABBITMQ_NODENAME="${nodes[i - 1]}" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="570$i" \
    RABBITMQ_DIST_PORT="2570$i" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/os.pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$bin/rabbitmq-server" -detached
  started+=("$i")
}

# Nodes an earlier run could not stop (killed mid-run) would hold these names and ports.
# Their VMs' command lines name their temporary directory; the shared broker's does not.
pkill -KILL -f -- '/keyturn-cluster\.[A-Za-z0-9]+' 2>/dev/null || true
echo "cluster: starting ${nodes[*]} in $base"
for i in 1 2 3; do start_node "$i"; done
# A node is reachable only once its VM runs, a few seconds after -detached returns.
for i in 1 2 3; do
  # At most about two minutes per node, whatever happens.
  for _ in $(seq 1 40); do
    ctl -n "${nodes[i - 1]}" await_startup --timeout 2 >/dev/null 2>&1 && break
    sleep 1
  done
  ctl -n "${nodes[i - 1]}" await_startup --timeout 5 >/dev/null
  ctl -n "${nodes[i - 1]}" eval 'os:getpid().' | tr -d '"' >"$base/n$i/os.pid"
done
for node in "${nodes[@]:1}"; do
  ctl -n "$node" stop_app
  # join_cluster prints harmless errors about tables of nodes not yet running: shown on failure only.
  ctl -n "$node" join_cluster "${nodes[0]}" 2>"$base/join.err" || { cat "$base/join.err" >&2; exit 1; }
  ctl -n "$node" start_app
done
running="$(ctl -n "${nodes[0]}" eval 'rabbit_nodes:all_running().')"
for node in "${nodes[@]}"; do
  [[ "$running" == *"'$node'"* ]] || {
    echo "cluster: $node is not running in the cluster: $running" >&2
    exit 1
  }
done
echo "cluster: formed"

KEYTURN_TEST_CLUSTER_URLS="$(IFS=,; echo "${urls[*]}")" \
  KEYTURN_TEST_CLUSTER_NODES="$(IFS=,; echo "${nodes[*]}")" \
  KEYTURN_TEST_CLUSTER_CTL="$base/rabbitmqctl" \
  KEYTURN_TEST_AMQP_URL="${urls[0]}" \
  cargo test --test cluster -- --ignored --nocapture --test-threads=1
