# The two commands the README opens with: `make demo` and `make test`.
.PHONY: setup demo test test-all airflow lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/mining demo

test: setup
	bash scripts/test.sh

# Every tier, as CI runs it (installs chromium, PostgreSQL and a torch venv when missing).
test-all: setup
	bash .ci/run

airflow: setup
	bash scripts/airflow-local.sh

lint:
	.venv/bin/ruff check mining dags plugins tests bench
