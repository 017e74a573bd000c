#!/usr/bin/env bash
# A local stack that mirrors a cluster: PostgreSQL 15, S3 (SeaweedFS), MLflow on both, Ray head + worker.
#
# Usage:
#   infra/local/stack.sh up              # start, wait until every service answers, write .stack/env
#   infra/local/stack.sh status          # one line per service (exit 0 when all answer)
#   infra/local/stack.sh down [--purge]  # stop exactly what `up` started (--purge: delete .stack/)
#   set -a; . .stack/env; set +a         # MLFLOW_TRACKING_URI, AWS_*, RAY_ADDRESS, RAY_AUTH_* ...
#
# Settings (environment): STACK_DIR, STACK_PG_PORT, STACK_S3_PORT, STACK_MLFLOW_PORT, STACK_RAY_PORT,
# STACK_RAY_DASHBOARD_PORT, STACK_RAY_WORKERS, STACK_RAY_HEAD_CPUS, STACK_RAY_WORKER_CPUS,
# STACK_RAY_OBJECT_STORE_MB, STACK_S3_BUCKETS, PG_BIN, STACK_PYTHON; details in infra/local/stack.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${STACK_PYTHON:-$repo/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "error: $python not found: run the README set-up (make test-fast creates .venv) or set STACK_PYTHON" >&2
    exit 1
fi
exec "$python" "$here/stack.py" "$@"
