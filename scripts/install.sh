#!/usr/bin/env bash
# Sets up .venv with Ember and llama.cpp (llama-cpp-python, pinned, built from
# source for this CPU). Usage: scripts/install.sh [EXTRAS]   e.g. scripts/install.sh test
#
# x86-64: llama.cpp's native build enables AMX wherever /proc/cpuinfo reports it,
# and some CPUs report AMX they cannot run (segfault on the first Q4_K matmul).
# We keep the native build but turn AMX off. GPU users add their own flags:
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/install.sh     (Metal: on by default on macOS)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip

user_args="${CMAKE_ARGS:-}"
args="$user_args"
case "$(uname -m)" in
    x86_64|amd64)
        noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        case "$args" in *GGML_NATIVE*) ;; *) args="$args -DGGML_NATIVE=ON" ;; esac
        args="$args -DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'"
        ;;
esac
# llama.cpp's RPC backend (ember worker, --rpc): off in llama.cpp's default build.
case "$args" in *GGML_RPC*) ;; *) args="$args -DGGML_RPC=ON" ;; esac
export CMAKE_ARGS="$args"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"

# A wheel built earlier with other flags would be reused by pip's cache: build
# llama-cpp-python only when it is missing (or lacks the RPC backend), and then
# without the cache when the user passed their own CMAKE_ARGS or a cached wheel
# turned out to lack RPC.
has_llama() {
    .venv/bin/python -c "import llama_cpp, pathlib, sys; lib = pathlib.Path(llama_cpp.__file__).parent / 'lib'; sys.exit(0 if any(lib.glob('libggml-rpc*')) else 1)" 2>/dev/null
}
if ! has_llama; then
    echo "Building llama.cpp (llama-cpp-python) for this machine; this takes a few minutes..." >&2
    nocache=""
    [ -n "$user_args" ] && nocache="--no-cache-dir"
    .venv/bin/python -m pip uninstall -q -y llama-cpp-python 2>/dev/null || true
    .venv/bin/python -m pip install $nocache "llama-cpp-python==0.3.36"
    if ! has_llama; then
        .venv/bin/python -m pip install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36"
    fi
fi

spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q -e "$spec"
