#!/usr/bin/env bash
# Same host, alternating: a base commit's server and this tree's, served at concurrency 1 and 10
# (GPU utilisation, TPOT; other levels in $LEVELS and $REQUESTS), then the standard offline workload
# of each. Logs under $OUT.
#   bash scripts/ab_small_batch.sh BASE_COMMIT [ROUNDS]
set -u
BASE=$1
ROUNDS=${2:-2}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/base
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1
git archive "$BASE" | tar -x -C /tmp/base
HERE=$PWD
LEVELS=${LEVELS:-1,10}
REQUESTS=${REQUESTS:-24,200}

serve() {  # serve TREE TAG
  (cd "$1" && PYTHONPATH=/tmp/site:$1 exec python3 -m sfllm launch --model qwen3-0.6b --load-format dummy \
    --port 8081 --host 127.0.0.1 --cuda-graph-max-bs 256 --max-context-length 4096 --frontend-processes 4 \
    >"$OUT/ab-server-$2.log" 2>&1) &
  for i in $(seq 1 120); do curl -sf localhost:8081/health >/dev/null && break; sleep 1; done
  PYTHONPATH=/tmp/site:$HERE timeout 120 python3 -m sfllm bench serve --url http://127.0.0.1:8081 \
    --concurrency "$LEVELS" --requests "$REQUESTS" --input-len 512 --output-len 256 --vocab-size 151936 --warmup 4 \
    --output-file "$OUT/ab-$2.json" >"$OUT/ab-$2.log" 2>&1
  summary=$(grep -E '^(GPU utilisation|TPOT p50|TTFT p50|output tokens/s)' "$OUT/ab-$2.log" | tr -s ' ')
  echo "$2: $(echo "$summary" | tr '\n' ';')"
  pkill -TERM -f "sfllm launch"
  for i in $(seq 1 60); do pgrep -f "sfllm launch" >/dev/null || break; sleep 1; done
}

for round in $(seq 1 "$ROUNDS"); do
  serve /tmp/base "base$round"
  serve "$HERE" "new$round"
done
for tree in /tmp/base "$HERE"; do
  (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 150 python3 -m sfllm bench offline --model qwen3-0.6b \
    >"$OUT/ab-offline-$(basename "$tree").log" 2>&1)
  echo "offline $tree: $(grep -E '^wall|roofline' "$OUT/ab-offline-$(basename "$tree").log" | tr '\n' ' ')"
done
