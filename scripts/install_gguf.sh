#!/usr/bin/env bash
# Install the optional GGUF toolchain (the `gguf` extra) from PyPI only, and keep llama.cpp's HF -> GGUF
# converter where `orpo_dist.export.to_gguf` looks for it.
#
# Why this script rather than `pip install orpo-dist[gguf]`: the llama-cpp-python wheel has the
# quantiser (`llama_cpp.llama_model_quantize`) but not `convert_hf_to_gguf.py`; only its sdist ships
# the converter (vendor/llama.cpp/). So we download that one sdist from PyPI, build llama-cpp-python
# from it, and keep the converter from the SAME sdist, so converter and quantiser agree on the format.
#
#   bash scripts/install_gguf.sh            # into the active python (`python` on PATH)
#   PYTHON=/path/to/python bash scripts/install_gguf.sh
#   CMAKE_ARGS="-DGGML_CUDA=on" bash scripts/install_gguf.sh   # extra CMake flags are appended
#
# Idempotent: reruns skip the download, the extraction and the build when they are already done.
# Nothing is fetched from anywhere but PyPI (the build's CMake targets that download are switched off).
set -euo pipefail

PYTHON="${PYTHON:-python}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${ORPO_DIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orpo_dist}/llama_cpp/${VERSION}"
SDIST="${CACHE}/llama_cpp_python-${VERSION}.tar.gz"
CONVERTER="${CACHE}/convert/convert_hf_to_gguf.py"

log() { echo "[install_gguf] $*"; }

mkdir -p "${CACHE}"

# 1. Python-only dependencies of the converter (sentencepiece + protobuf also let to_gguf describe a
#    char-level vocab as a sentencepiece model) and the GGUF reader the tests use.
"${PYTHON}" -m pip install --quiet "gguf>=0.10" sentencepiece protobuf

# 2. The llama-cpp-python sdist, from PyPI (source only: --no-binary).
if [[ ! -f "${SDIST}" ]]; then
  log "downloading llama-cpp-python==${VERSION} sdist from PyPI"
  "${PYTHON}" -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==${VERSION}" -d "${CACHE}"
fi

# 3. The converter and the modules it imports (its `conversion` package and the matching gguf-py,
#    which it puts on sys.path itself) from that sdist.
if [[ ! -f "${CONVERTER}" ]]; then
  log "extracting convert_hf_to_gguf.py into ${CACHE}/convert"
  tmp="$(mktemp -d "${CACHE}/extract.XXXXXX")"
  src="llama_cpp_python-${VERSION}/vendor/llama.cpp"
  tar -xzf "${SDIST}" -C "${tmp}" \
    "${src}/convert_hf_to_gguf.py" "${src}/conversion" "${src}/gguf-py" "${src}/LICENSE"
  rm -rf "${CACHE}/convert"
  mv "${tmp}/${src}" "${CACHE}/convert"
  rm -rf "${tmp}"
fi

# 4. llama-cpp-python built from the same sdist. Only the shared libraries the Python package loads
#    are built: no examples, tests, tools, server (whose web-UI target downloads assets) or mtmd.
#    llama-cpp-python forces LLAMA_BUILD_COMMON=ON, which builds llama.cpp's `common` helper library
#    (chat parsers, argument parsing, HTTP download) and cpp-httplib: about half of the compile time,
#    for a libllama-common.so that llama_cpp never loads (it was installed to site-packages/lib/).
#    A CMake project-include file turns it back off after that line; libllama / libggml* come out
#    byte-identical (measured), and the cold build takes ~half the CPU time.
#    AMX kernels are compiled out: ggml_backend_amx_mul_mat segfaults on some Sapphire Rapids machines
#    (llama.cpp issue #20824, seen here on Q8_0/Q4_K). We use llama.cpp to quantise and to check the file,
#    not for fast CPU inference, so nothing is lost.
no_common="${CACHE}/no_llama_common.cmake"
echo 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp common library: not used by llama_cpp" FORCE)' \
  > "${no_common}"
build_args="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAVA_BUILD=OFF \
-DCMAKE_PROJECT_INCLUDE=${no_common} ${CMAKE_ARGS:-}"
no_amx=""
if [[ "$(uname -m)" == "x86_64" ]]; then no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
stamp="${CACHE}/build-stamp"
build_log="${CACHE}/build.log"
want="${VERSION} $("${PYTHON}" -c 'import sys; print(sys.prefix)') ${build_args} ${no_amx}"
installed="$("${PYTHON}" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)"
if [[ "${installed}" != "${VERSION}" || "$(cat "${stamp}" 2>/dev/null)" != "${want}" ]]; then
  log "building llama-cpp-python==${VERSION} from source (3-6 minutes on 2 cores; log: ${build_log})"
  start=${SECONDS}
  # The full compiler output goes to the log (pip -v); on failure its tail is printed, so a failed build
  # is an error with the compiler's message, never a silently missing toolchain.
  if ! CMAKE_ARGS="${build_args}" CFLAGS="${CFLAGS:-} ${no_amx}" CXXFLAGS="${CXXFLAGS:-} ${no_amx}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "${PYTHON}" -m pip install -v --no-cache-dir --force-reinstall --no-deps "${SDIST}" \
    > "${build_log}" 2>&1; then
    echo "[install_gguf] ERROR: building llama-cpp-python ${VERSION} failed; last 80 lines of ${build_log}:" >&2
    tail -n 80 "${build_log}" >&2
    exit 1
  fi
  log "built in $((SECONDS - start))s"
fi
if [[ "$(cat "${stamp}" 2>/dev/null)" != "${want}" ]]; then
  # llama-cpp-python's runtime dependencies (its pyproject.toml), from PyPI
  "${PYTHON}" -m pip install --quiet "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
  echo "${want}" > "${stamp}"
fi

"${PYTHON}" - "${CONVERTER}" <<'EOF'
import sys
import llama_cpp
print(f"[install_gguf] llama-cpp-python {llama_cpp.__version__} OK; converter: {sys.argv[1]}")
EOF
