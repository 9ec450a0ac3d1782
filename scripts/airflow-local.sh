#!/usr/bin/env bash
# Start Airflow locally (standalone: SQLite metadata, LocalExecutor) with mining's DAGs and
# plugin, pools and a Reddit connection placeholder; prints the UI address and login.
# Stop it with Ctrl-C (it runs in its own process group so its children stop too).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export MINING_HOME=${MINING_HOME:-$HOME/.mining}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$MINING_HOME/airflow}
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-True}
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS:-True}
export AIRFLOW__API__PORT=${AIRFLOW__API__PORT:-8080}
AF=.venv/bin/airflow
mkdir -p "$AIRFLOW_HOME" "$MINING_HOME"
$AF db migrate >/dev/null
$AF pools set reddit_api 1 "Reddit API request budget" >/dev/null
$AF pools set warehouse_writer 1 "DuckDB allows one writer" >/dev/null
$AF connections get reddit_default >/dev/null 2>&1 || \
  $AF connections add reddit_default --conn-type http --conn-description \
  "Reddit app-only OAuth: login = client id, password = client secret (empty = anonymous)" >/dev/null
if [ "${MINING_UNPAUSE:-0}" = "1" ]; then
  (sleep 20; for d in mining_hourly mining_collector mining_weekly; do $AF dags unpause "$d" >/dev/null 2>&1 || true; done) &
fi
echo "Airflow UI: http://localhost:${AIRFLOW__API__PORT}  (login not needed: all users are admins locally;"
echo "            set AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False to get a generated password)"
echo "MINING_HOME=$MINING_HOME  AIRFLOW_HOME=$AIRFLOW_HOME"
set -m  # the standalone process gets its own process group, so stopping it stops its children
$AF standalone &
pid=$!
trap 'kill -TERM -- -$pid 2>/dev/null || true; wait $pid 2>/dev/null || true' INT TERM EXIT
wait $pid
