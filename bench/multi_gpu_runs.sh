#!/usr/bin/env bash
# Short real training runs on 2 GPUs of one host: the checks of docs/DISTRIBUTED.md "What was run".
#
#   bash bench/multi_gpu_runs.sh ddp  OUT_DIR   # DDP: 2 GPUs = 1 GPU x grad accumulation; two "nodes" over loopback
#   bash bench/multi_gpu_runs.sh fsdp OUT_DIR   # KAT-B with FSDP: against DDP, and stopped + resumed
#   bash bench/multi_gpu_runs.sh fsdp_speed OUT_DIR  # KAT-B at batch 128 per GPU: FSDP and DDP images/s, memory
#
# Run directories go to $RUNS_DIR (default OUT_DIR/runs); logs, comparisons and metrics-<run>.jsonl to OUT_DIR.
#
# All runs use the ImageNet configs (kat_s/kat_b) on the embedded demo digits, upscaled to 224 px, with the random parts of the recipe off (crops,
# flips, RandAugment, erasing, mixup, drop path), so runs that must compute the same thing can be compared step
# by step with bench/compare_runs.py: the differences left are the order of floating-point sums and bf16.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: multi_gpu_runs.sh ddp|fsdp|fsdp_speed OUT_DIR"
section=${1:?$usage}
out=${2:?$usage}
runs=${RUNS_DIR:-$out/runs}
mkdir -p "$out" "$runs"
export NCCL_NVLS_ENABLE=0 WANDB_MODE=disabled
# The same CPU threading for every layout: torchrun sets OMP_NUM_THREADS=1 for several processes per node but
# not for one, and a plain `python train.py` uses all cores.
export OMP_NUM_THREADS=1

common=(--data_dir data/demo --mixed_precision bf16 --workers 6 --log_interval 1
  --scale "[1,1]" --ratio "[1,1]" --hflip 0 --color_jitter 0 --aa null --reprob 0 --mixup 0 --cutmix 0
  --drop_path 0 --warmup_epochs 0 --lr_base_batch_size null --lr 5e-4 --wandb_mode disabled
  --output_dir "$runs" --keep_checkpoints 1)

step() {  # step NAME COMMAND...: run with a time limit, log to $out/NAME.log, report the exit status
  local name=$1
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  timeout 240 "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  tail -n 3 "$out/$name.log"
}

if [ "$section" = ddp ]; then
  ddp=(--config kat_s "${common[@]}" --batch_size 64 --max_steps 40 --model_ema false --plot_rationals false)
  step ddp2 accelerate launch --multi_gpu --num_processes 2 train.py "${ddp[@]}" --run_name ddp2
  # The same run again: how far two runs of one layout drift apart (the noise floor of the comparisons).
  step ddp2_again accelerate launch --multi_gpu --num_processes 2 train.py "${ddp[@]}" --run_name ddp2_again
  step accum2 python train.py "${ddp[@]}" --grad_accum_steps 2 --run_name accum2
  # Two single-GPU "nodes" meeting over 127.0.0.1 (c10d rendezvous), as two machines would.
  port=$((29600 + RANDOM % 1000))
  for gpu in 0 1; do
    CUDA_VISIBLE_DEVICES=$gpu timeout 240 python -m torch.distributed.run --nnodes 2 --nproc_per_node 1 \
      --rdzv_backend c10d --rdzv_endpoint "127.0.0.1:$port" --rdzv_id kat-loopback \
      train.py "${ddp[@]}" --run_name nodes2 >"$out/nodes2-gpu$gpu.log" 2>&1 &
  done
  wait
  echo "=== nodes2: done"; tail -n 3 "$out"/nodes2-gpu*.log
  # CUDA graphs under DDP in the real loop (inductor's kernels round differently: close, not identical).
  step ddp2_graphs accelerate launch --multi_gpu --num_processes 2 train.py "${ddp[@]}" --compile --compile_mode reduce-overhead --run_name ddp2_graphs
  python bench/compare_runs.py "$runs"/{ddp2,ddp2_again,accum2,nodes2,ddp2_graphs} --json "$out/compare-ddp.json"
elif [ "$section" = fsdp ]; then
  base=(--config kat_b "${common[@]}" --batch_size 64 --checkpoint_interval 10 --model_ema true
    --model_ema_decay 0.9 --plot_rationals true)
  step fsdp accelerate launch --multi_gpu --num_processes 2 train.py "${base[@]}" --fsdp --max_steps 20 --run_name fsdp
  step ddp accelerate launch --multi_gpu --num_processes 2 train.py "${base[@]}" --max_steps 20 --run_name ddp
  # Stopped after step 10 (its checkpoint), then the same command with the later stop resumes from it.
  step fsdp_first accelerate launch --multi_gpu --num_processes 2 train.py "${base[@]}" --fsdp --max_steps 10 --run_name fsdp_resumed
  step fsdp_resume accelerate launch --multi_gpu --num_processes 2 train.py "${base[@]}" --fsdp --max_steps 20 --run_name fsdp_resumed
  ls -la "$runs/fsdp_resumed/step-00000010" "$runs/fsdp_resumed/step-00000010/optimizer" "$runs/fsdp/plots" 2>&1
  python bench/compare_runs.py "$runs/fsdp" "$runs/ddp" "$runs/fsdp_resumed" --json "$out/compare-fsdp.json"
  # The gathered weights are whole: eval.py on them gives what the run logged at its last evaluation.
  step eval_fsdp python eval.py --checkpoint "$runs/fsdp" --batch_size 256 --workers 6
  step eval_fsdp_ema python eval.py --checkpoint "$runs/fsdp" --ema --batch_size 256 --workers 6
  grep -h '"type": "eval"' "$runs/fsdp/metrics.jsonl" | tail -n 1
elif [ "$section" = fsdp_speed ]; then
  speed=(--config kat_b "${common[@]}" --batch_size 128 --max_steps 40 --checkpoint_interval null --plot_rationals false)
  step speed_fsdp accelerate launch --multi_gpu --num_processes 2 train.py "${speed[@]}" --fsdp --run_name speed_fsdp
  step speed_ddp accelerate launch --multi_gpu --num_processes 2 train.py "${speed[@]}" --run_name speed_ddp
  python bench/compare_runs.py "$runs"/{speed_ddp,speed_fsdp} --json "$out/compare-fsdp-speed.json"
else
  echo "unknown section '$section'; $usage" >&2
  exit 2
fi
for run in "$runs"/*/; do  # the step-by-step records, next to the logs
  cp "$run/metrics.jsonl" "$out/metrics-$(basename "$run").jsonl"
done
