#!/usr/bin/env bash
# Start Airflow locally (standalone: SQLite metadata, LocalExecutor) with mining's DAGs and
# the Mining view plugin, pools and a Reddit connection placeholder; prints the UI address
# and login. Stop it with Ctrl-C: the terminal signals the whole foreground process group,
# so standalone's children (scheduler, API server, DAG processor, triggerer) stop too.
# Scripts and tests that start it should give it its own process group and signal that group.
#
# Environment (all optional): MINING_HOME (~/.mining), AIRFLOW_HOME ($MINING_HOME/airflow),
# AIRFLOW_PORT (8080), MINING_UNPAUSE=1 (unpause the mining DAGs once they are parsed),
# AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS (True: no login locally).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
AF=$ROOT/.venv/bin/airflow
export PATH=$ROOT/.venv/bin:$PATH  # standalone starts its components as plain `airflow`
export MINING_HOME=${MINING_HOME:-$HOME/.mining}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$MINING_HOME/airflow}
PORT=${AIRFLOW_PORT:-${AIRFLOW__API__PORT:-8080}}
export AIRFLOW__API__PORT=$PORT
# Tasks reach the API server's execution API through this URL: it must follow the port.
export AIRFLOW__API__BASE_URL=${AIRFLOW__API__BASE_URL:-http://localhost:$PORT}
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-True}
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS:-True}
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}
mkdir -p "$AIRFLOW_HOME" "$MINING_HOME"

"$AF" db migrate >/dev/null
"$AF" pools set reddit_api 1 "Reddit API request budget (one scraper at a time)" >/dev/null
"$AF" pools set warehouse_writer 1 "DuckDB allows one writer" >/dev/null
"$AF" connections get reddit_default >/dev/null 2>&1 || \
  "$AF" connections add reddit_default --conn-type generic --conn-description \
  "Reddit app-only OAuth: login = client id, password = client secret (empty = anonymous)" >/dev/null

if [ "${MINING_UNPAUSE:-0}" = "1" ]; then
  (for _ in $(seq 60); do
     sleep 5
     ok=1
     for d in mining_hourly mining_collector mining_weekly; do
       "$AF" dags unpause "$d" >/dev/null 2>&1 || ok=0
     done
     [ $ok = 1 ] && { echo "unpaused mining_hourly, mining_collector, mining_weekly"; break; }
   done) &
fi

if [ "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS" = "True" ]; then
  login="no login needed: every visitor is an admin (set AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False for a password)"
else
  login="user admin, password in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated (printed below on first start)"
fi
cat <<EOF
Airflow UI  : http://localhost:$PORT   ($login)
Mining view : http://localhost:$PORT/plugin/mining   (the page itself: http://localhost:$PORT/mining/)
MINING_HOME=$MINING_HOME
AIRFLOW_HOME=$AIRFLOW_HOME
Stop with Ctrl-C.
EOF
exec "$AF" standalone
