#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU and no network: NCF's correctness checks on the
# GPU, then training, evaluation and inference timings at the ml-20m shape, as one markdown
# table (also written to --out, default $OUT or ./gpu_check_out). Arguments go to gpu_check.py.
# PYTHON picks the interpreter; the default, python3, is the one GPU images hold torch in.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}

# gpu_check.py keeps its own deadline; this hard stop at 8 minutes is for a hung kernel. The
# table is saved after every measurement, so a stopped run still leaves what it measured.
# timeout's kill is silent and leaves only its status 124: name it.
if command -v timeout >/dev/null; then
    STATUS=0
    timeout 480 "$PYTHON" "$HERE/gpu_check.py" "$@" || STATUS=$?
    [ "$STATUS" -ne 124 ] ||
        echo "gpu_check.sh: stopped after 8 minutes (a hung GPU kernel?);" \
            "what it measured by then is in gpu_check.md under --out" >&2
    exit "$STATUS"
fi
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
