#!/usr/bin/env bash
# Screenshots of the MLflow UI as `make ui` shows it, in headless Chromium (Debian: apt-get install chromium).
#   docs/mlflow-ui/screenshot.sh [OUT_DIR] [DIR]
# OUT_DIR is a cram-sweep out_dir (default: outputs); the pictures land in DIR (default: docs/mlflow-ui):
# - experiment.png: the `cram-sweep` experiment's runs table, where MLflow 3 lands only when the experiment
#   carries mlflow.experimentKind=custom_model_development (cram-sweep tags it);
# - charts.png: the same runs in the Chart view, where each parent run's metric histories are lines: with two
#   sweeps in OUT_DIR, their accuracy-vs-length curves (acc_mean/<model>/<dataset>/<method>/n_mem_<k>) overlay.
set -euo pipefail
cd "$(dirname "$0")/../.."
out_dir=$(realpath "${1:-outputs}")
pictures=$(realpath -m "${2:-docs/mlflow-ui}")
port=${PORT:-5057}
db="sqlite:///$out_dir/mlflow.db"
experiment=$(.venv/bin/python - "$db" <<'PY'
import sys
from mlflow.tracking import MlflowClient
print(MlflowClient(tracking_uri=sys.argv[1]).get_experiment_by_name("cram-sweep").experiment_id)
PY
)
.venv/bin/mlflow ui --backend-store-uri "$db" --host 127.0.0.1 --port "$port" >/tmp/cram-sweep-mlflow-ui.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
# The flags keep Chromium off the network (this machine has none) and out of any earlier profile.
shoot() {  # shoot PNG HEIGHT URL-FRAGMENT
  local profile
  profile=$(mktemp -d)
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
    --window-size="1600,$2" --virtual-time-budget=20000 --screenshot="$1" "http://127.0.0.1:$port/#$3" 2>/dev/null
  rm -rf "$profile"
  echo "screenshot: $1"
}
runs="/experiments/$experiment/runs?workflowType=machine_learning"
shoot "$pictures/experiment.png" 900 "$runs"
shoot "$pictures/charts.png" 1400 "$runs&compareRunsMode=CHART"
echo "(experiment $experiment at http://127.0.0.1:$port)"
