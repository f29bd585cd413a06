#!/usr/bin/env bash
# Submit a cram-sweep run to an existing Ray cluster as a Ray job.
#
# Usage:
#   RAY_ADDRESS=http://HEAD:8265 RAY_AUTH_TOKEN=... [MLFLOW_TRACKING_URI=http://MLFLOW:5000] \
#     jobs/ray_submit.sh out_dir=/shared/outputs [hydra overrides...]
# e.g.
#   RAY_ADDRESS=http://localhost:8265 jobs/ray_submit.sh out_dir=/data/outputs name=demo \
#     'grid.lengths=[16,32,64,128]' grid.samples=16
#
# RAY_ADDRESS is the head's dashboard/job address (port 8265), not the GCS port 6379. The cluster's
# token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is required: RAY_AUTH_MODE=token
# unless set; RAY_AUTH_MODE=disabled submits to a cluster without authentication, on purpose.
# Needs the `ray` CLI locally (same Ray version as the cluster) and cram-sweep installed in the
# cluster's image. The repo is uploaded as the job's working dir, so the cluster runs *this*
# checkout's code and conf/; the driver starts inside that temporary working dir, which is why
# out_dir must be an absolute path on storage the head can keep (a shared filesystem or volume).
# Extra runtime-env settings: RAY_RUNTIME_ENV_JSON='{"pip": [...]}' replaces the default below; .env files
# stay out of the upload either way (.rayignore).
set -euo pipefail

usage() { sed -n '2,20s/^# \{0,1\}//p' "$0" >&2; exit 2; }

[[ $# -ge 1 && ( "$1" == -h || "$1" == --help ) ]] && usage
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray job address, e.g. http://HEAD:8265 (see --help)}"

# Refuse a relative or missing out_dir: results would land in the job's throwaway working dir.
has_out_dir=0
for arg in "$@"; do
  case "$arg" in
    out_dir=/*) has_out_dir=1 ;;
    out_dir=*) echo "out_dir must be absolute and shared, got: $arg" >&2; exit 2 ;;
  esac
done
[[ $has_out_dir == 1 ]] || { echo "missing out_dir=/shared/path" >&2; usage; }

# Token authentication (closed by default): the job API runs whatever it is sent, so the cluster asks for its token.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ $RAY_AUTH_MODE == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
  echo "no Ray token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token (docker/.env for compose)," \
    "or RAY_AUTH_MODE=disabled for a cluster without authentication" >&2
  exit 2
fi

cd "$(dirname "$0")/.."   # the repo root becomes the job's working dir

# Ship the code but not local environments or results; pass the MLflow server through if set here
# (otherwise the cluster's own MLFLOW_TRACKING_URI is used).
env_vars="{}"
if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
  env_vars="{\"MLFLOW_TRACKING_URI\": \"${MLFLOW_TRACKING_URI}\"}"
fi
default_runtime_env="{\"excludes\": [\".git\", \".venv\", \"outputs\", \"**/__pycache__\", \"*.egg-info\", \".env\", \".env.*\"], \"env_vars\": ${env_vars}}"
runtime_env="${RAY_RUNTIME_ENV_JSON:-$default_runtime_env}"

exec ray job submit \
  --address "$RAY_ADDRESS" \
  --working-dir . \
  --runtime-env-json "$runtime_env" \
  -- cram-sweep run cluster=ray tracking=server "$@"
