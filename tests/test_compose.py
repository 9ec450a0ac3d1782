"""docker-compose.yaml is a product file: validate what can be validated without an engine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def test_has_the_distributed_airflow_services(compose: dict) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-worker", "airflow-triggerer", "airflow-init", "airflow-worker-gpu"):
        assert name in services, name
    env = services["airflow-worker"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert "embed" in services["airflow-worker-gpu"]["command"]
    assert services["airflow-worker-gpu"]["profiles"] == ["gpu"]


def test_init_creates_the_pools_the_dags_use(compose: dict) -> None:
    script = "\n".join(compose["services"]["airflow-init"]["command"])
    dag_text = "".join(p.read_text() for p in (ROOT / "dags").glob("mining_*.py"))
    for pool in ("reddit_api", "warehouse_writer"):
        assert f'pool="{pool}"' in dag_text
        assert f"airflow pools set {pool}" in script
    assert "airflow db migrate" in script and "mining models build" in script


def test_volumes_mount_project_and_data(compose: dict) -> None:
    mounts = compose["services"]["airflow-scheduler"]["volumes"]
    targets = {m.split(":")[1] for m in mounts}
    assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/mining/mining", "/opt/mining/models",
            "/opt/mining-home"} <= targets


def test_docker_compose_validates_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian package) not installed: schema validation skipped")
    proc = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yaml"), "config", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
