#!/usr/bin/env bash
# GPU checks: what only a GPU can show, one line each on stdout (a figure, or PASS/FAIL/SKIP and why); progress and
# timings on stderr; every run's log under --out. Sized to take under 10 min on one H100 (an estimate: the CPU smoke
# is what has run so far).
#
#   bash benchmarks/gpu.sh [--smoke] [--out DIR] [-- --section.field=value ...]
#
#   --smoke   on CPU at tiny size: the tiny preset, fp32, no compile, 20 stdlib files; ~2 min on 2 cores
#   --out     where the dataset, run directories and logs go (default: a new directory under $TMPDIR or /tmp)
#   -- ...    extra trainer overrides for every training run (e.g. -- --train.micro_batch=4 on a smaller GPU)
#
# The checks, in order (--smoke: tiny for 1b and 125m, MoE at tiny size, SDPA for the fine-tuning run):
#   1b, 125m  tokens/s, MFU and peak memory, bf16 + torch.compile + FSDP2 on 1 GPU, under torchrun, then under
#             Ray Train when Ray is here
#   sample    the 125m torchrun run keeps train.sample_prompt at its default: PASS if it exits 0 and prints the
#             end-of-run sample (generated on the GPU after the last checkpoint)
#   flex      4 examples of different lengths packed in one row through compiled FlexAttention, forward and
#             backward, bf16: PASS if each example's logits and the gradients equal running it alone (SDPA causal)
#             within bf16 tolerance, with the largest errors (--smoke: fp32 forward only; no backward on CPU)
#   sft       125m fine-tuned on packed chat data with FlexAttention's block-causal kernel: tokens/s, MFU, memory
#   moe       configs/moe.toml (8 experts, top-2), bf16 + compile: tokens/s, MFU, peak memory
#   eval      python -m trainer.eval --no-ray on the 125m torchrun run's checkpoint: PASS and its bits per byte
#   preempt   SIGTERM to the training rank of a torchrun run (125m, eager) once it has logged a step: PASS if the
#             checkpoint of its step commits within checkpoint.preempt_grace_s and the same command resumes from it
# A failed check prints FAIL (with its log's path) and the others still run; the exit status is 1 if any failed.
#
# Bare-box mode (a GPU box with torch but no Ray, no package index): when `ray` does not import or raylm is not
# installed for $PYTHON, the Ray half is skipped (one line on stderr says so), dataprep runs in this process
# (--workers.local=true) and every run uses torchrun. Nothing is ever installed: `pip install -e .` (and torch for
# the GPU's CUDA) first for the Ray half. Either way the code is this checkout's (PYTHONPATH=. is prepended) and
# $PYTHON (default `python`) needs torch >= 2.8.
#
# The dataset is the Python standard library (python -m dataprep's demo corpus) at seq 2048 with a 32k vocabulary
# (--smoke: 20 files, seq 64, vocab 512). Each throughput run trains 31 steps and logs every 10 (--smoke: 13 and 4);
# a line is the mean of the log windows after the first (compile, warm-up), leaving out the last step's window,
# which holds the end-of-run checkpoint (deleted after the run). With Ray, dataprep and Ray Train join the Ray
# cluster in RAY_ADDRESS if set (or one started with `ray start` on this machine), else each starts a local Ray.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
smoke=0 out="" extra=()
while (($#)); do
    case "$1" in
        --smoke) smoke=1 ;;
        --out) (($# > 1)) || { echo "error: --out needs a directory" >&2; exit 2; }; out=$2; shift ;;
        --out=*) out=${1#--out=} ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "error: unknown argument '$1' (bash benchmarks/gpu.sh --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -z $out || $out == /* ]] || out="$PWD/$out"  # relative to where it was called from, before the cd
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whichever raylm is installed
py=${PYTHON:-python}

note() { echo "gpu.sh: $*" >&2; }
took() { printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); }
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if ! version=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    echo "error: $py cannot import torch; install torch (for the GPU's CUDA) or point PYTHON at a Python that has it" >&2
    exit 2
fi
if ! "$py" -c 'import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 8))'; then
    echo "error: gpu.sh needs torch >= 2.8 (FlexAttention, FSDP2), $py has torch $version" >&2
    exit 2
fi
if ! missing=$("$py" -c 'import dataprep.pipeline, trainer.train, trainer.eval.job' 2>&1); then
    echo "error: $py cannot import what the runs need ($(tail -n 1 <<<"$missing")); install it (no Ray needed)" >&2
    exit 2
fi
# The Ray half needs Ray, and raylm installed: a Ray cluster's workers import it from their own Python
why_bare=""
"$py" -c 'import ray' 2>/dev/null || why_bare="ray does not import"
(cd / && env -u PYTHONPATH "$py" -c 'import raylm' 2>/dev/null) || why_bare+="${why_bare:+ and }raylm is not installed"
[[ -z $why_bare ]] || note "bare-box mode ($why_bare for $py): the Ray half is skipped; torchrun only, dataprep" \
    "in this process, nothing installed (pip install -e . first for the Ray half)"

if ((smoke)); then
    presets=(tiny) steps=13 log_every=4 seq_len=64
    declare -A global=([tiny]=8 [moe]=8) micro=([tiny]=4 [moe]=4)
    prep=(--max-files 20 --vocab-size 512 --seq-len "$seq_len" --val-fraction 0.2)
    switches=(--train.device=cpu --ray.use_gpu=false --parallel.mixed_precision=fp32 --parallel.compile=false)
    moe_size=(--model.dim=64 --model.n_layers=2 --model.n_heads=4 --model.n_kv_heads=2 --model.ffn_hidden=128)
    attention=sdpa flex_device=cpu  # FlexAttention has no backward on CPU
    preempt=(--train.global_batch=4 --train.micro_batch=4) preempt_every=4
    evaluate=(--run.device=cpu --run.mixed_precision=fp32 --eval.rows=32)
    device=CPU
else
    presets=(1b 125m) steps=31 log_every=10 seq_len=2048
    declare -A global=([1b]=16 [125m]=32 [moe]=32) micro=([1b]=8 [125m]=16 [moe]=16)  # sized for 80 GB
    prep=(--vocab-size 32000 --seq-len "$seq_len" --val-fraction 0.02)
    switches=(--train.device=cuda --ray.use_gpu=true --parallel.mixed_precision=bf16 --parallel.compile=true)
    moe_size=()
    attention=flex flex_device=cuda
    preempt=(--train.global_batch=32 --train.micro_batch=8) preempt_every=5  # eager: more activation memory
    evaluate=(--run.device=cuda --run.mixed_precision=bf16 --eval.rows=256)
    device=$("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
    if [[ -z $device ]]; then
        echo "error: torch sees no CUDA GPU (torch $version); on a CPU machine, bash benchmarks/gpu.sh --smoke" \
            "checks this script" >&2
        exit 2
    fi
fi
launchers=(torchrun ray-train) local_prep=()
[[ -z $why_bare ]] || launchers=(torchrun) local_prep=(--workers.local=true)
out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/raylm-gpu.XXXXXX")}
mkdir -p "$out/logs" "$out/runs"
data="$out/data-seq$seq_len" last=${presets[-1]} failed=0
note "${presets[*]} on $device (torch $version), seq $seq_len, $steps steps per run; output in $out"

fail() {  # fail CHECK SUBJECT DETAIL: a FAIL line on stdout, counted
    printf '%-8s %-16s FAIL  %s\n' "$1" "$2" "$3"
    failed=$((failed + 1))
}

start=$SECONDS
if ! "$py" -m dataprep --output "$data" "${prep[@]}" ${local_prep[@]+"${local_prep[@]}"} >"$out/logs/dataprep.log" 2>&1; then
    tail -n 40 "$out/logs/dataprep.log" >&2
    echo "error: dataprep failed; its log is $out/logs/dataprep.log" >&2
    exit 1
fi
note "dataset ready in $(took $((SECONDS - start)))"
# One peak for every MFU of this run (a GPU's datasheet figure; on CPU the matmul peak with the threads a process
# gets), so the same tokens/s give the same MFU under torchrun and Ray Train whatever threads each worker has
peak_flops=$("$py" -m benchmarks.gpu_report --measure-peak "$( ((smoke)) && echo cpu || echo cuda)")
note "MFU divides by ${peak_flops} FLOP/s per worker, the same for every line (benchmarks/gpu_report.py)"

trainer_cmd() {  # trainer_cmd LAUNCHER: the command line that starts the trainer (into the array `cmd`)
    case $1 in
        torchrun) cmd=("$py" -m torch.distributed.run --nproc_per_node=1 --master_port="$(free_port)"
                       -m trainer --no-ray) ;;
        ray-train) cmd=("$py" -m trainer --ray.num_workers=1) ;;
    esac
}

bench() {  # bench CONFIG LAUNCHER [DATASET LABEL OVERRIDE...]: one run, then its figure line on stdout; 1 if it failed
    local config=$1 launcher=$2 dataset=${3:-$data} label=${4:-$2} t0=$SECONDS cmd name=${1##*/}
    local run="$out/runs/$name-$label" log="$out/logs/$name-$label.log" more=("${@:5}")
    trainer_cmd "$launcher"
    rm -rf "$run"  # a finished run directory would only say so
    if ! "${cmd[@]}" --config "configs/$config.toml" --data.path "$dataset" --run.dir "$run" "${switches[@]}" \
        --train.steps="$steps" --train.log_every="$log_every" --train.global_batch="${global[$name]}" \
        --train.micro_batch="${micro[$name]}" --optim.warmup_steps=10 --train.eval_every=0 --train.eval_rows=0 \
        --checkpoint.every=0 ${more[@]+"${more[@]}"} ${extra[@]+"${extra[@]}"} >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        fail "$name" "$label" "the run failed; its log is $log"
        return 1
    fi
    note "$name $label: $(took $((SECONDS - t0)))"
    "$py" -m benchmarks.gpu_report "$run" --preset "$name" --launcher "$label" --peak-flops "$peak_flops" ||
        fail "$name" "$label" "no figures from $run/metrics.jsonl (gpu_report's error above)"
}

check() {  # check ARGS...: python -m benchmarks.gpu_checks ARGS, its line on stdout (a crash's traceback: checks.log)
    local t0=$SECONDS
    "$py" -m benchmarks.gpu_checks "$@" 2>>"$out/logs/checks.log" || failed=$((failed + 1))
    note "$1: $(took $((SECONDS - t0)))"
}

# Throughput. The last preset's torchrun run keeps the default end-of-run sample and its checkpoint (for eval).
for preset in "${presets[@]}"; do
    for launcher in "${launchers[@]}"; do
        if [[ $preset != "$last" || $launcher != torchrun ]]; then
            bench "$preset" "$launcher" "$data" "$launcher" --train.sample_prompt= || true
            rm -rf "$out/runs/$preset-$launcher/checkpoints"  # the end-of-run checkpoint (~12 GB for 1b)
        elif bench "$preset" torchrun; then
            check sample "$out/logs/$preset-torchrun.log" --subject "$preset torchrun"
        else
            fail sample "$preset torchrun" "the run failed; its log is $out/logs/$preset-torchrun.log"
        fi
    done
done

check flex --device "$flex_device"

# Chat fine-tuning: conversations cut from the same corpus (a chunk of a file, then the next chunk as the reply),
# tokenized with the dataset's tokenizer and raylm's chat template, packed whole into rows with a loss mask. Chunks
# in characters scaled to the row (--smoke: seq 64 holds ~150 characters), so prompts leave room for their replies
# (dataprep drops a conversation whose prompt fills the row).
chats="$out/chats" chat_data="$out/chat-seq$seq_len"
mkdir -p "$chats"
"$py" - "$chats/chats.jsonl" "$last" "$seq_len" <<'PY'
import glob, json, os, random, sys, sysconfig
files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:400 if sys.argv[2] != "tiny" else 40]
scale = min(1.0, int(sys.argv[3]) / 2048)
rng = random.Random(0)
with open(sys.argv[1], "w") as out:
    for path in files:
        text = open(path, encoding="utf-8", errors="replace").read()
        for start in range(0, max(len(text) - 400, 0), 3000):
            cut = start + rng.randint(max(20, int(100 * scale)), max(60, int(1500 * scale)))
            prompt, reply = text[start:cut], text[cut:cut + rng.randint(max(10, int(50 * scale)), max(40, int(1200 * scale)))]
            if "<|" not in prompt + reply:
                out.write(json.dumps({"prompt": prompt, "response": reply}) + "\n")
PY
if "$py" -m dataprep --format chat --input "$chats" --tokenizer "$data" --output "$chat_data" --seq-len "$seq_len" \
    --val-fraction 0 ${local_prep[@]+"${local_prep[@]}"} >"$out/logs/dataprep-chat.log" 2>&1; then
    bench "$last" torchrun "$chat_data" "sft-$attention" --model.attention="$attention" --train.sample_prompt= || true
    rm -rf "$out/runs/$last-sft-$attention/checkpoints"
else
    tail -n 40 "$out/logs/dataprep-chat.log" >&2
    fail sft "chat dataprep" "its log is $out/logs/dataprep-chat.log"
fi

bench moe torchrun "$data" torchrun --train.sample_prompt= ${moe_size[@]+"${moe_size[@]}"} || true
rm -rf "$out/runs/moe-torchrun/checkpoints"

run="$out/runs/$last-torchrun"
if [[ -d $run/checkpoints ]]; then
    check eval --results "$out/eval-$last.json" --log "$out/logs/eval-$last.log" --subject "$last torchrun" -- \
        "$py" -m torch.distributed.run --nproc_per_node=1 --master_port="$(free_port)" -m trainer.eval --no-ray \
        --checkpoint "$run" --data.path "$data" --out "$out/eval-$last.json" "${evaluate[@]}"
    rm -rf "$run/checkpoints"
else
    fail eval "$last torchrun" "no checkpoint: the $last torchrun run failed"
fi

# Preemption: eager (compiling twice, before and after, would only cost time), 40 steps, SIGTERM once a step is logged
trainer_cmd torchrun
run="$out/runs/$last-preempt"
rm -rf "$run"
check preempt --run-dir "$run" --log "$out/logs/$last-preempt.log" --after-step "$preempt_every" \
    --subject "$last torchrun" -- "${cmd[@]}" --config "configs/$last.toml" --data.path "$data" --run.dir "$run" \
    "${switches[@]}" --parallel.compile=false --train.steps=40 --train.log_every="$preempt_every" "${preempt[@]}" \
    --optim.warmup_steps=10 --train.eval_every=0 --train.eval_rows=0 --train.sample_prompt= --checkpoint.every=0 \
    ${extra[@]+"${extra[@]}"}
rm -rf "$run/checkpoints"

note "done in $(took $((SECONDS - start))); $failed failed; logs and metrics.jsonl in $out"
((failed == 0))
