#!/usr/bin/env bash
# What a session with a lent GPU runs, one device call (10 minutes at most) per part.
#
# Once, on the CPU machine, in the repository root (the GPU image has torch and triton but
# neither peer, and cannot reach a registry):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# and before every run, the commit that travels (the device's copy of .git is not this
# checkout's: the first H100 run recorded the session's starting commit):
#   git describe --always --dirty --abbrev=7 > .whl/COMMIT
# Then one device `run` per part, each with carry [".whl"]: a path carried in one call is
# gone in the next, on a warm machine too (measured 2026-11-27), so every call carries all
# it needs. A lease of 15 minutes of device time (the present rule, the machine's start
# included) fits two calls: run
#   BUDGET_S=420 bash benchmarks/gpu_session.sh lease       (timeout_s 480)
# and at once, on the still-warm machine, the second call with what is left:
#   BUDGET_S=220 bash benchmarks/gpu_session.sh liger-sm90  (timeout_s 260, carry [".whl",
#   ".cute"]; token_logprobs against every peer, Liger's CuTe DSL kernel among them:
#   benchmarks/pack_cutedsl.sh makes .cute)
#   bash benchmarks/gpu_session.sh first   # versions, ceilings, Triton and CUDA tests (120 s),
#                                          # gopd demo --quick, gopd_loss and token_logprobs at
#                                          # N = 16384 bf16, token_logprobs' logits by cuBLAS
#                                          # (GOPD_LOGITS_GEMM) against the fused kernels (~9 min)
#   bash benchmarks/gpu_session.sh fold    # after `first` (~5 minutes): the folds not yet timed,
#                                          # the dense losses' and the frozen head's, against
#                                          # their recomputing backwards
#   bash benchmarks/gpu_session.sh gemm    # the folded gopd_loss's chunk sweep, cuBLAS or Triton
#                                          # for the backward's GEMMs, the autotune cache (~5.5 min;
#                                          # ran in the second lease)
#   bash benchmarks/gpu_session.sh stages  # token_logprobs stage by stage beside cuBLAS (75 s)
#   bash benchmarks/gpu_session.sh fp16-torch  # the torch backend's fp16 GEMMs (a T4's path), its
#                                          # CUDA tests, timed against naive fp16 (~1.5 minutes)
#   bash benchmarks/gpu_session.sh small   # gopd_loss's one-chunk fold at N = 2048, frozen scoring
#                                          # with GOPD_LOGITS_GEMM swept, the dense fold's stored
#                                          # dz against its fp32 sum (~4 minutes)
#   bash benchmarks/gpu_session.sh vocab-parallel  # heads split by vocabulary (vocab_group): their
#                                          # tests with the compiled kernels, 2 and 3 ranks over
#                                          # gloo on the one GPU (~2 minutes, never run on a GPU)
#   bash benchmarks/gpu_session.sh softcap # logit scales and soft-caps (Gemma 2's): their tests with
#                                          # the compiled kernels, token_logprobs and gopd_loss of
#                                          # a soft-capped head beside Liger's and CCE's (~8 minutes)
#   bash benchmarks/gpu_session.sh trainer # a bf16 LoRA student trained on CUDA, one update step
#                                          # through a 28-layer Qwen3-0.6B shape, the micro-batch
#                                          # layouts (~5 minutes)
# With more time, the whole gpu preset in parts:
#   bash benchmarks/gpu_session.sh fp32    # gopd_loss and token_logprobs at N = 16384 fp32
#   bash benchmarks/gpu_session.sh tune    # ours under several GOPD_WORKSPACE_MB (~5 minutes)
#   bash benchmarks/gpu_session.sh check   # versions, ceilings, Triton and CUDA tests, quick report
#   bash benchmarks/gpu_session.sh token   # --preset gpu: token_logprobs, token_logprobs_fwd
#   bash benchmarks/gpu_session.sh frozen  # --preset gpu: token_logprobs_frozen_head, gopd_loss_frozen_head
#   bash benchmarks/gpu_session.sh loss    # --preset gpu: gopd_loss, frozen_scoring
#   bash benchmarks/gpu_session.sh dense   # --preset gpu: gopd_dense_loss, gopd_dense_loss_exopd
# Each part leaves log.txt and results.tar.gz under $OUT (the tool brings back 8 files at
# most). Untar the latter in the repository root: the JSON lands in
# benchmarks/results/<card>/; `python -m benchmarks.report --plots-only --results <that
# folder>` draws the plots and the summary there. A part stops itself before the device
# limit; every finished shape is already saved, so a part cut short is rerun with --op and
# --n for what is missing.
set -uo pipefail
part=${1:?usage: gpu_session.sh lease|liger-sm90|first|fold|gemm|stages|fp16-torch|small|vocab-parallel|softcap|trainer|fp32|tune|check|token|frozen|loss|dense}
out=${OUT:-/tmp/gopd-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# One Triton cache for every process of a part: torch.compile (the torch-compile rows) sets
# TRITON_CACHE_DIR to inductor's own directory for the rest of its process when it is unset,
# so gopd's autotuned picks would land there, unseen by the next process without it.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    [ -f .whl/COMMIT ] && export GOPD_COMMIT=$(cat .whl/COMMIT)  # what benchmarks.report records
else
    echo "note: no .whl/ carried: Liger-Kernel and CCE rows will say they are not installed"
    export PYTHONPATH=$PWD
fi
stamp=$(mktemp)  # results written after this are the part's
budget=${BUDGET_S:-540}  # seconds for this part's report, inside the 600 s device limit

report() {  # the gpu preset for some ops, saved under results/<card>/, stopped before the limit
    timeout --signal=INT "$budget" python3 -m benchmarks.report --preset gpu --op "$1"
}

basics() {  # the card, the versions, its measured ceilings, and the tests on CUDA ($1 seconds)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || return 1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import torch; from gopd_kernels.ops.matmul_torch import bf16_gemm_mode as m
print('torch backend bf16 GEMMs:', m(torch.device('cuda', 0)))"  # addmm, mm or None (upcast)
    python3 -m benchmarks.ceilings || return 1
    # conftest runs the Triton tests compiled, on CUDA tensors, when a GPU is there; the
    # cuda tests check the torch backend's bf16 cuBLAS GEMMs (matmul_torch)
    # xdist (in the GPU image) spreads the compiles over the CPU cores. The time limit has
    # cut every run so far; the tests now compile one config per autotuned kernel
    # (tests/conftest.py) besides the pinned runs of every config, and the files whose paths
    # never ran on a GPU go first (the folds: token_logprobs' frozen head, the dense fold;
    # the configs). pytest drops the repeats.
    local workers=""; python3 -c "import xdist" 2>/dev/null && workers="-n 16"
    timeout "$1" python3 -m pytest -q $workers -m "triton or cuda" tests/kernels/test_token_logprobs.py \
        tests/kernels/test_launch_configs.py tests/kernels/test_folded_dense_kl.py \
        tests/kernels/test_matmul_torch.py tests/kernels
}

left() {  # seconds left before this part's deadline (BUDGET_S from its start), less $1; at
    # least 1 (`timeout 0` would mean no limit)
    local s=$(( budget - SECONDS - ${1:-0} )); echo $(( s > 1 ? s : 1 ))
}

case $part in
lease)  # the first call of a 15-minute lease (~7 minutes), what the fourth lease left open
    # (its version, with gopd_loss and the dense fold, is in git history at 48b5399): the CUDA
    # tests first (the bounded fp32 dW block, frozen scoring's cuBLAS default and the pair dW
    # sum are new), the folds with GOPD_DW_SUM swept, frozen scoring against every peer, the
    # dense recompute's memory after the fix, ExOPD's fold after the tile fix, the trainer on
    # CUDA. Each step's limit comes from one deadline (BUDGET_S=440).
    status=0
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || status=1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    # the kernels' tests compiled on CUDA (176 passed in 51 s on 16 workers in the fourth lease)
    local_workers=""; python3 -c "import xdist" 2>/dev/null && local_workers="-n 16"
    timeout 100 python3 -m pytest -q $local_workers -p no:benchmark -m "triton or cuda" tests/kernels || status=1
    head="--n 16384 --d 4096 --v 151936 --dtype bfloat16"
    # GOPD_DW_SUM=pair (new, not yet the default): the folds carry dW across row chunks as
    # itself plus a bf16 remainder, in the Triton matmul's epilogue, instead of an fp32 [V, D]
    # summed by cuBLAS and rounded at the end. It only lowers a peak that the rounding sets:
    # at the default 2048-row chunks the chunk's logits weigh as much as dW's bf16 copy at
    # D = 4096, so both ways peak at ~3721 MiB (3817 before dH was rounded per chunk); at
    # 1035-row chunks (600 MiB), float32 ~3689 MiB, pair ~3120 MiB. Time: the dW GEMM on
    # Triton (~600 TFLOP/s against cuBLAS's ~735 here before) costs ~6 ms
    GOPD_WORKSPACE_MB=600 timeout --signal=INT $(left 230) python3 -m benchmarks.stages $head --op gopd_loss \
        --impls gopd --sweep GOPD_DW_SUM=float32,pair || status=1
    # teacher + reference scoring, bf16 heads now on cuBLAS tiles (68.5 ms / 1057 MiB in the
    # stages sweep), against every peer, each once per model
    timeout --signal=INT $(left 150) python3 -m benchmarks.report --op frozen_scoring $head \
        --impls naive,torch-compile,gopd,liger,cce || status=1
    # the dense folds at N = 4096 <= 2D keep each chunk's bf16 dz and form dW in one GEMM at the
    # end (no fp32 [V, D] sum, none of its per-chunk traffic): predicted lam = 1 ~34-37 ms and
    # ~2.4 GB (39.3 ms / 3626 MiB before; Liger's JSD 42.7 ms / 2705 MiB, torch.compile 34.7 ms
    # / 4749 MiB), ExOPD's ~40-43 ms and ~2.4 GB (47.7 ms / 4846 MiB before the tile fix); the
    # dense recompute's fp32 dW block bounded (predicted ~2770 MiB, was 4846)
    timeout --signal=INT $(left 65) python3 -m benchmarks.report --op gopd_dense_loss,gopd_dense_loss_exopd \
        --n 4096 --d 4096 --v 151936 --dtype bfloat16 --impls naive,gopd,gopd-recompute,liger || status=1
    # the trainer end to end on CUDA (last run in the second lease): rollouts, scoring, updates
    timeout $(( $(left 5) < 60 ? $(left 5) : 60 )) python3 -m gopd.cli demo --quick --device cuda \
        --out /tmp/gopd-demo || status=1
    # not in this call, for time: gopd_loss's one-chunk fold at N = 2048 (part `small`)
    (exit $status)
    ;;
liger-sm90)  # the second call of a lease (carry [".whl", ".cute"]; benchmarks/pack_cutedsl.sh
    # makes .cute): Liger's SM90 scaled cross-entropy kernel, the published anchor for
    # token_logprobs (666-701 TFLOP/s counting 8 N D V), beside gopd's two paths and every peer.
    # Not yet run on a GPU: the DSL's import and Liger's use of it are checked first (both
    # passed on the CPU VM under the device's Python 3.12 and torch: NOTES.md of the H100).
    status=0
    # the small wheels first: pip --target would replace the directory the libraries unpack into.
    # A failure here is reported and the table still runs (its liger-scaled row then fails).
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .cute/small/*.whl || status=1
    unxz='import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'
    python3 -c "$unxz" < .cute/dsl.tar.xz | tar -x -C /tmp/site || status=1
    export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH  # what the wheel's .pth adds
    # a failed import is a result too: the report then records the liger-scaled row as failed
    python3 -c "import cutlass.cute; from liger_kernel.ops.fused_linear_scaled_cross_entropy import \
_load_sm90_function as f; print('Liger SM90 kernel:', f().__name__)" || status=1
    # the token_logprobs table of the lease (call 1 leaves it to this call): every peer, Liger's
    # also with its fp32 dW sums; every row also against the float64 reference at N = 16384
    TRITON_PRINT_AUTOTUNING=1 timeout --signal=INT $(left 10) python3 -m benchmarks.report --op token_logprobs \
        --n 16384 --d 4096 --v 151936 --dtype bfloat16 \
        --impls naive,torch-compile,gopd,gopd-fused,liger,liger-fp32,liger-scaled,cce || status=1
    (exit $status)
    ;;
first)
    status=0
    # the tests: 39 passed in 90 s on 16 workers and were cut (H100, 2026-11-26); more now
    basics 120 || status=1
    # the trainer end to end on CUDA (never run there before): rollouts, scoring, ExOPD
    # updates and evaluation with the Triton kernels (the demo's tiny SFT stays on the CPU)
    timeout 60 python3 -m gopd.cli demo --quick --device cuda --out /tmp/gopd-demo || status=1
    # the headline shapes, saved as they finish (~130 s each; gopd's torch backend,
    # 2.5x slower than its Triton one there, left out for time); what is cut short is rerun
    # later with --op. The autotuner prints each kernel's chosen config.
    for op in gopd_loss token_logprobs; do  # gopd_loss: gopd folds (bf16), gopd-recompute does not
        TRITON_PRINT_AUTOTUNING=1 timeout --signal=INT 130 python3 -m benchmarks.report \
            --op $op --n 16384 --d 4096 --v 151936 --dtype bfloat16 \
            --impls naive,torch-compile,gopd,gopd-recompute,liger,cce || status=1
    done
    # token_logprobs' logit tiles by cuBLAS + the row passes (GOPD_LOGITS_GEMM=torch) against
    # the fused kernels, both with cuBLAS for dH and dW (140.5 ms in the second lease)
    GOPD_BACKWARD_GEMM=torch timeout 70 python3 -m benchmarks.stages --n 16384 --d 4096 --v 151936 \
        --dtype bfloat16 --sweep GOPD_LOGITS_GEMM=triton,torch --op token_logprobs --impls gopd || status=1
    (exit $status)
    ;;
vocab-parallel)  # every case of tests/kernels/test_vocab_parallel.py, its Triton ones compiled on
    # CUDA tensors (gloo moves CUDA tensors too; both ranks share the card). The benchmark
    # (benchmarks.vocab_parallel) needs a GPU per rank (NCCL) and is not run on one card.
    timeout 150 python3 -m pytest -q -p no:benchmark tests/kernels/test_vocab_parallel.py
    ;;
softcap)  # heads that scale or soft-cap their logits (new 2026-11-28, never run on a GPU): the
    # compiled kernels against float64, then token_logprobs and gopd_loss of a soft-capped head
    # (c = 30) beside the peers' softcap arguments, and uncapped; predicted: token_logprobs' fused
    # kernels a few % over their uncapped time (one more exp per logit, in the epilogue), since a
    # cap keeps bf16 off cuBLAS tiles; gopd_loss's fold one more pass over each chunk's logits
    status=0
    timeout 150 python3 -m pytest -q -p no:benchmark -m "triton or cuda" -k "softcap or soft_cap or logit_scale \
        or transforms or scaled or capped" tests/kernels || status=1
    timeout --signal=INT 330 python3 -m benchmarks.report \
        --op token_logprobs_softcap,token_logprobs,gopd_loss_softcap,gopd_loss \
        --n 16384 --d 4096 --v 151936 --dtype bfloat16 || status=1
    (exit $status)
    ;;
fp16-torch)  # the torch backend's fp16 heads on fp16 tensor cores with scaled dL/dz tiles (new;
    # before, float32 GEMMs): the T4's and V100's path, run here on the H100's cuBLAS. Predicted:
    # GEMMs at fp16's rate, and a host sync per tile (the scale) that costs a few ms. gopd's
    # gopd_loss row is now the Triton backend's fp16 fold (new default, as bf16's): predicted
    # within ~10 % of the bf16 fold at the same shape (cuBLAS fp16 650-693 TFLOP/s against
    # bf16's 702-760, one pass to scale each chunk's fp32 dz)
    status=0
    timeout 60 python3 -m pytest -q -p no:benchmark -m cuda tests/kernels/test_matmul_torch.py || status=1
    timeout --signal=INT 90 python3 -m benchmarks.report --op token_logprobs,gopd_loss --n 8192 --d 4096 \
        --v 151936 --dtype float16 --impls naive,gopd,gopd-torch || status=1
    (exit $status)
    ;;
small)  # not yet timed: rows that fit one fold chunk write a bf16 dW directly (no fp32 [V, D]);
    # teacher + reference scoring with cuBLAS logits, one model after the other; the stored dz
    status=0
    timeout --signal=INT 100 python3 -m benchmarks.report --op gopd_loss --n 2048 --d 4096 --v 151936 \
        --dtype bfloat16 --impls naive,torch-compile,gopd,gopd-recompute,cce || status=1
    timeout 70 python3 -m benchmarks.stages --n 16384 --d 4096 --v 151936 --dtype bfloat16 \
        --sweep GOPD_LOGITS_GEMM=triton,torch --op frozen_scoring --impls gopd || status=1
    # the dense fold with its dz stored (auto, N = 4096 <= 2D) against the fp32 dW sum, in one
    # process: predicted ~34-37 ms / ~2.4 GB against ~39 ms / ~3.6 GB
    timeout 60 python3 -m benchmarks.stages --n 4096 --d 4096 --v 151936 --dtype bfloat16 \
        --sweep GOPD_DW_SUM=auto,float32 --op gopd_dense_loss --impls gopd || status=1
    (exit $status)
    ;;
stages)  # where token_logprobs' time goes, stage by stage, beside cuBLAS on the same GEMMs
    # (it re-tuned for ~30 s in 90 s before TRITON_CACHE_DIR was pinned; it prints as it goes now)
    TRITON_PRINT_AUTOTUNING=1 timeout 75 python3 -m benchmarks.stages
    ;;
fp32)  # the headline shapes in fp32 (3xTF32 in gopd; cuBLAS fp32 or TF32-free in the peers)
    TRITON_PRINT_AUTOTUNING=1 timeout --signal=INT "$budget" python3 -m benchmarks.report \
        --op token_logprobs,gopd_loss --n 16384 --d 4096 --v 151936 --dtype float32
    ;;
tune)  # the Triton backward's dZ tile and the torch fold's tiles; the log is the record
    status=0
    head="--n 16384 --d 4096 --v 151936 --dtype bfloat16"
    timeout 150 python3 -m benchmarks.stages $head --sweep GOPD_WORKSPACE_MB=600,1200,2400 \
        --op gopd_loss --impls gopd,gopd-torch || status=1
    timeout 110 python3 -m benchmarks.stages $head --sweep GOPD_WORKSPACE_MB=300,600,1200,2400 \
        --op token_logprobs --impls gopd || status=1
    (exit $status)
    ;;
gemm)  # second call of a 15-minute lease after `first` (~5.5 minutes): the folded gopd_loss,
    # who should run the backward's GEMMs, the autotuner's disk cache
    status=0
    head="--n 16384 --d 4096 --v 151936 --dtype bfloat16"
    workers=""; python3 -c "import xdist" 2>/dev/null && workers="-n 16"
    # correct on CUDA first: the fold's row passes and the torch-GEMM backward, one rounding
    timeout 60 python3 -m pytest -q $workers -m "triton or cuda" tests/kernels/test_folded_loss.py \
        tests/kernels/test_linear_logsoftmax_triton.py tests/kernels/test_token_logprobs.py \
        -k "triton_fold or row_passes or rounding or through_torch" || status=1
    # the fold (3 GEMMs, a [rows, V] fp32 chunk) against the recomputing backward (4 GEMMs),
    # at fold chunks of ~2070, 4140 (its default) and 8280 rows
    timeout 80 python3 -m benchmarks.stages $head --sweep GOPD_WORKSPACE_MB=1200,2400,4800 \
        --op gopd_loss --impls gopd,gopd-fold || status=1
    # cuBLAS or Triton for the recomputing backward's dH and dW GEMMs
    timeout 50 python3 -m benchmarks.stages $head --sweep GOPD_BACKWARD_GEMM=triton,torch \
        --op token_logprobs --impls gopd || status=1
    # the saved table: gopd_loss with every peer that runs there (Liger's GRPO loss fails at N = 16384)
    timeout --signal=INT 120 python3 -m benchmarks.report --op gopd_loss $head \
        --impls naive,torch-compile,gopd,gopd-fold,cce || status=1
    # the autotuner's picks must outlive the process: a second process must not tune again
    for run in 1 2; do
        TRITON_PRINT_AUTOTUNING=1 timeout 20 python3 -c "import torch
from gopd_kernels.ops.matmul_triton import matmul
a, b = (torch.randn(s, device='cuda', dtype=torch.bfloat16) for s in ((512, 256), (256, 384)))
matmul(a, b, torch.empty(512, 384, device='cuda'))
print('run $run done')" 2>&1 | grep -v '^Autotuning kernel'
    done
    find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*.autotune.json' | wc -l
    (exit $status)
    ;;
fold)  # the folds not yet timed, each beside its recomputing backward (gopd-recompute / gopd)
    status=0
    # token_logprobs with a frozen head: gopd folds (2 cuBLAS GEMMs), gopd-recompute (3 Triton)
    timeout --signal=INT 110 python3 -m benchmarks.report --op token_logprobs_frozen_head \
        --n 16384 --d 4096 --v 151936 --dtype bfloat16 \
        --impls naive,torch-compile,gopd,gopd-recompute,liger,cce || status=1
    # the dense losses: gopd recomputes (their Triton default), gopd-fold folds
    timeout --signal=INT 190 python3 -m benchmarks.report --op gopd_dense_loss,gopd_dense_loss_exopd \
        --n 4096 --d 4096 --v 151936 --dtype bfloat16 --impls naive,torch-compile,gopd,gopd-fold,liger || status=1
    (exit $status)
    ;;
trainer)  # the trainer's newer paths on CUDA (~4 minutes): a LoRA student in bf16 through the
    # Triton kernels (its frozen head folds), its adapter-free reference, adapter checkpoints,
    # two updates per rollout batch (o from the Triton forward, then off-policy clipping)
    status=0
    timeout 60 python3 -m gopd.cli demo --quick --device cuda --out /tmp/gopd-demo || status=1
    timeout 90 python3 -m gopd.cli train --config /tmp/gopd-demo/gopd/config.yaml --device cuda \
        --dtype bfloat16 --lora-rank 8 --lr 5e-3 --lam 1.25 --steps 5 --mini-batch-prompts 64 \
        --output-dir /tmp/gopd-lora || status=1
    ls /tmp/gopd-lora/checkpoints/step_0000005 || status=1
    # one update step through a Qwen3-0.6B-shaped student at its real depth (28 layers), bf16,
    # naive materialised logits against gopd (the Triton fold); saved under results/<card>/update_step/
    timeout 150 python3 -m benchmarks.update_step --layers 28 --tokens 2048,8192 --dtype bfloat16 || status=1
    # a step's scoring and update with padded, length-grouped and token-budget micro-batches
    # (the Triton kernels); saved under results/<card>/micro_batches/
    timeout 90 python3 -m benchmarks.micro_batches --cap 2048 || status=1
    (exit $status)
    ;;
check)
    status=0
    basics 240 || status=1
    timeout 200 python3 -m benchmarks.report --preset quick --no-save || status=1  # every CUDA path once
    (exit $status)
    ;;
token) report token_logprobs,token_logprobs_fwd ;;
frozen) report token_logprobs_frozen_head,gopd_loss_frozen_head ;;
loss) report gopd_loss,frozen_scoring ;;
dense) report gopd_dense_loss,gopd_dense_loss_exopd ;;
*) echo "unknown part $part: see the usage line"; exit 2 ;;
esac
status=$?
find benchmarks/results -type f -newer "$stamp" > "$stamp.list"
if [ -s "$stamp.list" ]; then tar -czf "$out/results.tar.gz" -T "$stamp.list"; else echo "no results written"; fi
exit $status
