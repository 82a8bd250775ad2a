#!/usr/bin/env bash
# run.sh: chat with a model through spillover's two processes, the loader and compute.
#
#   ./run.sh                                   the built-in demo: a small random-weight model, streamed
#   ./run.sh --model Org/Name -p "Hello"       a Hugging Face model, quantized once into ~/.cache/spillover
#   ./run.sh --help                            every option (they are `spillover run`'s)
#   ./run.sh serve --model Org/Name            an OpenAI-compatible HTTP server on 127.0.0.1:8000 (`spillover serve`)
#
# This script only finds Python: the one on PATH if spillover is installed there, else a local .venv, made on
# first use (CPU torch when there is no NVIDIA driver). It then becomes `spillover run "$@"`, which starts the
# loader in its own session, waits for it to be ready, runs compute in the foreground and stops the loader on
# exit, error, Ctrl-C or SIGTERM (compute/launch.py: the one launcher). The exit code is compute's.
# `./run.sh serve …` becomes `spillover serve …` the same way (the server starts and stops its loader alike).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TORCH_VERSION=2.13.0

has_spillover() {  # run outside the checkout, so a source tree on the current path does not count
    (cd / && "$1" -c 'import compute.run, torch, transformers, zmq' 2>/dev/null)
}

python=python3
if ! has_spillover "$python"; then
    python=$here/.venv/bin/python
    if ! has_spillover "$python"; then
        echo "run.sh: spillover is not installed for python3; setting up $here/.venv (once, a few minutes)" >&2
        python3 -m venv "$here/.venv"
        "$python" -m pip install --upgrade pip >&2
        if command -v nvidia-smi >/dev/null; then
            "$python" -m pip install "torch==$TORCH_VERSION" >&2
        else
            # --no-deps: only the wheel comes from PyTorch's CPU index; its dependencies come with the
            # project's, from the usual index (an unreachable CPU index then costs one retry, not one per package)
            "$python" -m pip install --retries 1 --no-deps "torch==$TORCH_VERSION" \
                --index-url https://download.pytorch.org/whl/cpu >&2
        fi
        "$python" -m pip install -e "$here[dev]" >&2  # [dev]: pytest, for the test command
    fi
fi
if [[ ${1:-} == serve ]]; then
    shift
    exec "$python" -m compute.cli serve "$@"
fi
exec "$python" -m compute.cli run "$@"
