# MLflow tracking server with the PostgreSQL driver and the S3 client it needs to proxy artifacts
# to MinIO. Built by docker/compose.yaml (context: docker/).
FROM python:3.11-slim

# Empty = newest at build time, which is what the worker image gets too; pin both
# (e.g. --build-arg MLFLOW_VERSION=3.17.2) to keep client and server in step.
ARG MLFLOW_VERSION=

RUN pip install --no-cache-dir "mlflow${MLFLOW_VERSION:+==${MLFLOW_VERSION}}" psycopg2-binary boto3

EXPOSE 5000
# No ENTRYPOINT: the compose service gives the full `mlflow server ...` command.
