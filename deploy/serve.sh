#!/usr/bin/env bash
# One launcher for every deployment in deploy/ (compose and Kubernetes set only environment
# variables): `vllm serve` with CAPS, on one GPU or with vLLM's data- and expert-parallel
# serving across GPUs and nodes, as vLLM documents it.
#
#   ROLE        single (default) | head | worker (vLLM's multi-node DP: the head serves the API,
#               workers run --headless engines) | ray-head | ray-worker (Ray cluster; the head
#               serves with --data-parallel-backend ray)
#   MODEL       model name or path (default Qwen/Qwen1.5-MoE-A2.7B-Chat)
#   CAPS_CONFIG the caps object (default {"strategy":"step_cost"})
#   PORT        API port (8000)
#   DP          data-parallel engines in all (1); each engine has its own CAPS scheduler
#   DP_LOCAL    engines on this node (DP)
#   EP          1: --enable-expert-parallel (default 1 when DP > 1): experts spread over DP x TP ranks
#   TP          tensor-parallel size per engine (1)
#   EP_PLACEMENT linear | round_robin (vLLM's expert placement; step_cost reads it)
#   HEAD_IP     the head node's address (head, worker, ray-worker)
#   DP_RPC_PORT 13345
#   START_RANK  first DP rank on a worker; default LWS_WORKER_INDEX x DP_LOCAL (LeaderWorkerSet)
#   DRY_RUN=1   print the command instead of running it
#   EXTRA_ARGS  more vllm serve arguments (split on spaces)
set -euo pipefail

ROLE=${ROLE:-single}
MODEL=${MODEL:-Qwen/Qwen1.5-MoE-A2.7B-Chat}
CAPS_CONFIG=${CAPS_CONFIG:-'{"caps":{"strategy":"step_cost"}}'}
PORT=${PORT:-8000}
DP=${DP:-1}
DP_LOCAL=${DP_LOCAL:-$DP}
TP=${TP:-1}
EP=${EP:-$([ "$DP" -gt 1 ] && echo 1 || echo 0)}
EP_PLACEMENT=${EP_PLACEMENT:-linear}
DP_RPC_PORT=${DP_RPC_PORT:-13345}

need() { [ -n "${!1:-}" ] || { echo "deploy/serve.sh: ROLE=$ROLE needs $1 ($2)" >&2; exit 2; }; }
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else exec "$@"; fi; }

args=(vllm serve "$MODEL" --scheduler-cls caps_vllm.CapsScheduler --additional-config "$CAPS_CONFIG"
      --port "$PORT" --tensor-parallel-size "$TP")
if [ "$DP" -gt 1 ]; then
  args+=(--data-parallel-size "$DP" --data-parallel-size-local "$DP_LOCAL")
fi
if [ "$EP" = 1 ]; then
  args+=(--enable-expert-parallel --expert-placement-strategy "$EP_PLACEMENT")
fi
# shellcheck disable=SC2206
extra=(${EXTRA_ARGS:-})

case "$ROLE" in
  single)
    run "${args[@]}" "${extra[@]}" ;;
  head)
    need HEAD_IP "this node's address, reachable from the workers"
    run "${args[@]}" --data-parallel-address "$HEAD_IP" --data-parallel-rpc-port "$DP_RPC_PORT" "${extra[@]}" ;;
  worker)
    need HEAD_IP "the head node's address"
    if [ -z "${START_RANK:-}" ]; then
      need LWS_WORKER_INDEX "or START_RANK: the first data-parallel rank on this node"
      START_RANK=$((LWS_WORKER_INDEX * DP_LOCAL))
    fi
    run "${args[@]}" --headless --data-parallel-start-rank "$START_RANK" --data-parallel-address "$HEAD_IP" \
        --data-parallel-rpc-port "$DP_RPC_PORT" "${extra[@]}" ;;
  ray-head)
    if [ "${DRY_RUN:-0}" != 1 ]; then ray start --head --port=6379 --dashboard-host=0.0.0.0; fi
    run "${args[@]}" --data-parallel-backend ray "${extra[@]}" ;;
  ray-worker)
    need HEAD_IP "the Ray head's address"
    run ray start --address="$HEAD_IP:6379" --block ;;
  *)
    echo "deploy/serve.sh: ROLE=$ROLE; valid: single, head, worker, ray-head, ray-worker" >&2; exit 2 ;;
esac
