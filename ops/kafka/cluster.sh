#!/usr/bin/env bash
# Local three-node Kafka cluster (KRaft): every node is a broker and a controller, every node a
# voter of a static quorum, all on 127.0.0.1 with their own ports and directories. Run it through
# kafka.sh, which hands over here when KAFKA_NODES is more than 1:
#
#   KAFKA_NODES=3 ops/kafka/kafka.sh start      fetch jars, format each node once, start the
#                                               nodes that are not running, wait until every
#                                               node answers and all have registered
#   KAFKA_NODES=3 ops/kafka/kafka.sh stop [N]   stop every node (or node N): SIGTERM, 30 s, SIGKILL
#   KAFKA_NODES=3 ops/kafka/kafka.sh status     one line per node and the active controller;
#                                               exit 0 all running, 3 all stopped, 4 some running
#   KAFKA_NODES=3 ops/kafka/kafka.sh bootstrap  the client bootstrap list (KAFKA_BOOTSTRAP_SERVERS)
#   KAFKA_NODES=3 ops/kafka/kafka.sh pid N      node N's broker pid (exit 1 when not running)
#   KAFKA_NODES=3 ops/kafka/kafka.sh logs N [-f]
#
# Node N (1-based) listens on STREAMINFER_KAFKA_CLUSTER_PORT+N-1 (default 19092, 19093, 19094)
# for clients and STREAMINFER_KAFKA_CLUSTER_CONTROLLER_PORT+N-1 (19192, ...) for the quorum, and
# keeps its state in $STREAMINFER_HOME/kafka-cluster/node-N/. These never overlap the one-node
# broker's (9092/9093, $STREAMINFER_HOME/kafka/), so both can run side by side; the jars in
# $STREAMINFER_HOME/kafka/lib are shared. Topics default to replication factor 3 and
# min.insync.replicas 2, the internal ones (offsets, transaction state) too.
#
# Environment: KAFKA_NODES (3..5), STREAMINFER_HOME, STREAMINFER_KAFKA_CLUSTER_PORT,
# STREAMINFER_KAFKA_CLUSTER_CONTROLLER_PORT, STREAMINFER_KAFKA_START_TIMEOUT (default 120: three
# JVMs starting on two cores), STREAMINFER_KAFKA_HEAP_OPTS (default "-Xmx512m -Xms512m", per
# node), PYTHON.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

# shellcheck source=ops/lib/common.sh
source "$here/../lib/common.sh" kafka-cluster

nodes="${KAFKA_NODES:-3}"
cdir="$home/kafka-cluster"
lib="$home/kafka/lib" # fetched by kafka.sh (one-node mode), shared
log4j="$here/log4j2.properties"
template="$here/server-cluster.properties.template"

host=127.0.0.1
base_port="${STREAMINFER_KAFKA_CLUSTER_PORT:-19092}"
base_cport="${STREAMINFER_KAFKA_CLUSTER_CONTROLLER_PORT:-19192}"
start_timeout="${STREAMINFER_KAFKA_START_TIMEOUT:-120}"
heap_opts="${STREAMINFER_KAFKA_HEAP_OPTS:--Xmx512m -Xms512m}"

find_python

[[ "$nodes" =~ ^[3-5]$ ]] || die "KAFKA_NODES=$nodes: use 1 (one node) or 3 to 5"
[[ -n "$PYTHON" ]] || die "python3 is needed to check the nodes' readiness"

# --- per-node names --------------------------------------------------------------------------

ndir() { echo "$cdir/node-$1"; }
port_of() { echo $((base_port + $1 - 1)); }
cport_of() { echo $((base_cport + $1 - 1)); }
props_of() { echo "$(ndir "$1")/server.properties"; }
log_of() { echo "$(ndir "$1")/kafka.log"; }
pidfile_of() { echo "$(ndir "$1")/kafka.pid"; }

# The pid of node N's broker if alive and ours (the command line names its properties file).
node_pid() { pid_matching "$(pidfile_of "$1")" "kafka.Kafka $(props_of "$1")"; }

node_ready() { "$PYTHON" "$here/probe.py" "$host" "$(port_of "$1")" 2 --brokers "${2:-1}" 2>/dev/null; }

bootstrap() {
    local i list=()
    for ((i = 1; i <= nodes; i++)); do list+=("$host:$(port_of "$i")"); done
    (
        IFS=,
        echo "${list[*]}"
    )
}

voters() {
    local i list=()
    for ((i = 1; i <= nodes; i++)); do list+=("$i@$host:$(cport_of "$i")"); done
    (
        IFS=,
        echo "${list[*]}"
    )
}

# The quorum leader as every node last persisted it: the highest epoch's leaderId wins.
active_controller() {
    "$PYTHON" - "$cdir" <<'EOF' 2>/dev/null
import glob, json, sys
best = (-1, -1)
for path in glob.glob(f"{sys.argv[1]}/node-*/data/__cluster_metadata-0/quorum-state"):
    try:
        state = json.load(open(path))
    except (OSError, ValueError):
        continue
    best = max(best, (state.get("leaderEpoch", -1), state.get("leaderId", -1)))
if best[1] >= 0:
    print(f"node {best[1]} (epoch {best[0]})")
EOF
}

# --- start -----------------------------------------------------------------------------------

# shellcheck disable=SC2016 # the ${...} placeholders are matched literally
render_props() {
    local n="$1" text
    text="$(<"$template")"
    text="${text//'${NODE_ID}'/$n}"
    text="${text//'${KAFKA_PORT}'/$(port_of "$n")}"
    text="${text//'${CONTROLLER_PORT}'/$(cport_of "$n")}"
    text="${text//'${DATA_DIR}'/$(ndir "$n")/data}"
    text="${text//'${QUORUM_VOTERS}'/$(voters)}"
    printf '%s\n' "$text" >"$(props_of "$n")"
}

storage_tool() { java -Dlog4j2.configurationFile="$log4j" -cp "$lib/*" kafka.tools.StorageTool "$@"; }

# One cluster id for every node, kept beside them (or recovered from a formatted node).
cluster_id() {
    local file="$cdir/cluster.id" id meta
    if [[ ! -f "$file" ]]; then
        meta="$(compgen -G "$cdir/node-*/data/meta.properties" | head -n1 || true)"
        if [[ -n "$meta" ]]; then
            sed -n 's/^cluster.id=//p' "$meta" >"$file"
        else
            id="$(storage_tool random-uuid | tail -n 1)" || die "StorageTool random-uuid failed"
            [[ "$id" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "StorageTool random-uuid printed '$id'"
            echo "$id" >"$file"
        fi
    fi
    cat "$file"
}

format_node() {
    local n="$1" data
    data="$(ndir "$n")/data"
    [[ -f "$data/meta.properties" ]] && return 0
    mkdir -p "$data"
    say "formatting node $n ($data)"
    # Static quorum (controller.quorum.voters): no --standalone / --initial-controllers.
    storage_tool format -t "$(cluster_id)" -c "$(props_of "$n")" >>"$(log_of "$n")" 2>&1 ||
        die "storage format of node $n failed; see $(log_of "$n")"
}

check_ports_free() {
    local n="$1" p
    for p in "$(port_of "$n")" "$(cport_of "$n")"; do
        port_open "$host" "$p" && die "port $host:$p (node $n) is in use by something else; \
set STREAMINFER_KAFKA_CLUSTER_PORT / STREAMINFER_KAFKA_CLUSTER_CONTROLLER_PORT"
    done
    return 0
}

# Properties rendered on every start (port changes apply), one log per run, storage formatted
# once.
prepare_node() {
    local n="$1" log
    log="$(log_of "$n")"
    mkdir -p "$(ndir "$n")"
    render_props "$n"
    [[ -f "$log" ]] && mv -f "$log" "$log.1"
    format_node "$n"
}

launch_node() {
    local n="$1" pid
    # Same JVM flags as the one-node broker (kafka.sh); see there for the setsid and 9>&-.
    # shellcheck disable=SC2086 # heap_opts holds several flags
    setsid java $heap_opts \
        -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
        -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
        -Dkafka.logs.dir="$(ndir "$n")" -Dlog4j2.configurationFile="$log4j" \
        -cp "$lib/*" kafka.Kafka "$(props_of "$n")" \
        </dev/null >>"$(log_of "$n")" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$(pidfile_of "$n")"
    say "node $n: started pid $pid on $host:$(port_of "$n") (log: $(log_of "$n"))"
}

# Every node answers, and each one's metadata lists all of them.
all_ready() {
    local i
    for ((i = 1; i <= nodes; i++)); do node_ready "$i" "$nodes" || return 1; done
}

start() {
    local i pending=()
    for ((i = 1; i <= nodes; i++)); do
        node_pid "$i" >/dev/null || pending+=("$i")
    done
    if ((${#pending[@]} > 0)); then
        for i in "${pending[@]}"; do check_ports_free "$i"; done
        KAFKA_NODES=1 bash "$here/kafka.sh" fetch
        mkdir -p "$cdir"
        cluster_id >/dev/null
        # Formatting starts a JVM per node: in parallel, it costs one start instead of three.
        local jobs=()
        for i in "${pending[@]}"; do
            prepare_node "$i" &
            jobs+=($!)
        done
        for i in "${jobs[@]}"; do wait "$i" || die "preparing a node failed (see above)"; done
        # All at once: a node's controller waits for a majority of voters before it can serve.
        for i in "${pending[@]}"; do launch_node "$i"; done
    fi

    local t0=$SECONDS
    until all_ready; do
        for ((i = 1; i <= nodes; i++)); do
            node_pid "$i" >/dev/null && continue
            echo "----- last 30 lines of $(log_of "$i") -----" >&2
            tail -n 30 "$(log_of "$i")" >&2 || true
            die "node $i exited during startup; full log: $(log_of "$i")"
        done
        if ((SECONDS - t0 >= start_timeout)); then
            # Callers treat "pid alive" as running, so a failed start leaves nothing behind.
            say "not ready after ${start_timeout}s (raise STREAMINFER_KAFKA_START_TIMEOUT?); stopping" >&2
            for i in "${pending[@]}"; do stop_node "$i" >&2; done
            die "start timed out; logs in $cdir/node-*/kafka.log"
        fi
        sleep 0.5
    done
    say "ready after $((SECONDS - t0))s: $(bootstrap)"
}

# --- stop ------------------------------------------------------------------------------------

stop_node() {
    local n="$1" pid
    if ! pid="$(node_pid "$n")"; then
        say "node $n: not running"
        return 0
    fi
    say "node $n: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    await_exit "$pid" 30
    rm -f "$(pidfile_of "$n")"
    say "node $n: stopped"
}

stop() {
    if [[ -n "${1:-}" ]]; then
        stop_node "$1" # the others keep the quorum and take over its leaderships
        return
    fi
    # Every node at once (~6 s). One at a time, the last node's controlled shutdown waits for
    # a quorum majority that has already gone, until SIGKILL (measured: 30 s more).
    local i pid pids=()
    for ((i = 1; i <= nodes; i++)); do
        if pid="$(node_pid "$i")"; then
            say "node $i: stopping pid $pid"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$i:$pid")
        fi
    done
    ((${#pids[@]} > 0)) || say "not running"
    for pid in "${pids[@]}"; do
        await_exit "${pid#*:}" 30
        rm -f "$(pidfile_of "${pid%%:*}")"
        say "node ${pid%%:*}: stopped"
    done
}

# --- status, logs ----------------------------------------------------------------------------

status() {
    local i pid up=0 controller
    for ((i = 1; i <= nodes; i++)); do
        if pid="$(node_pid "$i")"; then
            up=$((up + 1))
            if node_ready "$i"; then
                say "node $i: running (pid $pid) on $host:$(port_of "$i")"
            else
                say "node $i: running (pid $pid) on $host:$(port_of "$i"), not answering yet"
            fi
        else
            say "node $i: stopped"
        fi
    done
    controller="$(active_controller || true)"
    ((up > 0)) && [[ -n "$controller" ]] && say "active controller (last persisted): $controller"
    say "bootstrap: $(bootstrap)"
    ((up == nodes)) && return 0
    ((up == 0)) && return 3
    return 4
}

logs() {
    local n="${1:-}"
    [[ "$n" =~ ^[0-9]+$ ]] || die "usage: logs N [-f]"
    local log
    log="$(log_of "$n")"
    [[ -f "$log" ]] || die "no log yet ($log)"
    [[ "${2:-}" == "-f" ]] && exec tail -n 100 -F "$log"
    tail -n 200 "$log"
}

node_arg() {
    [[ -z "${1:-}" ]] && return 0
    [[ "$1" =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= nodes)) || die "no node '$1' (1..$nodes)"
}

cmd="${1:-}"
case "$cmd" in
start | stop)
    [[ "$cmd" == start && -n "${2:-}" ]] && die "start takes no node: it starts every node that is not running"
    node_arg "${2:-}"
    mkdir -p "$cdir"
    exec 9>"$cdir/.lock" # serialize concurrent start/stop; the JVMs do not inherit fd 9
    flock 9
    "$cmd" "${2:-}"
    ;;
fetch) KAFKA_NODES=1 exec bash "$here/kafka.sh" fetch ;;
status) status ;;
bootstrap) bootstrap ;;
pid)
    node_arg "${2:-}"
    node_pid "${2:?usage: pid N}"
    ;;
logs)
    shift
    logs "$@"
    ;;
*)
    echo "usage: KAFKA_NODES=$nodes $0 {start|stop [N]|status|bootstrap|pid N|logs N [-f]|fetch}" >&2
    exit 2
    ;;
esac
