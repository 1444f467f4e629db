#!/usr/bin/env bash
# Packs NVIDIA's CuTe DSL (nvidia-cutlass-dsl 4.8.1, CUDA 13 libraries) for the GPU machine, where
# Liger-Kernel's SM90 scaled cross-entropy kernel (the `liger-scaled` row, the published anchor
# for token_logprobs) needs it. Run once, here, in the repository root (~3 minutes on 2 cores).
#
# Its library wheel is 92 MB, over the 64 MiB one device call carries; unpacked and
# xz-compressed it is ~61 MiB, so it travels in two parts, one per call, into .cute/ (ignored
# by git), which the machine keeps between calls while it stays warm:
#   call 1: carry [".whl", ".cute/small", ".cute/part-aa"]   (the lease part, as usual)
#   call 2: carry [".cute/part-ab"]                          BUDGET_S=... bash benchmarks/gpu_session.sh liger-sm90
set -euo pipefail
grep -qx '/.cute/' .git/info/exclude || echo /.cute/ >> .git/info/exclude
rm -rf .cute && mkdir -p .cute/small .cute/unpacked
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
get .cute/small nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1
get .cute nvidia-cutlass-dsl-libs-cu13==4.8.1
(cd .cute/unpacked && python3 -m zipfile -e ../nvidia_cutlass_dsl_libs_cu13-*.whl .)
tar -C .cute/unpacked -cf - . | xz -T0 -9e | split -b 31M - .cute/part-
rm -rf .cute/unpacked .cute/nvidia_cutlass_dsl_libs_cu13-*.whl
ls -la .cute .cute/small
