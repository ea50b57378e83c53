# shellcheck shell=bash
# Process helpers shared by the ops scripts (sourced by common.sh, which defines `say`).
# Never signal a pid we cannot prove is ours: pids are recycled.

# Alive = exists and is not a zombie. Daemons here are reparented to PID 1, which may reap
# exited children late; a zombie has finished and must not be waited for.
alive() {
    local state
    state="$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

# port_open HOST PORT: something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# pid_matching PIDFILE PATTERN: prints the pid from PIDFILE if that process is alive and its
# command line contains PATTERN; otherwise removes the stale pid file and fails.
pid_matching() {
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(cat "$1")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && [[ -r "/proc/$pid/cmdline" ]] &&
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$2"; then
        echo "$pid"
        return 0
    fi
    rm -f "$1"
    return 1
}

# await_exit PID SECONDS: wait for PID to exit; SIGKILL it after SECONDS.
await_exit() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        alive "$1" || return 0
        sleep 0.1
    done
    say "still running after ${2}s, sending SIGKILL"
    kill -KILL "$1" 2>/dev/null || true
    while alive "$1"; do sleep 0.1; done
}
