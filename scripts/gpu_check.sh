#!/usr/bin/env bash
# The acceptance run for a machine with an NVIDIA GPU and no network (docs/gpu.md): NCF's checks
# on the GPU, ncf.py, recommend.py, serve.py and export.py end to end at the ml-20m shape, and
# timings beside the original's, as one markdown table in gpu_check.md (and gpu_check.json)
# under --out (default $OUT or ./gpu_check_out). Arguments go to gpu_check.py.
# Exit status: 0 all rows passed or skipped (or no GPU at all: nothing to check); 1 a row
# failed; 2 nvidia-smi lists a GPU this PYTHON's torch cannot use (a CPU-only build, say).
# PYTHON picks the interpreter; the default, python3, is the one GPU images hold torch in.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}

# gpu_check.py keeps its own deadline (440 s) and a cap on every step; this hard stop at 8
# minutes is for a hung kernel. The table is saved after every step, so a stopped run still
# leaves what it measured, the step it stopped in and the ones it never reached.
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
