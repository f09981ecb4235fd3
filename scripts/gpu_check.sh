#!/usr/bin/env bash
# LMDeploy GPU check: one prepared call (< 10 min) on a CUDA box without network.
#
#   bash scripts/gpu_check.sh prepare   # here, with PyPI: wheels + a stripped LMDeploy into build/gpu_wheels (< 64 MiB)
#   bash scripts/gpu_check.sh           # on the GPU box, with build/gpu_wheels carried along
#
# The run installs only what the box lacks (never upgrades what it has), puts LMDeploy 0.18.0 without its
# TurboMind binaries (not used by the PyTorch backend) on PYTHONPATH, then runs scripts/gpu_check.py under a
# 9-minute timeout. Output: stdout and $OUT/gpu_check.{log,json} ($OUT defaults to build/gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."

LMDEPLOY_VERSION=0.18.0
WHEELS=build/gpu_wheels
PURE=(mmengine-lite==0.10.7 shortuuid==1.0.13 addict yapf termcolor platformdirs rich markdown-it-py mdurl pygments requests urllib3
      certifi idna pydantic annotated-types typing-inspection typing-extensions jinja2 tqdm prometheus-client accelerate)
BINARY=(pybase64==1.5.1 pyzmq==27.3.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11 pillow psutil pydantic-core markupsafe
        charset-normalizer)
# import name -> distribution, checked on the box in this order
NEEDED="typing_extensions:typing-extensions annotated_types:annotated-types typing_inspection:typing-inspection
pydantic_core:pydantic-core pydantic:pydantic markupsafe:markupsafe jinja2:jinja2 tqdm:tqdm idna:idna certifi:certifi
urllib3:urllib3 charset_normalizer:charset-normalizer requests:requests PIL:pillow psutil:psutil pybase64:pybase64
zmq:pyzmq shortuuid:shortuuid addict:addict termcolor:termcolor platformdirs:platformdirs yapf:yapf mdurl:mdurl
markdown_it:markdown-it-py pygments:pygments rich:rich mmengine:mmengine-lite tvm_ffi:apache-tvm-ffi
xgrammar:xgrammar prometheus_client:prometheus-client accelerate:accelerate"

prepare() {
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    local tmp
    tmp=$(mktemp -d)
    pip download --quiet --no-deps -d "$tmp" "lmdeploy==$LMDEPLOY_VERSION"
    (cd "$tmp" && python -m zipfile -e lmdeploy-*.whl unpacked)
    rm -f "$tmp"/unpacked/lmdeploy/turbomind/_turbomind*.so "$tmp"/unpacked/lmdeploy/turbomind/lib/*.so
    tar -czf "$WHEELS/lmdeploy-$LMDEPLOY_VERSION-stripped.tgz" -C "$tmp/unpacked" lmdeploy "lmdeploy-$LMDEPLOY_VERSION.dist-info"
    rm -rf "$tmp"
    pip download --quiet --no-deps -d "$WHEELS" "${PURE[@]}"
    for py in 311 312; do
        pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$py" --abi "cp$py" \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "${BINARY[@]}"
    done
    du -sh "$WHEELS"
    local kib
    kib=$(du -sk "$WHEELS" | cut -f1)
    if [ "$kib" -gt 62000 ]; then echo "build/gpu_wheels is ${kib} KiB: over the 64 MiB carry" >&2; exit 1; fi
    echo "ready: run 'bash scripts/gpu_check.sh' on the GPU box with carry [\"$WHEELS\"]"
}

run() {
    OUT=${OUT:-build/gpu_check_out}
    mkdir -p "$OUT"
    python - <<'EOF'
import platform, shutil, subprocess
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("gpu", torch.cuda.get_device_name(0))
except ImportError:
    print("torch MISSING")
for mod in ("triton", "transformers", "tokenizers", "safetensors", "numpy", "pydantic", "lmdeploy"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(mod, "MISSING", type(e).__name__)
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                         capture_output=True, text=True).stdout.strip())
EOF
    if ! python -c "import lmdeploy" 2>/dev/null; then
        [ -d "$WHEELS" ] || { echo "no $WHEELS: run 'bash scripts/gpu_check.sh prepare' first and carry it" >&2; exit 2; }
        local site=build/gpu_site
        mkdir -p "$site"
        tar -xzf "$WHEELS/lmdeploy-$LMDEPLOY_VERSION-stripped.tgz" -C "$site"
        export PYTHONPATH="$PWD/$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    for pair in $NEEDED; do
        mod=${pair%%:*}
        dist=${pair##*:}
        if ! python -c "import $mod" 2>/dev/null; then
            echo "installing $dist (offline)"
            python -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "$dist"
        fi
    done
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # shellcheck disable=SC2086 # GPU_CHECK_ARGS: extra flags, e.g. "--engine torch" for a CPU dry run
    timeout 540 python scripts/gpu_check.py --out "$OUT" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
}

case "${1:-run}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 [prepare|run]" >&2; exit 2 ;;
esac
