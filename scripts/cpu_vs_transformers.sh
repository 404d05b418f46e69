#!/usr/bin/env bash
# CPU comparison of issue 7: the launched server (32 requests x 64 output tokens, all at once) against
# transformers' generate() one request at a time and in static batches of 8, in the same run.
#   bash scripts/cpu_vs_transformers.sh OUT_DIR
set -u
out=${1:-/tmp/cpu-bench}
mkdir -p "$out"
PY=${PY:-.venv/bin/python}
port=18999
$PY -m sfllm launch --port $port --host 127.0.0.1 --run-dir /tmp/sfllm-cpu-bench --device cpu --dtype float32 \
  >"$out/server.log" 2>&1 &
launcher=$!
for i in $(seq 1 300); do curl -sf localhost:$port/health >/dev/null && break; sleep 1; done
$PY -m sfllm bench serve --url http://127.0.0.1:$port --concurrency 32 --requests 32 --input-len 128 \
  --output-len 64 --vocab-size 49152 --output-file "$out/serve.json" >"$out/serve.log" 2>&1
kill -TERM $launcher; wait $launcher
for batch in 1 8; do
  $PY -m sfllm bench offline --model smollm2-135m-instruct --load-format auto --device cpu --dtype float32 \
    --num-requests 32 --input-len 128 --output-len 64 --max-context-length 2048 --baseline transformers \
    --baseline-requests 32 --baseline-batch-size $batch --output-file "$out/offline-b$batch.json" \
    >"$out/offline-b$batch.log" 2>&1
done
grep -h "output tokens/s" "$out/serve.log" | head -2
grep -hE "==|wall" "$out"/offline-b*.log
