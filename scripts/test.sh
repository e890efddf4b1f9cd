#!/usr/bin/env bash
# Runs fusionsync's whole test suite against a real Postgres.
# Uses $DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres) when it answers;
# otherwise starts a throwaway Postgres cluster under target/ on a free port and stops it after.
# Every test creates (and drops) a database of its own on that server.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

answers() {
  if command -v psql >/dev/null 2>&1; then
    psql "$1" -Atqc 'select 1' >/dev/null 2>&1
  else
    # no client: try the port at least
    python3 - "$1" <<'PY' >/dev/null 2>&1
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
socket.create_connection((u.hostname or "127.0.0.1", u.port or 5432), timeout=2).close()
PY
  fi
}

cleanup() { :; }
if ! answers "$DATABASE_URL"; then
  initdb=$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$initdb" ]; then
    echo "error: no Postgres answers at \$DATABASE_URL ($DATABASE_URL) and no initdb was found to start one." >&2
    echo "Install PostgreSQL (e.g. apt-get install postgresql) or point DATABASE_URL at a server." >&2
    exit 1
  fi
  bindir=$(dirname "$initdb")
  dir="$PWD/target/pgtest"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rm -rf "$dir" && mkdir -p "$dir"
  run=()
  if [ "$(id -u)" = 0 ]; then
    # initdb refuses to run as root: use the postgres (or nobody) account for the cluster.
    owner=$(id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody)
    chown "$owner" "$dir"
    run=(runuser -u "$owner" --)
  fi
  echo "starting a throwaway Postgres on 127.0.0.1:$port (data in $dir)"
  "${run[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log"
  "${run[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null
  cleanup() { "${run[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; }
  trap cleanup EXIT
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
fi

if cargo nextest --version >/dev/null 2>&1; then
  # (the crate has no doctests, which nextest would not run)
  cargo nextest run --all-targets --no-fail-fast "$@"
else
  cargo test --all-targets --no-fail-fast "$@"
fi
