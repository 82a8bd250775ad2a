#!/usr/bin/env bash
# run.sh: chat with a model through spillover's two processes, the loader and compute.
#
#   ./run.sh                                   the built-in demo: a small random-weight model, streamed
#   ./run.sh --model Org/Name -p "Hello"       a Hugging Face model, quantized once into ~/.cache/spillover
#   ./run.sh --help                            every option (they are `spillover run`'s)
#   ./run.sh serve --model Org/Name            an OpenAI-compatible HTTP server on 127.0.0.1:8000 (`spillover serve`)
#
# 1. Python: the one on PATH if spillover is installed there, else a local .venv, made on first use
#    (CPU torch when there is no NVIDIA driver).
# 2. `spillover run --print-loader-args "$@"` (or `serve`'s) resolves --model (download, quantize or make the demo, once)
#    and prints the loader's share of the options; that split lives in compute/run.py only.
# 3. The loader starts in the background, in its own session (Ctrl-C at the terminal goes to compute,
#    where it stops the current reply), with its socket in a private 0700 run directory.
# 4. Once its ready file appears, compute runs in the foreground: `spillover run "$@" --connect ADDR`.
#    The server (`./run.sh serve …`) needs no terminal: it runs in its own session too, and this script hands
#    it a Ctrl-C or SIGTERM as one SIGTERM (a second forces its exit).
# On exit, error, Ctrl-C or SIGTERM the loader is stopped and the run directory removed; compute exits
# by itself within seconds of losing its loader. The exit code is compute's.
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
spillover=("$python" -m compute.cli)

command=run
if [[ ${1:-} == serve ]]; then
    command=serve
    shift
fi
for arg in "$@"; do
    if [[ $arg == -h || $arg == --help ]]; then
        exec "${spillover[@]}" "$command" --help
    fi
done

loader_lines=$("${spillover[@]}" "$command" --print-loader-args "$@")
mapfile -t loader_args <<<"$loader_lines"
model_dir=${loader_args[1]}  # --print-loader-args prints "--model DIR" first

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/spillover-XXXXXX")  # mode 0700: only this user reaches the socket
address=ipc://$run_dir/loader.sock
loader_pid=

stop_loader() {
    if [[ -n $loader_pid ]] && kill -0 "$loader_pid" 2>/dev/null; then
        kill -TERM "$loader_pid" 2>/dev/null || true
        for _ in {1..100}; do  # 10 s to free its memory, then SIGKILL
            kill -0 "$loader_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$loader_pid" 2>/dev/null || true
    fi
    rm -rf "$run_dir"
}
trap stop_loader EXIT

# setsid keeps the terminal's Ctrl-C away from the loader; it exits by itself when this script dies.
setsid=()
if command -v setsid >/dev/null; then
    setsid=(setsid)
fi
"${setsid[@]}" "${spillover[@]}" loader "${loader_args[@]}" --socket "$address" \
    --ready-file "$run_dir/ready.json" </dev/null >&2 &
loader_pid=$!

while [[ ! -e $run_dir/ready.json ]]; do
    if ! kill -0 "$loader_pid" 2>/dev/null; then
        code=0
        wait "$loader_pid" || code=$?
        echo "run.sh: the loader (pid $loader_pid) exited with code $code before it was ready" >&2
        exit 1
    fi
    sleep 0.1
done

# The later --model and --connect win over "$@".
if [[ $command == serve ]]; then
    # The API names the model as the user did (or "demo"), not by the directory it was resolved to.
    served_name=demo
    previous=
    for arg in "$@"; do
        [[ $previous == --model ]] && served_name=$arg
        [[ $arg == --model=* ]] && served_name=${arg#--model=}
        previous=$arg
    done
    "${setsid[@]}" "${spillover[@]}" serve --served-model-name "$served_name" "$@" \
        --model "$model_dir" --connect "$address" </dev/null &
    server_pid=$!
    trap 'kill -TERM "$server_pid" 2>/dev/null || true' INT TERM
    while kill -0 "$server_pid" 2>/dev/null; do
        wait "$server_pid" || true  # returns early when a signal is handed on
    done
    code=0
    wait "$server_pid" || code=$?
    exit "$code"
fi

# Compute runs in the foreground so it owns the terminal.
code=0
"${spillover[@]}" run "$@" --model "$model_dir" --connect "$address" || code=$?
exit "$code"
