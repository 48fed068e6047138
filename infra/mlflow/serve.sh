#!/usr/bin/env bash
# The MLflow tracking server of the pipeline: one command line for the Kubernetes deployment
# (infra/mlflow/mlflow.yaml), its local equivalent (infra/mlflow/docker-compose.yml) and the test suite's
# server fixture. Clients talk only HTTP: with --serve-artifacts the server proxies artifact uploads to
# the destination, so training nodes need no credentials for the artifact bucket.
#
# Environment:
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER:PASSWORD@HOST:5432/mlflow (sqlite:///PATH locally)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET/PREFIX (file:///PATH locally); S3 credentials from the
#                                 standard AWS chain, AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL for MinIO
#   MLFLOW_HOST (0.0.0.0)  MLFLOW_PORT (5000)  MLFLOW_WORKERS (4)
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://... or sqlite:///...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://... or file:///...)}"
# MLflow 3 starts a job-execution service by default (about ten extra processes, 2 GB); the pipeline
# does not use it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}"
