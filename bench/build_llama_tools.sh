#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-gguf-split, llama-bench,
# llama-simple, llama-server, llama-quantize, llama-perplexity, llama-cli,
# llama-imatrix, llama-mtmd-cli, and the RPC backend's ggml-rpc-server) from
# the llama.cpp source vendored in the pinned llama-cpp-python sdist, so that
# benchmarks and reference tests compare Ember against exactly the llama.cpp
# that Ember itself runs.
#
# Usage: bench/build_llama_tools.sh            -> binaries in bench/.tools/bin/
#   JOBS=4 bench/build_llama_tools.sh          (default: 2 build jobs)
#   FORCE=1 bench/build_llama_tools.sh         (rebuild even if built)
#
# Idempotent: returns at once when every tool is already built from this
# version. Compiler flags follow scripts/install.sh: a native build with AMX
# turned off on x86-64 (some CPUs report AMX they cannot run, and a native
# build then crashes on the first Q4_K matmul).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
TOOLS_DIR="$root/bench/.tools"
BIN_DIR="$TOOLS_DIR/bin"
SRC_DIR="$TOOLS_DIR/llama_cpp_python-$VERSION"
BUILD_DIR="$TOOLS_DIR/build-$VERSION"
STAMP="$BIN_DIR/.built-$VERSION"
TARGETS=(llama-gguf-split llama-bench llama-simple llama-server llama-imatrix llama-quantize llama-perplexity llama-cli
    llama-mtmd-cli ggml-rpc-server)

PIP="${PIP:-}"
if [ -z "$PIP" ]; then
    if [ -x "$root/.venv/bin/pip" ]; then PIP="$root/.venv/bin/pip"; else PIP="python3 -m pip"; fi
fi

all_built() {
    [ -f "$STAMP" ] || return 1
    for t in "${TARGETS[@]}"; do [ -x "$BIN_DIR/$t" ] || return 1; done
}

if [ -z "${FORCE:-}" ] && all_built; then
    echo "llama.cpp tools ($VERSION) already built in $BIN_DIR"
    exit 0
fi

mkdir -p "$TOOLS_DIR" "$BIN_DIR"

# 1. The sdist (source only: llama-cpp-python ships no wheels on PyPI).
if [ ! -f "$SRC_DIR/vendor/llama.cpp/CMakeLists.txt" ]; then
    sdist="$(ls "$TOOLS_DIR"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
    if [ -z "$sdist" ]; then
        echo "Downloading llama-cpp-python $VERSION source..." >&2
        $PIP download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TOOLS_DIR"
        sdist="$TOOLS_DIR/llama_cpp_python-$VERSION.tar.gz"
    fi
    tmp_src="$(mktemp -d "$TOOLS_DIR/.src.XXXXXX")"
    tar xzf "$sdist" -C "$tmp_src"
    rm -rf "$SRC_DIR"
    mv "$tmp_src/llama_cpp_python-$VERSION" "$SRC_DIR"
    rmdir "$tmp_src"
fi

# 2. Configure: same CPU flags as scripts/install.sh.
cmake_flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF -DGGML_RPC=ON)
case "$(uname -m)" in
    x86_64|amd64)
        noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        cmake_flags+=(-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$noamx" "-DCMAKE_CXX_FLAGS=$noamx")
        ;;
esac
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
# Configured every time (quick when nothing changed), so a build directory from
# an older version of this script picks up new flags such as GGML_RPC.
[ -f "$BUILD_DIR/CMakeCache.txt" ] && generator=()
cmake -S "$SRC_DIR/vendor/llama.cpp" -B "$BUILD_DIR" "${generator[@]}" "${cmake_flags[@]}"

# 3. Build only the tools we need, with few jobs (shared 2-core machines).
cmake --build "$BUILD_DIR" --config Release -j "$JOBS" --target "${TARGETS[@]}"

for t in "${TARGETS[@]}"; do
    found="$(find "$BUILD_DIR" -type f -name "$t" -perm -u+x | head -n1)"
    if [ -z "$found" ]; then
        echo "error: $t was not built (see the build output above)" >&2
        exit 1
    fi
    cp -f "$found" "$BIN_DIR/$t.tmp"
    mv -f "$BIN_DIR/$t.tmp" "$BIN_DIR/$t"
done
touch "$STAMP"
echo "llama.cpp tools ($VERSION) built in $BIN_DIR: ${TARGETS[*]}"
