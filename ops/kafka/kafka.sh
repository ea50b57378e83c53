#!/usr/bin/env bash
# Local single-node Kafka (KRaft, broker + controller in one JVM) run straight from Maven jars:
# no tarball, no Docker, nothing listening beyond 127.0.0.1.
#
#   ops/kafka/kafka.sh fetch           java + maven (apt, as root) and the broker jars
#   ops/kafka/kafka.sh start           fetch, format storage once, start, wait until ready
#   ops/kafka/kafka.sh stop            SIGTERM, up to 30 s for a clean shutdown, then SIGKILL
#   ops/kafka/kafka.sh status          exit 0 when running, 3 when stopped
#   ops/kafka/kafka.sh logs [-f]       last lines of the broker log (follow with -f)
#
# Environment:
#   STREAMINFER_HOME                   state root (default <repo>/.cache); uses $STREAMINFER_HOME/kafka/
#   STREAMINFER_KAFKA_PORT             client port (default 9092)
#   STREAMINFER_KAFKA_CONTROLLER_PORT  KRaft controller port (default 9093)
#   STREAMINFER_KAFKA_START_TIMEOUT    seconds `start` waits for readiness (default 60)
#   STREAMINFER_KAFKA_HEAP_OPTS        default "-Xmx512m -Xms512m"
#   PYTHON                             interpreter for the readiness probe
#                                      (default <repo>/.venv/bin/python, else python3)
#   KAFKA_NODES                        1 (default): this one node. 3 (up to 5): a local KRaft
#                                      cluster on other ports and directories, run by
#                                      ops/kafka/cluster.sh (see there); nothing below applies
#
# Without root (no apt) and without java 17+/maven, use `docker compose up` instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

if [[ "${KAFKA_NODES:-1}" != 1 ]]; then
    exec bash "$here/cluster.sh" "$@"
fi

# shellcheck source=ops/lib/common.sh
source "$here/../lib/common.sh" kafka

kdir="$home/kafka"
lib="$kdir/lib"
data="$kdir/data"
log="$kdir/kafka.log"
pidfile="$kdir/kafka.pid"
props="$kdir/server.properties"
pom="$here/pom.xml"
log4j="$here/log4j2.properties"

host=127.0.0.1
port="${STREAMINFER_KAFKA_PORT:-9092}"
cport="${STREAMINFER_KAFKA_CONTROLLER_PORT:-9093}"
start_timeout="${STREAMINFER_KAFKA_START_TIMEOUT:-60}"
heap_opts="${STREAMINFER_KAFKA_HEAP_OPTS:--Xmx512m -Xms512m}"

find_python

# --- fetch ------------------------------------------------------------------------------

java_major() {
    # `java -version` prints e.g. `openjdk version "17.0.15" 2025-04-15` (or "1.8.0_x" for 8).
    local v
    v="$(java -version 2>&1 | sed -n 's/.*version "\([0-9][0-9.]*\).*/\1/p' | head -n1)"
    v="${v#1.}"
    echo "${v%%.*}"
}

ensure_tools() {
    local missing=()
    local jm=""
    command -v java >/dev/null && jm="$(java_major)"
    if [[ -z "$jm" ]] || ((jm < 17)); then
        missing+=(openjdk-17-jre-headless) # the broker needs Java 17+
    fi
    command -v mvn >/dev/null || missing+=(maven)
    ((${#missing[@]} == 0)) && return 0
    if ((EUID != 0)); then
        die "missing ${missing[*]} and not root, so cannot apt-get install them.
Install them (Java 17+ and Maven), or run the stack in containers instead: docker compose up"
    fi
    say "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

fetch() {
    ensure_tools
    # The stamp holds the pom's hash: a changed pom (e.g. a new Kafka version) refetches into
    # a fresh directory, so jars of two versions never end up on one classpath.
    local want have=""
    want="$(sha256sum "$pom" | cut -d' ' -f1)"
    [[ -f "$lib/.stamp" ]] && have="$(cat "$lib/.stamp")"
    if [[ "$have" == "$want" ]] && compgen -G "$lib/kafka_2.13-*.jar" >/dev/null; then
        return 0
    fi
    say "fetching broker jars into $lib"
    local tmp="$lib.tmp.$$"
    rm -rf "$tmp"
    # Output to a file: Maven 3.8 prints stray colour codes even with -B -q.
    if ! mvn -B -q -f "$pom" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime >"$kdir/mvn.log" 2>&1; then
        rm -rf "$tmp"
        tail -n 40 "$kdir/mvn.log" >&2
        die "mvn dependency:copy-dependencies failed (pom: $pom, full output: $kdir/mvn.log)"
    fi
    echo "$want" >"$tmp/.stamp"
    rm -rf "$lib"
    mv "$tmp" "$lib"
}

# --- process helpers ----------------------------------------------------------------------

# The pid from the pid file if that process is alive and is our broker.
our_pid() { pid_matching "$pidfile" "kafka.Kafka $props"; }

# One readiness check: a Metadata request answered (probe.py), or, with no Python at all,
# "Kafka Server started" in this run's log plus an open client port.
ready() {
    if [[ -n "$PYTHON" ]]; then
        "$PYTHON" "$here/probe.py" "$host" "$port" 2 2>/dev/null
    else
        grep -q "Kafka Server started" "$log" 2>/dev/null && port_open "$host" "$port"
    fi
}

# --- commands -------------------------------------------------------------------------

# The template's ${KAFKA_PORT}-style placeholders are matched literally (single quotes), so
# nothing else in it is expanded and no envsubst (gettext) is needed.
# shellcheck disable=SC2016
render_props() {
    local text
    text="$(<"$here/server.properties.template")"
    text="${text//'${KAFKA_PORT}'/$port}"
    text="${text//'${CONTROLLER_PORT}'/$cport}"
    text="${text//'${DATA_DIR}'/$data}"
    printf '%s\n' "$text" >"$props"
}

format_storage() {
    [[ -f "$data/meta.properties" ]] && return 0
    local cluster_id
    # Our log4j config logs to stdout too, so the id is the last line; check its shape, since
    # the storage tool would happily write any string (even a log line) as the cluster id.
    cluster_id="$(java -Dlog4j2.configurationFile="$log4j" -cp "$lib/*" kafka.tools.StorageTool random-uuid | tail -n 1)" ||
        die "StorageTool random-uuid failed"
    [[ "$cluster_id" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "StorageTool random-uuid printed '$cluster_id', not a cluster id"
    say "formatting $data (cluster id $cluster_id)"
    # --standalone: this node becomes the single voter of a dynamic KRaft quorum.
    java -Dlog4j2.configurationFile="$log4j" -cp "$lib/*" \
        kafka.tools.StorageTool format -t "$cluster_id" -c "$props" --standalone >>"$log" 2>&1 ||
        die "storage format failed; see $log"
}

start() {
    local pid
    if pid="$(our_pid)"; then
        if ready; then
            say "already running (pid $pid) on $host:$port"
            return 0
        fi
        say "pid $pid is running but not answering yet; waiting"
    else
        if port_open "$host" "$port"; then
            # Someone else's broker (another checkout, docker compose, ...): fine if it answers
            # a metadata request (without Python we cannot ask, and our log says nothing about it).
            [[ -n "$PYTHON" ]] || die "port $host:$port is already in use, and without python3 this script cannot check that it is a Kafka broker"
            if ready; then
                say "a Kafka not started by this script is already answering on $host:$port; using it"
                return 0
            fi
            die "port $host:$port is taken by something that does not answer Kafka metadata requests"
        fi
        port_open "$host" "$cport" && die "controller port $host:$cport is already in use (set STREAMINFER_KAFKA_CONTROLLER_PORT)"

        fetch
        mkdir -p "$data"
        # Rendered on every start, so port changes apply to existing data too. (The quorum's
        # voter set keeps the controller port it was formatted with, but a single voter never
        # dials itself: restarting on another controller port was tested to work.)
        render_props
        # One log per run, so the fallback readiness check cannot match a previous run's line.
        [[ -f "$log" ]] && mv -f "$log" "$log.1"
        format_storage

        # JVM flags as in Kafka's kafka-server-start.sh / kafka-run-class.sh, smaller heap.
        # Measured, not used (bench/README.md tuning log): -XX:TieredStopAtLevel=1 removes the
        # C2 compiler's CPU (about half of a fresh broker's for its first minutes) but doubles
        # request-handling CPU once warm; ParallelGC/SerialGC: GC is < 5 % of the broker's CPU.
        # shellcheck disable=SC2086 # heap_opts holds several flags
        setsid java $heap_opts \
            -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
            -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
            -Dkafka.logs.dir="$kdir" -Dlog4j2.configurationFile="$log4j" \
            -cp "$lib/*" kafka.Kafka "$props" \
            </dev/null >>"$log" 2>&1 9>&- &
        # setsid execs java in place (a non-interactive shell's background job is not a group
        # leader, so it need not fork): $! is the JVM itself, in its own session, so it
        # outlives the caller's terminal.
        pid=$!
        echo "$pid" >"$pidfile"
        say "started pid $pid, waiting up to ${start_timeout}s for $host:$port (log: $log)"
    fi

    local t0=$SECONDS
    until ready; do
        if ! alive "$pid"; then
            rm -f "$pidfile"
            echo "----- last 40 lines of $log -----" >&2
            tail -n 40 "$log" >&2 || true
            die "broker exited during startup; full log: $log"
        fi
        if ((SECONDS - t0 >= start_timeout)); then
            echo "----- last 40 lines of $log -----" >&2
            tail -n 40 "$log" >&2 || true
            # A failed start leaves nothing behind (callers treat "pid alive" as running).
            say "not ready after ${start_timeout}s (raise STREAMINFER_KAFKA_START_TIMEOUT?); stopping it" >&2
            stop >&2
            die "start timed out; full log: $log"
        fi
        sleep 0.5
    done
    say "ready on $host:$port after $((SECONDS - t0))s (pid $pid)"
}

stop() {
    local pid
    if ! pid="$(our_pid)"; then
        say "not running"
        return 0
    fi
    say "stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    await_exit "$pid" 30 # a controlled shutdown normally takes 1-3 s
    rm -f "$pidfile"
    say "stopped"
}

status() {
    local pid
    if pid="$(our_pid)"; then
        if ready; then
            say "running (pid $pid) on $host:$port"
        else
            say "running (pid $pid) on $host:$port, not answering metadata requests yet"
        fi
        return 0
    fi
    say "stopped"
    return 3
}

logs() {
    [[ -f "$log" ]] || die "no log yet ($log)"
    if [[ "${1:-}" == "-f" ]]; then
        exec tail -n 100 -F "$log"
    fi
    tail -n 200 "$log"
    echo "(log: $log)" >&2
}

cmd="${1:-}"
case "$cmd" in
fetch | start | stop)
    mkdir -p "$kdir"
    # Serialize concurrent invocations (e.g. two test runs calling start). fd 9 is closed
    # for the JVM (9>&- above) so the broker does not hold the lock after we exit.
    exec 9>"$kdir/.lock"
    flock 9
    "$cmd"
    ;;
status) status ;;
logs)
    shift
    logs "$@"
    ;;
*)
    echo "usage: $0 {fetch|start|stop|status|logs [-f]}" >&2
    exit 2
    ;;
esac
