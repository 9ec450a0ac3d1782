#!/usr/bin/env bash
# PostgreSQL/LocalExecutor tier: Airflow's metadata on Debian's PostgreSQL, LocalExecutor, and
# mining_hourly run for two hours in parallel against the local Reddit replay (tests/test_postgres_tier.py).
# Installs postgresql when missing, starts the newest cluster, creates role+database `mining`,
# installs psycopg2-binary (pyproject's [postgres] extra) into .venv, then runs `pytest -m postgres`.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql
fi
VER=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VER main"; then
  $SUDO pg_createcluster "$VER" main
fi
pg_lsclusters -h | grep -q "^$VER *main .*online" || $SUDO pg_ctlcluster "$VER" main start
PORT=$(pg_lsclusters -h | awk -v v="$VER" '$1==v && $2=="main" {print $3}')
AS_PG="sudo -u postgres"; [ "$(id -u)" = 0 ] && AS_PG="runuser -u postgres --"
psql_su() { $AS_PG psql -p "$PORT" -v ON_ERROR_STOP=1 -qtAc "$1"; }
for _ in $(seq 30); do psql_su "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
[ "$(psql_su "SELECT 1 FROM pg_roles WHERE rolname='mining'")" = 1 ] || \
  psql_su "CREATE ROLE mining LOGIN CREATEDB PASSWORD 'mining'"
[ "$(psql_su "SELECT 1 FROM pg_database WHERE datname='mining'")" = 1 ] || psql_su "CREATE DATABASE mining OWNER mining"
# Airflow 3 opens the metadata DB both sync (psycopg2) and async (asyncpg)
.venv/bin/python -c "import psycopg2, asyncpg" 2>/dev/null || .venv/bin/pip install -q "psycopg2-binary>=2.9" "asyncpg>=0.29"
export MINING_TEST_PG_URL="postgresql+psycopg2://mining:mining@127.0.0.1:$PORT/mining"
exec .venv/bin/python -m pytest -q -m postgres tests/test_postgres_tier.py "$@"
