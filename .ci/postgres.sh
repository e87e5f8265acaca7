#!/usr/bin/env bash
# A local PostgreSQL for the shared-tracking-server test (tests/test_docker.py).
#
# Installs PostgreSQL from Debian's packages when it is missing, starts the cluster when it is not
# running, creates a login role and a database for the test (idempotent), and prints the server's
# URI on stdout; everything else goes to stderr. Exits non-zero when no server could be set up, so
# that the caller (.ci/run) can go on without it; the test then skips and says why.
#
#   uri="$(.ci/postgres.sh)" && export COBOT_MED_TEST_POSTGRES_URI="$uri"
#
# Settings (environment): COBOT_MED_TEST_POSTGRES_URI (an existing server: only checked, printed),
# COBOT_MED_PG_ROLE / COBOT_MED_PG_PASSWORD / COBOT_MED_PG_DB, COBOT_MED_PG_APT_TIMEOUT (seconds
# per apt step, default 300), COBOT_MED_PG_START_TIMEOUT (seconds to wait for the server, 60).
set -uo pipefail

ROLE="${COBOT_MED_PG_ROLE:-cobot_med}"
PASSWORD="${COBOT_MED_PG_PASSWORD:-cobot_med}"
DB="${COBOT_MED_PG_DB:-cobot_med_test}"
APT_TIMEOUT="${COBOT_MED_PG_APT_TIMEOUT:-300}"
START_TIMEOUT="${COBOT_MED_PG_START_TIMEOUT:-60}"
HOST=127.0.0.1
export DEBIAN_FRONTEND=noninteractive

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Run as root / as the postgres user, whether we are root (CI containers) or may sudo without a TTY.
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
    else return 1
    fi
}
as_postgres() {
    if [ "$(id -u)" = 0 ] && command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"
    elif [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    else sudo -n -u postgres "$@"
    fi
}

tcp_login() {  # tcp_login URI: true when a password login over TCP works
    command -v psql >/dev/null 2>&1 && psql "$1" -qtAc 'SELECT 1' </dev/null >/dev/null 2>&1
}

cd /tmp || true  # psql run as postgres warns when it cannot read the caller's directory

if [ -n "${COBOT_MED_TEST_POSTGRES_URI:-}" ]; then
    tcp_login "$COBOT_MED_TEST_POSTGRES_URI" || die "COBOT_MED_TEST_POSTGRES_URI is set but no login works there"
    echo "$COBOT_MED_TEST_POSTGRES_URI"
    exit 0
fi

installed() { command -v pg_ctlcluster >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; }

if ! installed; then
    log "installing postgresql from Debian's packages"
    as_root timeout "$APT_TIMEOUT" apt-get update -qq >&2 \
        || die "apt-get update failed or took longer than ${APT_TIMEOUT}s"
    as_root timeout "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=60 postgresql >&2 \
        || die "apt-get install postgresql failed or took longer than ${APT_TIMEOUT}s"
    installed || die "postgresql is still not installed"
fi

# The first cluster (pg_lsclusters: version, name, port, status, ...); create one if there is none.
cluster="$(pg_lsclusters -h 2>/dev/null | head -n 1)"
if [ -z "$cluster" ]; then
    version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
    log "creating cluster $version/main"
    as_root pg_createcluster "$version" main >&2 || die "pg_createcluster $version main failed"
    cluster="$(pg_lsclusters -h | head -n 1)"
fi
read -r version name port status _ <<<"$cluster"

if [ "$status" != online ]; then
    log "starting cluster $version/$name on port $port"
    as_root pg_ctlcluster "$version" "$name" start >&2 \
        || as_root service postgresql start >&2 \
        || die "could not start cluster $version/$name"
fi
for _ in $(seq "$START_TIMEOUT"); do
    pg_isready -q -h "$HOST" -p "$port" && break
    sleep 1
done
pg_isready -q -h "$HOST" -p "$port" || die "server on $HOST:$port not ready after ${START_TIMEOUT}s"

# The test's role (may create databases: the test makes a fresh one per run) and database.
psql_admin() { as_postgres psql -p "$port" -v ON_ERROR_STOP=1 -qtA "$@" </dev/null; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    psql_admin -c "CREATE ROLE \"$ROLE\" LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2 || die "could not create role $ROLE"
else
    psql_admin -c "ALTER ROLE \"$ROLE\" LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2 || die "could not update role $ROLE"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    psql_admin -c "CREATE DATABASE \"$DB\" OWNER \"$ROLE\"" >&2 || die "could not create database $DB"
fi

uri="postgresql://$ROLE:$PASSWORD@$HOST:$port/$DB"
tcp_login "$uri" || die "the server runs but a password login to $HOST:$port/$DB fails (pg_hba.conf?)"
log "ready: postgresql://$ROLE:***@$HOST:$port/$DB"
echo "$uri"
