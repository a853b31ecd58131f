# Shared helpers of the Swift and S3 testbed scripts (sourced, not run).
# State lives under the repository's .testbed/ (gitignored); installs under a cache
# directory outside the repository so that a fresh clone reuses them.

TESTBED_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TESTBED_DIR=${PHOENIX_TESTBED_DIR:-$TESTBED_REPO/.testbed}
TESTBED_CACHE=${PHOENIX_TESTBED_CACHE:-$HOME/.cache/phoenix-testbed}
TESTBED_ENV=$TESTBED_DIR/env

testbed_say() { echo "testbed: $*" >&2; }
testbed_die() { echo "testbed: error: $*" >&2; exit 1; }

# A free TCP port on 127.0.0.1 (the kernel picks it).
testbed_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# True when the process in pid file $1 is alive.
testbed_alive() {
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# Replaces the export lines of variables starting with $1 in .testbed/env with stdin.
testbed_set_env() {
    local prefix=$1 lines
    lines=$(cat)
    mkdir -p "$TESTBED_DIR"
    (
        flock 9
        touch "$TESTBED_ENV"
        grep -v "^export ${prefix}" "$TESTBED_ENV" > "$TESTBED_ENV.tmp" || true
        [ -n "$lines" ] && printf '%s\n' "$lines" >> "$TESTBED_ENV.tmp"
        mv "$TESTBED_ENV.tmp" "$TESTBED_ENV"
    ) 9> "$TESTBED_DIR/env.lock"
}

# Waits until command "$@" succeeds (0.1 s steps, at most $TESTBED_WAIT seconds).
testbed_wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + ${TESTBED_WAIT:-60}))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# Stops the process in pid file $1 (TERM, then KILL after 10 s) and removes the file.
testbed_stop_pid() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# Installs Debian packages (as root, or through sudo), refreshing the lists if needed.
testbed_apt_install() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 || {
        "${sudo[@]}" apt-get update -qq &&
            "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    }
}
