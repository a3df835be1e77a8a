#!/usr/bin/env bash
# The CUDA paths, checked and measured in one go on a GPU machine (CI has none; run it when you have one):
#
#   bash benchmarks/cuda_checks.sh TINY_DATA SMOKE_DATA [OUT]        # DEADLINE=540: seconds for all steps together
#
# TINY_DATA and SMOKE_DATA are data sets built beforehand (no procgen needed on the GPU machine), e.g.
#   genie data build recipes/coinrun-tiny.toml source.train_levels=24 source.val_levels=4 --out TINY_DATA
#   genie data build recipes/coinrun-smoke.toml --out SMOKE_DATA
# What it does, most important first, each step logged to OUT/STEP.log and summed up in OUT/summary.txt:
#   - the tiny recipe (shortened) end to end in fp16 (gradient scaler) with run.distributed=fsdp under torchrun
#     (Accelerate applies FSDP only to GPU processes), and in bf16 in one plain process;
#   - training and play throughput at the medium, paper (Appendix F) and tiny sizes, fp32 / bf16 / fp16, and at
#     the paper's whole batch on one GPU with activation checkpointing, and the medium steps with their transformer
#     stacks compiled, and those levers taking turns in one process (step_turns.py);
#   - kill -9 mid-stage and --resume against an uninterrupted run, in fp16 (scaler state in the checkpoint);
#   - ST vs full spatiotemporal attention, time and memory against T at the paper tokenizer's width;
#   - play speed (frames/s against history, cached vs uncached) at the paper's and the tiny sizes, and with the
#     cached step compiled (torch.compile, then with CUDA graphs).
# Before a lease, check every command here against the code as it is (no GPU needed, about ten seconds):
#   python benchmarks/check_commands.py benchmarks/cuda_checks.sh
# A step that would end past DEADLINE is cut short (its log says so), so the summary is always written.
# ONLY="NAME NAME" runs just those steps; the real-time ones alone (a short lease):
#   ONLY="play-speed-paper-2steps-cudagraphs play-speed-paper-bf16 throughput-paper-bf16-ckpt turns-medium"
# JSON results land in benchmarks/results/ (names end in -cuda); OUT holds the logs and the runs' reports.
set -u
TINY_DATA=$1
SMOKE_DATA=$2
OUT=${3:-benchmarks/results/cuda-logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, log, record status and time, go on whatever happens
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then echo "$name: skipped, past the deadline" | tee -a "$OUT/summary.txt"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    grep -v "it/s\]\|step/s\]\|s/step\]\|s/it\]" "$OUT/$name.log" | tail -n 12
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"

TINY="recipes/coinrun-tiny.toml source.train_levels=24 source.val_levels=4 data.path=$TINY_DATA
    train.tokenizer.steps=600 train.dynamics.steps=600 train.tokenizer.eval_every=300 train.dynamics.eval_every=300"
step run-fp16-fsdp 150 $PY -m torch.distributed.run --nproc_per_node 1 -m genie_core.cli run $TINY \
    run.mixed_precision=fp16 run.distributed=fsdp --out "$OUT/run-fp16-fsdp"

MEDIUM="run.name=coinrun-medium tokenizer.dim=256 tokenizer.encoder_depth=4 tokenizer.decoder_depth=4 tokenizer.heads=8
    action_model.dim=128 action_model.encoder_depth=4 action_model.decoder_depth=4 dynamics.dim=256 dynamics.depth=6
    dynamics.heads=8"
for precision in bf16 fp16 fp32; do
    step "throughput-medium-$precision" 90 $PY benchmarks/stage_throughput.py recipes/coinrun-tiny.toml $MEDIUM \
        data.path="$TINY_DATA" --precision $precision --steps 20
done
# Appendix F sizes at the per-GPU batch of an 8-GPU run (48 / 8 and 36 / 8): the whole batch on one 80 GB GPU does not
# fit without activation checkpointing.
PAPER="recipes/coinrun-paper.toml data.path=$TINY_DATA train.tokenizer.batch_size=6 train.dynamics.batch_size=4"
step throughput-paper-bf16 150 $PY benchmarks/stage_throughput.py $PAPER --precision bf16 --steps 10 --frames 16
# The paper's whole batches (48 and 36) on this one GPU, with activation checkpointing: steps/s and peak memory.
step throughput-paper-bf16-ckpt 240 $PY benchmarks/stage_throughput.py recipes/coinrun-paper.toml \
    data.path="$TINY_DATA" train.tokenizer.activation_checkpointing=true train.dynamics.activation_checkpointing=true \
    --precision bf16 --steps 3 --frames 2
# The medium steps with every transformer stack through torch.compile (inductor, Triton), beside the plain bf16 row:
# on a GPU the small steps wait on kernel launches, which compiling fuses away.
step throughput-medium-bf16-compiled 180 $PY benchmarks/stage_throughput.py recipes/coinrun-tiny.toml $MEDIUM \
    data.path="$TINY_DATA" --precision bf16 --steps 20 --compile
# The same levers taking turns in one process (fp32): torch's AdamW loop, the engine's fused one, compiled stacks.
step turns-medium 150 $PY benchmarks/step_turns.py recipes/coinrun-tiny.toml $MEDIUM run.name=coinrun-medium-cuda \
    data.path="$TINY_DATA" --variants adamw-loop,recipe,compile --rounds 6 --block 5

step run-bf16 120 $PY -m genie_core.cli run $TINY run.mixed_precision=bf16 --out "$OUT/run-bf16"
for run in run-bf16 run-fp16-fsdp; do
    [ -f "$OUT/$run/report.md" ] && cp "$OUT/$run/report.md" "$OUT/$run-report.md"
done

step resume-fp16 120 $PY benchmarks/resume_equivalence.py recipes/coinrun-smoke.toml data.path="$SMOKE_DATA" \
    run.mixed_precision=fp16 train.dynamics.steps=40 train.dynamics.checkpoint_every=5 train.dynamics.log_every=1 \
    train.dynamics.eval_every=10 run.trackers=none

# The same with deterministic kernels: two plain CUDA runs already differ in the last bits from step 1 (atomics
# in some backward kernels), so only run.deterministic=true can show bitwise equality on a GPU.
step resume-fp16-deterministic 150 $PY benchmarks/resume_equivalence.py recipes/coinrun-smoke.toml \
    data.path="$SMOKE_DATA" run.mixed_precision=fp16 run.deterministic=true train.dynamics.steps=40 \
    train.dynamics.checkpoint_every=5 train.dynamics.log_every=1 train.dynamics.eval_every=10 run.trackers=none

# Play speed (`genie play`'s path: a session extending its cache, each frame decoded). First the paper's dynamics
# size played with the tiny recipe's sampler and world settings (2 greedy MaskGIT steps, each frame drawn from 2
# decoded frames, a block window past the 16 trained frames), its step compiled into CUDA graphs: the aim is 20
# frames/s at history 16. Then with its 25 steps uncompiled, and the tiny size.
step play-speed-paper-2steps-cudagraphs 240 $PY benchmarks/play_speed.py recipes/coinrun-paper.toml \
    data.path="$TINY_DATA" run.name=coinrun-paper-2steps sampler.steps=2 sampler.temperature=0 \
    sampler.order=noisy-confidence world.decode_frames=2 --context 16 --window block --history 16 --repeats 7 \
    --precision bf16 --compile --compile-mode reduce-overhead
for precision in bf16 fp32; do
    step "play-speed-paper-$precision" 150 $PY benchmarks/play_speed.py recipes/coinrun-paper.toml data.path="$TINY_DATA" \
        --history 1,2,4,8,16 --repeats 3 --precision $precision
done
step play-speed-tiny 60 $PY benchmarks/play_speed.py recipes/coinrun-tiny.toml data.path="$TINY_DATA" --repeats 5
# The cached step compiled: fused kernels (inductor, Triton), then also CUDA graphs (mode reduce-overhead).
step play-speed-paper-compiled 240 $PY benchmarks/play_speed.py recipes/coinrun-paper.toml data.path="$TINY_DATA" \
    --history 1,16 --repeats 3 --precision bf16 --compile
step play-speed-paper-cudagraphs 240 $PY benchmarks/play_speed.py recipes/coinrun-paper.toml data.path="$TINY_DATA" \
    --history 16 --repeats 3 --precision bf16 --compile --compile-mode reduce-overhead
step play-speed-tiny-cudagraphs 120 $PY benchmarks/play_speed.py recipes/coinrun-tiny.toml data.path="$TINY_DATA" \
    --history 1,16 --repeats 5 --compile --compile-mode reduce-overhead

step attention-scaling 120 $PY benchmarks/attention_scaling.py --dim 512 --heads 8 --depth 2 --tokens 256 \
    --batch 4 --precision bf16 --repeats 5

for precision in fp32 bf16 fp16; do
    step "throughput-tiny-$precision" 60 $PY benchmarks/stage_throughput.py recipes/coinrun-tiny.toml \
        data.path="$TINY_DATA" --precision $precision --steps 30
done
step throughput-paper-fp32 150 $PY benchmarks/stage_throughput.py $PAPER --precision fp32 --steps 10 --frames 16

cp benchmarks/results/*-cuda.json benchmarks/results/*-cuda.png "$OUT"/ 2>/dev/null
echo "== summary"
cat "$OUT/summary.txt"
