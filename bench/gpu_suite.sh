#!/usr/bin/env bash
# Every GPU measurement docs/performance.md ("GPU runs") still lacks, as one script for a
# session lent a GPU: each part writes OUT/<part>.log (a bench's last line is its JSON) with
# its own time limit, and a part that fails or runs out of time does not stop the others.
#
#   bash bench/gpu_suite.sh OUT [PART ...]           # on the GPU machine; default: all parts
#   SMOKE=1 bash bench/gpu_suite.sh OUT [PART ...]   # the same commands, tiny, on the CPU
#
# Parts, in order of what the issue's targets need (seconds: the limit each part gets):
#   env          card, driver, versions                                                  30
#   r56          step_cost, CIFAR-100 ResNet-56 > {44, 32}, bf16 + cl, loss compiled   180
#   r50          step_cost, ResNet-50 > {[3,4,4,3],[3,3,3,3]}, 224 px, the same         240
#   r56_compile  the same as r56, eager against regional compile (compile seconds)      240
#   r50_compile  the same as r50, eager against regional compile                        300
#   r56_graphs   the same as r56_compile with CUDA graphs (model.compile_mode=           200
#                reduce-overhead)
#   r50_graphs   the same as r50_compile with CUDA graphs                               240
#   r56_step     the same as r56_graphs, the whole step compiled as one graph          200
#                (model.compile_scope=step)
#   r50_step     the same as r50_graphs, the whole step compiled                        240
#   profile      step_profile.py: host against device time per step, ResNet-56, eager   150
#                and regionally compiled
#   lightning    overhead.py part (a): Lightning against a raw loop, ResNet-50 b128     200
#   syncs        syncs.py: host syncs per Lightning step; reduce-overhead evaluation      240
#   data         data_on_device.py: on-device batches against preloaded / DataLoader    200
#   train_r50    experiment=imagenet_r50 on synthetic data, 1 epoch (its wall time)    240
#   train_cifar  the CIFAR-10 subset, data.on_device, model.compile, lattice sampling   300
#   train_step   the CIFAR-10 subset, data.on_device, the whole step compiled under      200
#                CUDA graphs (fixed depths)
#   layouts      loss_ab.py: today's loss against each of $AGAINST (default: the padded   150
#                and the Gram layouts, 48a3416 and 04a7f4c), ResNet-56 and ResNet-50 sizes
# A device call runs at most 600 s: split the parts over calls (docs/performance.md, "GPU
# runs"). The CIFAR subset is read from $DATA (default ../shared/data/cifar10-subset; on the
# device machine carry a copy inside the repository). The device machine gets the working
# tree, not the git history: there $AGAINST names files (git show REV:src/ekd_ddnn/losses.py
# > FILE here, carried). The training runs' directories, with their checkpoints, go to $RUNS
# (default: a temporary directory, removed at the end), not under OUT: their console logs,
# results tables included, are OUT/train_*.log. Every part compiles with a fresh inductor
# cache (compile seconds are cold; removed at the end). BUDGET=<seconds> cuts each part's
# limit to what is left of it (a device call's own limit: the summary line is still
# written). OUT/summary.txt gets a header line and one status line per part, appended; the
# exit status is 1 if any part failed, ran out of time or was skipped.
set -u
all_parts=(env r56 r50 r56_compile r50_compile r56_graphs r50_graphs r56_step r50_step profile
  lightning syncs data train_r50 train_cifar train_step layouts)
if [ $# -eq 0 ] || [ -z "$1" ]; then
  echo "usage: bench/gpu_suite.sh OUT [PART ...]; parts: ${all_parts[*]}" >&2
  exit 2
fi
out=$(realpath -m -- "$1")
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${all_parts[@]}")
for part in "${parts[@]}"; do  # every name checked before anything runs
  case " ${all_parts[*]} " in
    *" $part "*) ;;
    *) echo "error: unknown part '$part'; choose from ${all_parts[*]}" >&2; exit 2 ;;
  esac
done
mkdir -p "$out" || exit 2
python=${PYTHON:-python3}
data=$(realpath -m -- "${DATA:-$(dirname "$0")/../../shared/data/cifar10-subset}")
scratch=$(mktemp -d)  # inductor caches, and the runs unless RUNS is given
trap 'rm -rf "$scratch"' EXIT
runs=$(realpath -m -- "${RUNS:-$scratch/runs}")
failed=0
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) ${parts[*]}" >>"$out/summary.txt"
budget=${BUDGET:-0}
cd "$(dirname "$0")/.." || exit 1  # the repository root: bench/ and src/ from here
device=cuda
repeats=(--repeats 10 --warmup 3)
r56=(--experiment cifar100_r56)
r50=(--experiment imagenet_r50)
r50_lightning=(--lightning-arch resnet50 --lightning-subnets '[[3,4,4,3],[3,3,3,3]]'
  --lightning-image-size 224 --lightning-batch 128 --steps 40 --warmup 5)
data_bench=(--steps 50 --repeats 7 --warmup 2)
syncs=(--steps 25 --log-every 10)
r50_train=(data.image_size=224 data.num_classes=1000 data.num_train=6400 data.batch_size=128)
cifar_train=(trainer.max_epochs=3 data.batch_size=128)
read -r -a against <<<"${AGAINST:-48a3416 04a7f4c}"
loss_r56=(--arch cifar_resnet56 --subnets '[[7,7,7],[5,5,5]]' --num-classes 100 --batch-size 128
  --image-size 32)
loss_r50=(--arch resnet50 --subnets '[[3,4,4,3],[3,3,3,3]]' --num-classes 1000 --batch-size 128
  --image-size 224)
loss_calls=(--rounds 3 --calls 100)
scale=1
if [ "${SMOKE:-0}" = 1 ]; then  # the flags checked on the CPU, at a size that runs in seconds
  device=cpu
  repeats=(--repeats 1 --warmup 0)
  r56=(--arch cifar_resnet20 --subnets '[[1,1,1]]' --batch-size 4 --image-size 8)
  r50=(--arch resnet50 --subnets '[[1,1,1,1]]' --batch-size 2 --image-size 32)
  r50_lightning=(--lightning-arch cifar_resnet20 --lightning-subnets '[[1,1,1]]'
    --lightning-image-size 8 --lightning-batch 4 --steps 6 --warmup 1)
  data_bench=(--num-images 256 --batch-size 32 --steps 2 --repeats 1 --warmup 0 --workers 0)
  syncs=(--steps 4 --log-every 3 --batch-size 4 --image-size 8 --subnets '[[1,1,1]]')
  r50_train=(data.image_size=32 data.num_classes=10 data.num_train=32 data.batch_size=16
    'model.subnets=[[1,1,1,1]]' data.num_val=16 data.num_test=16)
  cifar_train=(trainer.max_epochs=1 data.batch_size=64 'model.subnets=[[1,1,1]]'
    +trainer.limit_train_batches=2 +trainer.limit_val_batches=1)
  loss_r56=(--arch cifar_resnet20 --subnets '[[2,2,2],[1,1,1]]' --batch-size 4 --image-size 8)
  loss_r50=(--arch resnet50 --subnets '[[1,1,1,1]]' --batch-size 2 --image-size 32)
  loss_calls=(--rounds 1 --calls 2 --warmup 1)
  scale=4  # inductor on a 2-core CPU compiles slowly
fi
trainer=trainer=gpu
[ "$device" = cpu ] && trainer=trainer=cpu

run() {  # run PART LIMIT COMMAND...: COMMAND's output to OUT/PART.log, a status line here
  local part=$1 limit=$(($2 * scale)) start=$SECONDS
  shift 2
  if [ "$budget" -gt 0 ] && [ $((budget - SECONDS - 10)) -lt "$limit" ]; then
    limit=$((budget - SECONDS - 10))
  fi
  if [ "$limit" -le 0 ]; then
    echo "$part: skipped, no time left of BUDGET=$budget s" | tee -a "$out/summary.txt"
    failed=1
    return
  fi
  echo "\$ $*" >"$out/$part.log"
  # unbuffered: a part cut short by its limit still leaves what it printed
  PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d -p "$scratch") \
    timeout -k 15 "$limit" "$@" >>"$out/$part.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && failed=1
  echo "$part: rc $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

versions='import torch, torchvision, lightning
print(torch.__version__, torchvision.__version__, lightning.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")'

layouts_script() {  # the layouts part's commands, quoted for bash -c: each runs, and the
  local a  # part fails if any of them does
  printf 'rc=0; '
  for a in "${against[@]}"; do
    printf 'echo %q; ' "# --against $a, ResNet-56 size"
    printf '%q ' "$python" bench/loss_ab.py --device "$device" --bf16 --channels-last \
      --against "$a" "${loss_r56[@]}" "${loss_calls[@]}"
    printf '|| rc=1; echo %q; ' "# --against $a, ResNet-50 size"
    printf '%q ' "$python" bench/loss_ab.py --device "$device" --bf16 --channels-last \
      --against "$a" "${loss_r50[@]}" "${loss_calls[@]}"
    printf '|| rc=1; '
  done
  printf 'exit $rc'
}

step_cost=("$python" bench/step_cost.py --device "$device" "${repeats[@]}" --bf16 --channels-last)
train=("$python" -m ekd_ddnn.train "$trainer" paths.log_dir="$runs" logger=csv)
for part in "${parts[@]}"; do
  case $part in
    env) run env 30 bash -c 'nvidia-smi || true; "$0" -c "$1"' "$python" "$versions" ;;
    r56) run r56 180 "${step_cost[@]}" "${r56[@]}" --compile-loss ;;
    r50) run r50 240 "${step_cost[@]}" "${r50[@]}" --compile-loss ;;
    r56_compile) run r56_compile 240 "${step_cost[@]}" "${r56[@]}" --compile ;;
    r50_compile) run r50_compile 300 "${step_cost[@]}" "${r50[@]}" --compile ;;
    r56_graphs) run r56_graphs 200 "${step_cost[@]}" "${r56[@]}" --compile \
      --compile-mode reduce-overhead ;;
    r50_graphs) run r50_graphs 240 "${step_cost[@]}" "${r50[@]}" --compile \
      --compile-mode reduce-overhead ;;
    r56_step) run r56_step 200 "${step_cost[@]}" "${r56[@]}" --compile \
      --compile-mode reduce-overhead --compile-scope step ;;
    r50_step) run r50_step 240 "${step_cost[@]}" "${r50[@]}" --compile \
      --compile-mode reduce-overhead --compile-scope step ;;
    profile) run profile 150 "$python" bench/step_profile.py --device "$device" \
      "${repeats[@]}" --bf16 --channels-last "${r56[@]}" ;;
    lightning) run lightning 200 "$python" bench/overhead.py --device "$device" --parts lightning --bf16 \
      --channels-last "${r50_lightning[@]}" ;;
    syncs) run syncs 240 "$python" bench/syncs.py --device "$device" --reduce-overhead "${syncs[@]}" ;;
    data) run data 200 "$python" bench/data_on_device.py --device "$device" "${data_bench[@]}" ;;
    train_r50) run train_r50 240 "${train[@]}" experiment=imagenet_r50 data=synthetic \
      model.channels_last=true data.on_device=true trainer.max_epochs=1 "${r50_train[@]}" ;;
    train_cifar) run train_cifar 300 "${train[@]}" experiment=cifar10_r20_r14 \
      data.data_dir="$data" data.val_fraction=0.2 data.on_device=true model.compile=true \
      ekd.sampling=lattice test=false "${cifar_train[@]}" ;;
    train_step) run train_step 200 "${train[@]}" experiment=cifar10_r20_r14 \
      data.data_dir="$data" data.val_fraction=0.2 data.on_device=true model.compile=true \
      model.compile_mode=reduce-overhead model.compile_scope=step test=false "${cifar_train[@]}" ;;
    layouts) run layouts 150 bash -c "$(layouts_script)" ;;
  esac
done
exit $failed
