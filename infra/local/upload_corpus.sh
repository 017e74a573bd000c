#!/usr/bin/env bash
# Put a LibriSpeech-layout corpus (default: the generated one in data/synth) on the local stack's
# S3 server and check that the sweep's reader reads it back from s3://.
#
# Usage:
#   infra/local/upload_corpus.sh                                  # data/synth -> s3://corpus/synth
#   infra/local/upload_corpus.sh data/synth s3://corpus/synth dev-clean
#
# It is these two commands with the stack's env file loaded:
#   python -m orchestrator.data.librispeech upload data/synth s3://corpus/synth --create-bucket
#   python -m orchestrator.data.librispeech manifest s3://corpus/synth dev-clean
# A sweep then reads it with --set data.root=s3://corpus/synth (the nodes of the local Ray
# cluster were started with the same AWS_* variables).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${STACK_PYTHON:-$repo/.venv/bin/python}"
envfile="${STACK_DIR:-$repo/.stack}/env"
local_root="${1:-data/synth}"
uri="${2:-s3://corpus/synth}"
subset="${3:-dev-clean}"
if [[ ! -f "$envfile" ]]; then
    echo "error: $envfile not found: start the stack first (infra/local/stack.sh up)" >&2
    exit 1
fi
if [[ ! -d "$local_root/$subset" ]]; then
    echo "error: $local_root/$subset not found: generate the corpus first (make demo writes data/synth)" >&2
    exit 1
fi
set -a; . "$envfile"; set +a
cd "$repo"
"$python" -m orchestrator.data.librispeech upload "$local_root" "$uri" --create-bucket
# A fresh cache, so the check really reads the objects from S3 and not a local copy.
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
"$python" -m orchestrator.data.librispeech manifest "$uri" "$subset" --cache-dir "$cache"
