#!/usr/bin/env bash
# A local PostgreSQL cluster for tests and development, from Debian's packages.
#
#   bash scripts/postgres.sh [start] [DATA_DIR]   install if missing, init, start; print the URL
#   bash scripts/postgres.sh stop [DATA_DIR]      stop the cluster
#   bash scripts/postgres.sh status [DATA_DIR]    exit 0 when it runs
#
# DATA_DIR defaults to $CONCIERGE_HOME/pg (CONCIERGE_HOME defaults to ~/.local/share/concierge), or,
# as root when the postgres user cannot reach that, /var/tmp/concierge-pg-<hash of it>/pg.
# Port: $CONCIERGE_PG_PORT (55432). Database: $CONCIERGE_PG_DATABASE (concierge_test), owned by the
# role $CONCIERGE_PG_USER (concierge) whose generated password is kept in DATA_DIR/../pg.password.
# The cluster listens on 127.0.0.1 only; when run as root it is owned by the `postgres` user.
# Only the SQLAlchemy URL goes to stdout, so this works:
#
#   export CONCIERGE_TEST_POSTGRES_URL="$(bash scripts/postgres.sh)"
set -euo pipefail

action=start
case "${1:-}" in
  start | stop | status) action=$1; shift ;;
  -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

home="${CONCIERGE_HOME:-$HOME/.local/share/concierge}"
data="${1:-$home/pg}"
port="${CONCIERGE_PG_PORT:-55432}"
database="${CONCIERGE_PG_DATABASE:-concierge_test}"
user="${CONCIERGE_PG_USER:-concierge}"

say() { echo "postgres.sh: $*" >&2; }

find_bindir() {
  local dir
  if command -v pg_config >/dev/null 2>&1; then
    dir="$(pg_config --bindir 2>/dev/null || true)"
    if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

bindir="$(find_bindir || true)"
if [ -z "$bindir" ]; then
  if [ "$action" != start ]; then say "PostgreSQL is not installed"; exit 1; fi
  if [ "$(id -u)" != 0 ]; then
    say "PostgreSQL is not installed; run as root (or: apt-get install -y postgresql)"
    exit 1
  fi
  say "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq postgresql >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq postgresql >/dev/null
  fi
  bindir="$(find_bindir)"
fi

# As root the cluster belongs to the `postgres` user (PostgreSQL refuses to run as root).
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# As root, the `postgres` user must be able to reach the data folder. When the default one sits
# under a folder it cannot search (a checkout in a private `mktemp -d`, say), use a folder of
# its own under /var/tmp, named after the default so start, status and stop agree on it.
if [ "$(id -u)" = 0 ] && [ -z "${1:-}" ]; then
  probe="$(dirname "$data")"
  while [ ! -d "$probe" ]; do probe="$(dirname "$probe")"; done
  if ! runuser -u postgres -- test -x "$probe"; then
    data="/var/tmp/concierge-pg-$(printf '%s' "$data" | sha256sum | cut -c1-12)/pg"
    [ "$action" = start ] && say "the postgres user cannot reach the default folder; using $data"
  fi
fi

running() { as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; }

case "$action" in
  status)
    if [ -f "$data/PG_VERSION" ] && running; then say "running ($data, port $port)"; exit 0; fi
    say "not running ($data)"
    exit 1
    ;;
  stop)
    if [ -f "$data/PG_VERSION" ] && running; then
      as_owner "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null
      say "stopped ($data)"
    else
      say "not running ($data)"
    fi
    exit 0
    ;;
esac

mkdir -p "$(dirname "$data")"
data="$(cd "$(dirname "$data")" && pwd)/$(basename "$data")"
password_file="$(dirname "$data")/pg.password"

if [ ! -f "$data/PG_VERSION" ]; then
  say "initialising a cluster in $data"
  mkdir -p "$data"
  chmod 700 "$data"
  if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$data"
    if ! runuser -u postgres -- test -w "$data"; then
      say "the postgres user cannot reach $data (a parent folder is not searchable); pass a"
      say "data folder it can reach, e.g. bash scripts/postgres.sh /var/tmp/concierge-pg"
      exit 1
    fi
  fi
  as_owner "$bindir/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$data.initdb.log" 2>&1 || {
    cat "$data.initdb.log" >&2
    exit 1
  }
  rm -f "$data.initdb.log"
fi

if [ ! -s "$password_file" ]; then
  (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=\n' >"$password_file")
fi
password="$(cat "$password_file")"

if ! running; then
  say "starting on 127.0.0.1:$port"
  as_owner "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
    -o "-p $port -k $data -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
fi

psql_admin() { as_owner "$bindir/psql" -h "$data" -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

# Role and database, idempotently; the password is (re)set so the file stays the truth.
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$user'")" != 1 ]; then
  psql_admin -c "CREATE ROLE \"$user\" LOGIN" >/dev/null
fi
psql_admin -c "ALTER ROLE \"$user\" PASSWORD '$password'" >/dev/null
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE \"$database\" OWNER \"$user\"" >/dev/null
fi

echo "postgresql+psycopg://$user:$password@127.0.0.1:$port/$database"
