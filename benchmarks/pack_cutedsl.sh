#!/usr/bin/env bash
# Packs NVIDIA's CuTe DSL (nvidia-cutlass-dsl 4.8.1, CUDA 13 libraries) for the GPU machine, where
# Liger-Kernel's SM90 scaled cross-entropy kernel (the `liger-scaled` row, the published anchor
# for token_logprobs) needs it. Run once, here, in the repository root (~3.5 minutes on 2 cores).
#
# Its library wheel is 92 MB, over what one device call carries with the rest (64 MiB). Its
# two shared libraries, unpacked and xz-compressed through the x86 branch filter (which makes
# machine code's call targets compressible), are 52 MB: one file, .cute/dsl.tar.xz, beside
# the three small wheels in .cute/small (ignored by git). One call carries it all:
#   carry [".whl", ".cute"]    BUDGET_S=... bash benchmarks/gpu_session.sh liger-sm90
# (A path carried in one call is gone in the next, warm machine or not: measured 2026-11-27,
# when the former two-part split, one part per call, lost its first part.)
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
# Python's lzma (the GPU image has no xz binary to rely on) decodes the x86 filter too
tar -C .cute/unpacked -cf - . | xz -T0 --x86 --lzma2=preset=9e,dict=192MiB > .cute/dsl.tar.xz
rm -rf .cute/unpacked .cute/nvidia_cutlass_dsl_libs_cu13-*.whl
ls -la .cute .cute/small
