#!/usr/bin/env bash
# with-services.sh — run a command against throwaway PostgreSQL and Redis.
#
# Usage: scripts/with-services.sh <command> [args...]
#
#   1. Installs what is missing from Debian's packages (as root only):
#      postgresql, redis-server, chromium, docker-compose.
#   2. Starts a fresh PostgreSQL cluster (initdb in a mktemp -d directory) and
#      a redis-server, each on its own free port on 127.0.0.1.
#   3. Runs the command with these exported:
#        DATABASE_URL=postgresql://postgres@127.0.0.1:<pgport>/postgres
#        REDIS_URL=redis://127.0.0.1:<redisport>/0
#        WITH_SERVICES_PG_BIN=<directory of the PostgreSQL server binaries>
#   4. Always stops both servers and removes the temp directory (on success,
#      failure, Ctrl-C or SIGTERM) and exits with the command's exit code
#      (128+N when the script itself was killed by signal N).
#
# If DATABASE_URL and REDIS_URL are both set and WITH_SERVICES_REUSE=1, no
# server is started: the command just runs against the existing ones.
#
# Several runs may go on at once: each has its own temp dir and ports.
set -euo pipefail

# Our messages go to a copy of stderr: a trap may fire while some command's
# output is redirected to a log file, and its messages must not end up there.
exec {ERR_FD}>&2
log() { printf 'with-services: %s\n' "$*" >&"$ERR_FD"; }
die() { log "error: $*"; exit 1; }

if [[ $# -eq 0 ]]; then
    sed -n '2,21s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi

# --- Reuse the developer's own servers ---------------------------------------
if [[ "${WITH_SERVICES_REUSE:-}" == 1 && -n "${DATABASE_URL:-}" && -n "${REDIS_URL:-}" ]]; then
    log "WITH_SERVICES_REUSE=1: using existing DATABASE_URL and REDIS_URL"
    exec "$@" {ERR_FD}>&-
fi

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# --- Finding and installing what is needed -----------------------------------

# Newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, or else
# the directory of an initdb on PATH (symlinks resolved). Empty if none.
find_pg_bin() {
    local dir found=""
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] && found="$dir"$'\n'"$found"
    done
    if [[ -n "$found" ]]; then
        printf '%s' "$found" | sort -V | tail -n 1
    elif command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(readlink -f "$(command -v initdb)")"
    fi
}

# Prints the Debian packages still needed, space separated.
missing_packages() {
    local pkgs=()
    [[ -n "$(find_pg_bin)" ]] || pkgs+=(postgresql)
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || pkgs+=(redis-server)
    # Browser for the admin browser tests (Playwright drives Debian's Chromium).
    [[ -x /usr/bin/chromium ]] || pkgs+=(chromium)
    # For the test that validates docker-compose.yml (no engine is needed).
    command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
        || pkgs+=(docker-compose)
    echo "${pkgs[*]}"
}

install_missing() {
    local missing
    missing=$(missing_packages)
    [[ -z "$missing" ]] && return 0
    if [[ $IS_ROOT -ne 1 ]]; then
        die "missing packages: $missing
  install them with:  sudo apt-get install -y --no-install-recommends $missing"
    fi
    # Serialize concurrent installs; re-check once we hold the lock.
    exec 9>/var/lock/with-services-apt.lock
    flock -w 1200 9 || die "timed out waiting for another install to finish"
    missing=$(missing_packages)
    if [[ -n "$missing" ]]; then
        log "installing: $missing (apt-get; may take a few minutes)"
        # Keep the packages from starting their own services (postgresql's main
        # cluster, redis on 6379) unless a policy already says so.
        local own_policy=0
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            own_policy=1
        fi
        local rc=0 apt_log
        apt_log=$(mktemp -t with-services-apt.XXXXXXXX.log)
        # $missing is split into package names on purpose.
        # shellcheck disable=SC2086
        {
            apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
        } </dev/null >"$apt_log" 2>&1 || rc=$?
        [[ $own_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
        if [[ $rc -ne 0 ]]; then
            tail -n 30 "$apt_log" >&"$ERR_FD"
            die "apt-get failed (exit $rc) installing: $missing (full log: $apt_log)"
        fi
        rm -f "$apt_log"
        log "installed: $missing"
    fi
    exec 9>&-
}

install_missing

PG_BIN=$(find_pg_bin)
[[ -n "$PG_BIN" ]] || die "PostgreSQL server binaries not found after install"

# The postgres server refuses to run as root: as root, run it as 'postgres'.
if [[ $IS_ROOT -eq 1 ]] && ! id -u postgres >/dev/null 2>&1; then
    log "creating system user postgres"
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
fi

# --- Helpers -----------------------------------------------------------------

# A free TCP port on 127.0.0.1, as chosen by the OS (bind to port 0).
free_port() {
    local py
    for py in python3 python; do
        if command -v "$py" >/dev/null; then
            "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' && return 0
        fi
    done
    # No Python: a random high port nobody answers on.
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return 0; }
    done
    return 1
}

# Run a PostgreSQL binary as the server's owner, from a directory it can read.
as_pg() {
    if [[ $IS_ROOT -eq 1 ]]; then
        (cd "$TMP" && exec runuser -u postgres -- "$@" {ERR_FD}>&-)
    else
        (cd "$TMP" && exec "$@" {ERR_FD}>&-)
    fi
}

# Is process $1 running? A zombie (exited, not yet reaped: pg_ctl's postmaster
# is reparented to PID 1, which may reap it late) counts as gone.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }           # the fields after "pid (comm) "
    [[ ${stat:0:1} != Z ]]
}

# Shows the end of a log file (if any) on our stderr, for failures.
show_log() {
    if [[ -s "$1" ]]; then tail -n 20 "$1" >&"$ERR_FD" || true; fi
}

# Waits up to $1 seconds for process $2 to exit; kills it hard after that.
stop_pid() {
    local secs=$1 pid=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# --- Cleanup: runs once, whatever happens ------------------------------------
TMP=""
PGDATA_DIR=""
PG_PID=""
REDIS_PID=""
CMD_PID=""
CLEANED=0

cleanup() {
    [[ $CLEANED -eq 1 ]] && return 0
    CLEANED=1
    set +e
    # The command, if still running (we were interrupted).
    if [[ -n "$CMD_PID" ]] && alive "$CMD_PID"; then
        log "stopping the command (pid $CMD_PID)"
        kill -TERM "$CMD_PID" 2>/dev/null
        stop_pid 10 "$CMD_PID"
        wait "$CMD_PID" 2>/dev/null
    fi
    # PostgreSQL: immediate shutdown (nothing to keep), then make sure.
    if [[ -n "$PGDATA_DIR" && -f "$PGDATA_DIR/postmaster.pid" ]]; then
        [[ -n "$PG_PID" ]] || PG_PID=$(head -n 1 "$PGDATA_DIR/postmaster.pid" 2>/dev/null)
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w -t 15 stop >/dev/null 2>&1
    fi
    [[ -n "$PG_PID" ]] && stop_pid 5 "$PG_PID"
    # Redis: SIGTERM shuts it down (no save configured).
    if [[ -n "$REDIS_PID" ]]; then
        kill -TERM "$REDIS_PID" 2>/dev/null
        stop_pid 10 "$REDIS_PID"
        wait "$REDIS_PID" 2>/dev/null
    fi
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        rm -rf "$TMP"
        log "services stopped, $TMP removed"
    fi
}

on_exit() {
    local rc=$?
    cleanup
    exit "$rc"
}

on_signal() {
    log "got SIG$1, cleaning up"
    cleanup
    exit "$2"
}

trap on_exit EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

# --- PostgreSQL --------------------------------------------------------------
TMP=$(mktemp -d -t with-services.XXXXXXXX)
mkdir "$TMP/redis"
[[ $IS_ROOT -eq 1 ]] && chown postgres: "$TMP"
PGDATA_DIR="$TMP/pgdata"
PG_LOG="$TMP/postgres.log"

as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust \
    --encoding=UTF8 --no-locale --no-sync >"$TMP/initdb.log" 2>&1 ||
    { show_log "$TMP/initdb.log"; die "initdb failed"; }

# Throwaway server: loopback only, socket in our private dir, no durability.
cat >>"$PGDATA_DIR/postgresql.conf" <<EOF

# --- with-services.sh ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
# Trust, but only on the private socket and 127.0.0.1.
cat >"$PGDATA_DIR/pg_hba.conf" <<EOF
local all         all                trust
host  all         all   127.0.0.1/32 trust
local replication all                trust
host  replication all   127.0.0.1/32 trust
EOF

# Start on a free port; if another process grabbed it meanwhile, try another.
for attempt in 1 2 3; do
    PG_PORT=$(free_port) || die "no free port found"
    if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PG_LOG" -o "-p $PG_PORT" -w -t 30 start >/dev/null 2>&1; then
        break
    fi
    if [[ $attempt -eq 3 ]] || ! grep -qs 'already in use' "$PG_LOG"; then
        show_log "$PG_LOG"
        die "PostgreSQL did not start"
    fi
    log "port $PG_PORT taken, retrying"
done
PG_PID=$(head -n 1 "$PGDATA_DIR/postmaster.pid")
# Confirm it accepts TCP connections (pg_ctl -w already waited for "ready").
for ((i = 0; ; i++)); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres && break
    if ((i >= 300)); then
        show_log "$PG_LOG"
        die "PostgreSQL not accepting connections on port $PG_PORT after 30 s"
    fi
    sleep 0.1
done
log "PostgreSQL $("$PG_BIN/postgres" -V | awk '{print $3}') on 127.0.0.1:$PG_PORT (in $TMP)"

# --- Redis -------------------------------------------------------------------
REDIS_LOG="$TMP/redis/redis.log"
for attempt in 1 2 3; do
    REDIS_PORT=$(free_port) || die "no free port found"
    # In the background (not daemonized) so its pid is known at once; all its
    # fds are redirected so it never holds the caller's pipes open. Errors
    # before it opens its log file (bad options) go to redis.out.
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize no --dir "$TMP/redis" --pidfile "$TMP/redis/redis.pid" \
        --logfile "$REDIS_LOG" </dev/null >"$TMP/redis/redis.out" 2>&1 {ERR_FD}>&- &
    REDIS_PID=$!
    for ((i = 0; i < 150; i++)); do
        [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] && break 2
        alive "$REDIS_PID" || break  # died, e.g. port taken
        sleep 0.1
    done
    if alive "$REDIS_PID"; then
        show_log "$TMP/redis/redis.out"; show_log "$REDIS_LOG"
        die "Redis did not answer PING on port $REDIS_PORT after 15 s"
    fi
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
    if [[ $attempt -eq 3 ]] || ! grep -qs 'already in use' "$REDIS_LOG"; then
        show_log "$TMP/redis/redis.out"; show_log "$REDIS_LOG"
        die "Redis did not start"
    fi
    log "port $REDIS_PORT taken, retrying"
done
log "Redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') on 127.0.0.1:$REDIS_PORT"

# --- Run the command ---------------------------------------------------------
export DATABASE_URL="postgresql://postgres@127.0.0.1:$PG_PORT/postgres"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export WITH_SERVICES_PG_BIN="$PG_BIN"

log "running: $*"
# In the background + wait, so that SIGTERM/SIGINT reach our trap at once
# instead of after the command ends. Bash would give a background command
# /dev/null as stdin, so pass ours on explicitly (if we have one).
if { : <&0; } 2>/dev/null; then
    "$@" <&0 {ERR_FD}>&- &
else
    "$@" </dev/null {ERR_FD}>&- &
fi
CMD_PID=$!
rc=0
wait "$CMD_PID" || rc=$?
CMD_PID=""
log "command exited with $rc"
exit "$rc"
