#!/usr/bin/env bash
# `cpt fit` under torchrun, on one node or many. Run the same command on every node; only NODE_RANK
# differs. The world comes from environment variables, so nothing changes between 1 and N nodes:
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes (GPUs) per node (default: the GPUs CUDA_VISIBLE_DEVICES names, else those
#                   nvidia-smi lists: it lists every GPU of the node, visible to this job or not)
#   NODE_RANK       this node's index, 0 … NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0 (default 127.0.0.1), MASTER_PORT (default 29500)
#   PYTHON          interpreter with cpt-lightning installed (default: python)
#   SHUTDOWN_TIMEOUT seconds a SIGTERM'd worker has to finish its step and save last.ckpt before torchrun
#                   kills it (default 600; torchrun's own 30 s cuts a sharded save of a large model short;
#                   torch 2.12 or later)
#
#   scripts/torchrun/train.sh configs/en_detour.yaml                        # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=gpu-a scripts/torchrun/train.sh configs/en_detour.yaml   # on gpu-a
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=gpu-a scripts/torchrun/train.sh configs/en_detour.yaml   # on gpu-b
#
# Extra arguments go to `cpt fit` (e.g. --ckpt_path runs/en_detour/checkpoints/step000000636.ckpt, or last).
# GlobalBatch re-derives gradient accumulation from NNODES × NPROC_PER_NODE: still 384 sequences.
set -euo pipefail

config=${1:?usage: $0 CONFIG [cpt fit arguments...]}
shift
nnodes=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" && -v CUDA_VISIBLE_DEVICES ]]; then  # set but empty: no GPU for this job
  IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
  NPROC_PER_NODE=0
  for device in ${visible[@]+"${visible[@]}"}; do  # CUDA ignores the devices from the first negative one (-1: none)
    [[ $device == -* ]] && break
    NPROC_PER_NODE=$((NPROC_PER_NODE + 1))
  done
fi
# The GPUs, not the MIG instances listed under a GPU (indented); no nvidia-smi: 0, said below
nproc=${NPROC_PER_NODE:-$( (nvidia-smi --list-gpus 2>/dev/null || true) | grep -c '^GPU ' || true)}
if [[ $nproc -lt 1 ]]; then
  echo "error: no GPU found; set NPROC_PER_NODE" >&2
  exit 2
fi

# On SIGTERM torchrun forwards the signal to its workers (each saves last.ckpt and exits 143), waits up to
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT for them (read by torch 2.12 and later; older ones wait 30 s, and refuse the
# --shutdown-timeout flag), then exits 1 itself (not 143: each worker's log says what it saved).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-600}"
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes "$nnodes" --nproc-per-node "$nproc" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m cpt_lightning.cli fit --config "$config" --trainer.num_nodes "$nnodes" --trainer.devices "$nproc" "$@"
