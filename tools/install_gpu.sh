#!/usr/bin/env bash
# The GPU kernel packages train_gpt.py uses when they import, for the challenge's image (torch 2.9.1 +
# CUDA 12.8, Python 3.12, H100). Each one is optional: without it train_gpt.py uses its PyTorch path and
# warns at startup (REQUIRE_FAST_KERNELS=1 makes that an error). Run from anywhere:
#   bash tools/install_gpu.sh            # all three
#   SKIP_FA3=1 bash tools/install_gpu.sh # e.g. without FlashAttention 3 (torch's cuDNN SDPA is then used)
#   PRINT_ONLY=1 bash tools/install_gpu.sh  # the install commands, with the versions from requirements.txt
#   CONV1D_SDIST=... CONV1D_WHEEL_DIR=.whl bash tools/install_gpu.sh  # only a causal-conv1d wheel, built with
#       this python's torch and nvcc (no GPU needed), for a GPU machine with that torch and no network
# Ends by printing which implementation each kernel call site will use.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)  # tools/ in the project, or a record folder beside train_gpt.py
[ -f "$here/train_gpt.py" ] || here=$(dirname "$here")
requirements="$here/requirements.txt"
pip_install="python3 -m pip install --no-build-isolation"
run() { if [ -n "${PRINT_ONLY:-}" ]; then echo "+ $*"; else "$@"; fi; }  # PRINT_ONLY=1: say, do nothing

# The versions come from requirements.txt's "#kernel NAME==VERSION" lines, where the flags below are noted
# too; every pin is read before anything is installed, so a missing one stops the script with nothing done.
pin() {
  local spec
  spec=$(awk -v name="$1" '$1 == "#kernel" && index($2, name "==") == 1 {print $2}' "$requirements" 2>/dev/null)
  if [ -z "$spec" ]; then
    echo "install_gpu.sh: no '#kernel $1==VERSION' line in $requirements" >&2
    exit 1
  fi
  echo "$spec"
}
mamba_ssm=$(pin mamba-ssm)
causal_conv1d=$(pin causal-conv1d)
flash_attn_3=$(pin flash_attn_3)
if [ -n "${CONV1D_SDIST:-}" ]; then  # checked here too, before anything is installed
  sdist_name="${causal_conv1d%%==*}"; sdist_name="${sdist_name//-/_}-${causal_conv1d##*==}.tar.gz"
  if [ ! -f "$CONV1D_SDIST" ] || [ "$(basename "$CONV1D_SDIST")" != "$sdist_name" ]; then
    echo "install_gpu.sh: CONV1D_SDIST=$CONV1D_SDIST: expected an existing $sdist_name (the pin in requirements.txt)" >&2
    exit 1
  fi
fi
if [ -n "${CONV1D_WHEEL_DIR:-}" ] && [ -z "${CONV1D_SDIST:-}" ]; then
  echo "install_gpu.sh: CONV1D_WHEEL_DIR=$CONV1D_WHEEL_DIR builds a wheel from CONV1D_SDIST, which is not set" >&2
  exit 1
fi

# mamba-ssm: only its Triton SSD kernels are used. MAMBA_SKIP_CUDA_BUILD skips compiling the Mamba-1
# selective-scan extension (many minutes of nvcc) and MAMBA_FORCE_BUILD keeps setup.py from fetching a
# prebuilt wheel built against another torch. mamba-ssm 2.3.2.post1's package __init__ imports that
# missing extension; train_gpt.py imports mamba_ssm.ops.triton.ssd_combined without running the
# __init__, so nothing in site-packages needs editing. --no-deps: its declared dependencies
# (transformers, tilelang, quack-kernels, ...) are for parts we do not import; the SSD needs einops and
# packaging, which requirements.txt lists.
if [ -z "${CONV1D_WHEEL_DIR:-}" ]; then
  run python3 -m pip install einops packaging
  run env MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $pip_install --no-deps "$mamba_ssm"
fi

# causal-conv1d: its setup.py downloads the release wheel that matches torch, CUDA and the C++ ABI when
# one exists; otherwise it compiles for every GPU generation its CUDA knows (its own -gencode list, which
# TORCH_CUDA_ARCH_LIST does not change). CONV1D_SDIST=causal_conv1d-VERSION.tar.gz (offline, or no matching
# wheel) builds that source for Hopper (sm_90) only, its -gencode list cut to that one.
if [ -n "${CONV1D_SDIST:-}" ] && [ -z "${SKIP_CAUSAL_CONV1D:-}" ]; then
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  run tar xzf "$CONV1D_SDIST" -C "$src" --strip-components=1
  run python3 - "$src/setup.py" <<'PY'
import sys
path, mark = sys.argv[1], "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
text = open(path).read()
if text.count(mark) != 1:
    sys.exit(f"install_gpu.sh: {path} has no single '{mark.strip()}' line to put the sm_90-only list before")
open(path, "w").write(text.replace(mark, '    cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]\n' + mark))
PY
  if [ -n "${CONV1D_WHEEL_DIR:-}" ]; then  # the wheel only, then stop: nothing else is for this machine
    run env CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} python3 -m pip wheel --no-build-isolation \
      --no-deps "$src" -w "$CONV1D_WHEEL_DIR"
    exit 0
  fi
  run env CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} $pip_install --no-deps "$src"
elif [ -z "${SKIP_CAUSAL_CONV1D:-}" ]; then
  run env MAX_JOBS=${MAX_JOBS:-16} $pip_install "$causal_conv1d"
fi

# FlashAttention 3 (flash_attn_interface): the community wheels the challenge's records install.
if [ -z "${SKIP_FA3:-}" ]; then
  run python3 -m pip install --no-deps "$flash_attn_3" \
    --find-links https://windreamer.github.io/flash-attention3-wheels/cu128_torch291/
fi

[ -n "${PRINT_ONLY:-}" ] && exit 0
cd "$here"
python3 - <<'PY'
import train_gpt as tg
for site, (impl, name) in tg.load_fast_kernels().items():
    print(f"{site}: {'OK ' + name if impl is not None else 'fallback (' + name + ')'}")
PY
