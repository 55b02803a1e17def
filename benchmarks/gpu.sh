#!/usr/bin/env bash
# GPU check: tokens/s, MFU and peak memory of the 1b preset, then 125m, under torchrun and under Ray Train (bf16,
# torch.compile, FSDP2 on 1 GPU), then 125m fine-tuned on packed chat data with FlexAttention's block-causal kernel
# (--model.attention=flex), one line each on stdout; progress and timings go to stderr.
#
#   bash benchmarks/gpu.sh [--smoke] [--out DIR] [-- --section.field=value ...]
#
#   --smoke   on CPU: the tiny preset, fp32, no compile, 8 stdlib files, SDPA for chat; ~2 min on 2 cores
#   --out     where the dataset, run directories and logs go (default: a new directory under $TMPDIR or /tmp)
#   -- ...    extra trainer overrides for every run (e.g. -- --train.micro_batch=4 on a GPU with less memory)
#
# Installs nothing but the project (`pip install -e .` into $PYTHON, default `python`, when raylm is missing).
# The dataset is the Python standard library (python -m dataprep's demo corpus) at seq 2048 with a 32k vocabulary
# (--smoke: 8 files, seq 64, vocab 512). Each run trains 31 steps and logs every 10 (--smoke: 13 and 4); a line is
# the mean of the log windows after the first (compile, warm-up), leaving out the last step's window, which holds
# the end-of-run checkpoint (deleted after the run). dataprep and Ray Train join the Ray cluster in RAY_ADDRESS if
# set (or one started with `ray start` on this machine), else each starts a local Ray of its own.
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
py=${PYTHON:-python}

note() { echo "gpu.sh: $*" >&2; }
took() { printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); }
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if ! "$py" -c 'import importlib.metadata as m, importlib.util as u; m.version("raylm")
assert all(u.find_spec(name) for name in ("torch", "ray", "sentencepiece"))' 2>/dev/null; then
    note "raylm is not installed for $py: pip install -e . (on a GPU machine install torch for its CUDA first)"
    "$py" -m pip install -e .
fi

if ((smoke)); then
    presets=(tiny) steps=13 log_every=4 seq_len=64
    declare -A global=([tiny]=8) micro=([tiny]=4)
    prep=(--max-files 8 --vocab-size 512 --seq-len "$seq_len")
    switches=(--train.device=cpu --ray.use_gpu=false --parallel.mixed_precision=fp32 --parallel.compile=false)
    attention=sdpa  # FlexAttention has no backward on CPU
    device=CPU
else
    presets=(1b 125m) steps=31 log_every=10 seq_len=2048
    declare -A global=([1b]=16 [125m]=32) micro=([1b]=8 [125m]=16)  # micro-batches sized for 80 GB
    prep=(--vocab-size 32000 --seq-len "$seq_len")
    switches=(--train.device=cuda --ray.use_gpu=true --parallel.mixed_precision=bf16 --parallel.compile=true)
    attention=flex
    device=$("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
    if [[ -z $device ]]; then
        echo "error: torch sees no CUDA GPU (torch $("$py" -c 'import torch; print(torch.__version__)')); on a" \
            "CPU machine, bash benchmarks/gpu.sh --smoke checks this script" >&2
        exit 2
    fi
fi
out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/raylm-gpu.XXXXXX")}
mkdir -p "$out/logs" "$out/runs"
data="$out/data-seq$seq_len"
note "${presets[*]} on $device, seq $seq_len, $steps steps per run; output in $out"

start=$SECONDS
if ! "$py" -m dataprep --output "$data" "${prep[@]}" >"$out/logs/dataprep.log" 2>&1; then
    tail -n 40 "$out/logs/dataprep.log" >&2
    echo "error: dataprep failed; its log is $out/logs/dataprep.log" >&2
    exit 1
fi
note "dataset ready in $(took $((SECONDS - start)))"

bench() {  # bench PRESET LAUNCHER [DATASET LABEL OVERRIDE...]: one run, then its line on stdout
    local preset=$1 launcher=$2 dataset=${3:-$data} label=${4:-$2} t0=$SECONDS cmd
    local run="$out/runs/$preset-$label" log="$out/logs/$preset-$label.log"
    local more=("${@:5}")
    case $launcher in
        torchrun) cmd=("$py" -m torch.distributed.run --nproc_per_node=1 --master_port="$(free_port)"
                       -m trainer --no-ray) ;;
        ray-train) cmd=("$py" -m trainer --ray.num_workers=1) ;;
    esac
    rm -rf "$run"  # a finished run directory would only say so
    if ! "${cmd[@]}" --config "configs/$preset.toml" --data.path "$dataset" --run.dir "$run" "${switches[@]}" \
        --train.steps="$steps" --train.log_every="$log_every" --train.global_batch="${global[$preset]}" \
        --train.micro_batch="${micro[$preset]}" --optim.warmup_steps=10 --train.eval_every=0 --train.eval_rows=0 \
        --train.sample_prompt= --checkpoint.every=0 ${more[@]+"${more[@]}"} ${extra[@]+"${extra[@]}"} >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "error: $preset $label failed; its log is $log" >&2
        exit 1
    fi
    rm -rf "$run/checkpoints"  # the end-of-run checkpoint (~12 GB for 1b) is not what is measured
    note "$preset $label: $(took $((SECONDS - t0)))"
    "$py" -m benchmarks.gpu_report "$run" --preset "$preset" --launcher "$label"
}

for preset in "${presets[@]}"; do
    bench "$preset" torchrun
    bench "$preset" ray-train
done

# Chat fine-tuning: conversations cut from the same corpus (a chunk of a file, then the next chunk as the reply),
# tokenized with the dataset's tokenizer and raylm's chat template, packed whole into rows with a loss mask.
chats="$out/chats" chat_data="$out/chat-seq$seq_len"
mkdir -p "$chats"
"$py" - "$chats/chats.jsonl" "${presets[-1]}" <<'PY'
import glob, json, os, random, sys, sysconfig
files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:400 if sys.argv[2] != "tiny" else 40]
rng = random.Random(0)
with open(sys.argv[1], "w") as out:
    for path in files:
        text = open(path, encoding="utf-8", errors="replace").read()
        for start in range(0, max(len(text) - 400, 0), 3000):
            cut = start + rng.randint(100, 1500)
            prompt, reply = text[start:cut], text[cut:cut + rng.randint(50, 1200)]
            if "<|" not in prompt + reply:
                out.write(json.dumps({"prompt": prompt, "response": reply}) + "\n")
PY
if ! "$py" -m dataprep --format chat --input "$chats" --tokenizer "$data" --output "$chat_data" --seq-len "$seq_len" \
    --val-fraction 0 >"$out/logs/dataprep-chat.log" 2>&1; then
    tail -n 40 "$out/logs/dataprep-chat.log" >&2
    echo "error: chat dataprep failed; its log is $out/logs/dataprep-chat.log" >&2
    exit 1
fi
bench "${presets[-1]}" torchrun "$chat_data" "sft-$attention" --model.attention="$attention"
note "done in $(took $((SECONDS - start))); logs and metrics.jsonl in $out"
