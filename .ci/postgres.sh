#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on loopback for the distributed-search tests and print
# the URL to export as AUTOPRUNE_TEST_POSTGRES_URL. Usage:
#   export AUTOPRUNE_TEST_POSTGRES_URL="$(bash .ci/postgres.sh)"
# Installs Debian's postgresql package when no server binaries are found (needs root or sudo).
# The cluster lives in a fresh temporary folder, listens on 127.0.0.1 only, and is owned by
# the 'postgres' system user when run as root (PostgreSQL refuses to run as root).
set -euo pipefail
PORT="${AUTOPRUNE_PG_PORT:-5432}"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

pg_bin() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; fi
}
BIN="$(pg_bin)"
if [ -z "$BIN" ]; then
  echo "installing postgresql (apt-get)..." >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  BIN="$(pg_bin)"
fi
[ -n "$BIN" ] || { echo "error: PostgreSQL server binaries not found after install" >&2; exit 1; }

# A free port: the requested one, else the next free ones.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 1 20); do port_free "$PORT" && break; PORT=$((PORT + 1)); done

DATA="$(mktemp -d /tmp/autoprune-pg.XXXXXX)"
RUN=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir "$DATA" postgres
  chown postgres "$DATA"
  RUN=(runuser -u postgres --)
fi
${RUN[@]+"${RUN[@]}"} "$BIN/initdb" -D "$DATA/db" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
${RUN[@]+"${RUN[@]}"} "$BIN/pg_ctl" -D "$DATA/db" -l "$DATA/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c max_connections=200" start >&2
${RUN[@]+"${RUN[@]}"} "$BIN/psql" -h "$DATA" -p "$PORT" -U postgres -q -v ON_ERROR_STOP=1 \
  -c "CREATE USER autoprune WITH PASSWORD 'autoprune';" -c "CREATE DATABASE autoprune_test OWNER autoprune;" >&2
echo "postgresql://autoprune:autoprune@127.0.0.1:$PORT/autoprune_test"
