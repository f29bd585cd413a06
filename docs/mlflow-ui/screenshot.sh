#!/usr/bin/env bash
# Screenshot of the MLflow UI as `make ui` shows it, in headless Chromium (Debian: apt-get install chromium).
#   docs/mlflow-ui/screenshot.sh [OUT_DIR] [PNG]
# OUT_DIR is a cram-sweep out_dir (default: outputs); PNG defaults to docs/mlflow-ui/experiment.png.
# It opens the `cram-sweep` experiment's page, where MLflow 3 lands on the runs table only when the
# experiment carries mlflow.experimentKind=custom_model_development (cram-sweep tags it).
set -euo pipefail
cd "$(dirname "$0")/../.."
out_dir=$(realpath "${1:-outputs}")
png=$(realpath -m "${2:-docs/mlflow-ui/experiment.png}")
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
profile=$(mktemp -d)
# The flags keep Chromium off the network (this machine has none) and out of any earlier profile.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1600,900 --virtual-time-budget=15000 --screenshot="$png" \
  "http://127.0.0.1:$port/#/experiments/$experiment/runs?workflowType=machine_learning" 2>/dev/null
rm -rf "$profile"
echo "screenshot: $png (experiment $experiment at http://127.0.0.1:$port)"
