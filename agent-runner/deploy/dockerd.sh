#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine (DESIGN.md section 14).
#
# For machines without a Docker engine but with root (CI boxes, dev VMs without Docker Hub):
# installs docker.io from the distribution if it is missing and starts dockerd in the background
# with no default bridge and no iptables rules. Agent containers run with `--network none`, so the
# engine never needs a network of its own.
#
#   dockerd.sh           ensure the engine answers; exit 0 when it does, non-zero with a reason if not
#   dockerd.sh --check   exit 0 if the engine answers, 1 otherwise; changes nothing, prints nothing
#
# Environment:
#   HIVEMIND_DOCKERD_LOG             dockerd log file     (default /var/log/hivemind-dockerd.log)
#   HIVEMIND_DOCKERD_WAIT            seconds to wait      (default 60)
#   HIVEMIND_DOCKERD_STORAGE_DRIVER  storage driver       (default overlay2)
set -euo pipefail

LOG_FILE="${HIVEMIND_DOCKERD_LOG:-/var/log/hivemind-dockerd.log}"
WAIT_SECONDS="${HIVEMIND_DOCKERD_WAIT:-60}"
STORAGE_DRIVER="${HIVEMIND_DOCKERD_STORAGE_DRIVER:-overlay2}"
PID_FILE=/var/run/docker.pid

say() { printf 'dockerd.sh: %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

engine_answers() {
    command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

# The pid of a dockerd that is already running (started by us earlier, systemd, or someone else).
running_dockerd_pid() {
    local pid
    if [[ -r "$PID_FILE" ]]; then
        pid="$(<"$PID_FILE")"
        if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "dockerd" ]]; then
            echo "$pid"
            return 0
        fi
    fi
    return 1
}

install_docker() {
    [[ "$(id -u)" -eq 0 ]] || fail "dockerd is not installed and installing it needs root (run: sudo $0)"
    command -v apt-get >/dev/null 2>&1 || fail "dockerd is not installed and this is not an apt-based system"
    say "installing docker.io with apt-get"
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
    # Waits for a concurrent apt/dpkg (DPkg::Lock::Timeout) instead of failing on the lock.
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends docker.io >&2; then
        say "install failed; refreshing package lists and retrying once"
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >&2 || fail "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends docker.io >&2 \
            || fail "apt-get install docker.io failed"
    fi
}

start_dockerd() {
    [[ "$(id -u)" -eq 0 ]] || fail "no Docker engine answers and starting one needs root (run: sudo $0)"
    mkdir -p "$(dirname "$LOG_FILE")"
    say "starting dockerd (storage driver $STORAGE_DRIVER), log in $LOG_FILE"
    printf '\n--- %s dockerd.sh starting dockerd ---\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$LOG_FILE"
    # setsid + nohup: the engine outlives this script and the shell that ran it.
    setsid nohup dockerd --iptables=false --bridge=none --storage-driver="$STORAGE_DRIVER" \
        >>"$LOG_FILE" 2>&1 </dev/null &
    echo $!
}

wait_for_engine() {
    local pid="$1" deadline=$((SECONDS + WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        engine_answers && return 0
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            say "dockerd exited during start-up; last lines of $LOG_FILE:"
            tail -n 20 "$LOG_FILE" >&2 || true
            return 1
        fi
        sleep 0.5
    done
    say "no answer from the Docker engine after ${WAIT_SECONDS}s; last lines of $LOG_FILE:"
    tail -n 20 "$LOG_FILE" >&2 || true
    return 1
}

main() {
    case "${1:-}" in
        --check)
            engine_answers
            exit $?
            ;;
        "") ;;
        -h | --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) fail "unknown argument: $1 (expected --check or nothing)" ;;
    esac

    if engine_answers; then
        exit 0
    fi
    [[ "$WAIT_SECONDS" =~ ^[0-9]+$ ]] || fail "HIVEMIND_DOCKERD_WAIT must be a whole number of seconds"

    command -v dockerd >/dev/null 2>&1 || install_docker
    command -v dockerd >/dev/null 2>&1 || fail "dockerd is still missing after installing docker.io"
    command -v docker >/dev/null 2>&1 || fail "the docker CLI is missing (install docker.io or docker-ce-cli)"

    local pid
    if pid="$(running_dockerd_pid)"; then
        say "dockerd is already running (pid $pid); waiting for it to answer"
    else
        pid="$(start_dockerd)"
    fi
    wait_for_engine "$pid" || fail "the Docker engine did not come up (see $LOG_FILE)"
    say "Docker engine is up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo unknown))"
}

main "$@"
