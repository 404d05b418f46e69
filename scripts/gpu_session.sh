#!/usr/bin/env bash
# One call on a lent GPU host: install the carried wheels, then run the named stages, logs under $OUT.
# Every stage runs the engine at its defaults (no tuning flags) unless the stage says otherwise.
#   bash scripts/gpu_session.sh tests offline latency serve large
# Stages: tests (GPU test suite), batch1 (batch 1 served and offline, $BASE against this tree on one host,
# alternating $ROUNDS times, 2 by default; then the gate/up kernels timed unless KERNEL_SWEEP=0), ab (a base
# commit $BASE and this tree on one host, each at its product's defaults: the standard offline workload and
# batch 1), offline (standard workload + transformers baseline
# + trace), latency (batch 1..16 decode, graphs vs eager, overlap on/off), serve (launched server, bench serve
# at concurrency 1, 10, 50 and a burst of 600 at 200, with GPU utilisation; extra server flags in
# $SERVE_FLAGS, file names tagged with $SERVE_TAG),
# text (the serve stage's concurrency 50 and the burst of 600 at 200 with text prompts of 512 characters, 512 tokens
# of the dummy tokenizer, on /v1/completions and /v1/chat/completions, as a client without token ids sends them),
# priority (a high-priority probe's TTFT alone and under 600 background streams of 1024-token prompts and
# 512 outputs; then every frontend SIGKILLed and the time until /health answers again),
# (with $SERVE_FLAGS="--log-level debug" the engine logs where each probe's first token waited),
# serve_ab ($BASE's and this tree's servers alternately: bench serve at $LEVELS and the priority probes),
# priority_clients (one server of this tree; $BASE's and this tree's `bench priority` clients alternately),
# ragged (decode attention over the standard workload's batches, $BASE's kernel beside this tree's),
# halves (a decode step's layers in two halves on two streams against the whole batch on one, Qwen3-0.6B and -8B),
# pdl (a decode step's layers with the kernels launched early and after, Qwen3-0.6B and -8B; then at 12 and 16
# sequences with the skinny GEMMs against cuBLAS),
# extend (extend attention's tiles over the standard workload's prefill steps, listed and most keys first),
# burst (prefill of 200 prompts at once, profiled), policy (fcfs vs length-bucket on the standard workload),
# large (Qwen3-4B and -8B presets), smallbatch (batch 1 and 10: offline and served, each with a worker trace
# whose GPU idle time is charged to what the host was doing; the served part runs with $SERVE_FLAGS),
# redraw (the eager sampler's rows: $BASE and this tree under a JSON schema, this tree with top-p 0.9; tags t1,
# topp, qwen3 (Qwen3's sampling), schema, none, and each with a b1 prefix for batch 1),
# structured (64 requests at once, unconstrained, then each under a JSON schema, then under it as a structural tag's
# call in free text, back to back: the throughput ratios and the grammar masks' time per step; offline, then
# served at concurrency 64),
# tp (tensor parallelism on a host of two GPUs: its GPU tests, Qwen3-8B at TP 1 and 2 served at concurrency 1
# and offline, a TP 2 decode profile, Qwen3-32B at TP 2 against its roofline),
# spec (speculative decoding, issue 16: its GPU tests; batch 1 with drafts accepted (dummy weights, greedy: random
# models loop), and the overhead when no draft is accepted (--spec-force-reject) at batch 1 and 64, each against
# the same run without speculation; batches 8 and 32 with drafts, and 64 with the batch limit lifted).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# installed once per host: two sessions may run side by side, one per GPU (CUDA_VISIBLE_DEVICES)
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  .whl/*.whl >"$OUT/pip.log" 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
# the host's .git may be older than the carried files: the count of files changed since says so
{ git log -1 --format=%H && echo "files changed since that commit: $(git status --short | wc -l)"; } \
  >>"$OUT/gpu.txt" 2>/dev/null || true
BENCH="python3 -m sfllm bench offline"
# $BASE (a commit, or a folder holding one's files, carried where the host has no .git) into /tmp/base
unpack_base() {
  rm -rf /tmp/base && mkdir -p /tmp/base
  if [ -d "$BASE" ]; then cp -r "$BASE"/. /tmp/base; else git archive "$BASE" | tar -x -C /tmp/base; fi
}
# stops the server this stage launched (not another session's on the other GPU) and waits for its exit
stop_server() { kill -TERM "$server"; for i in $(seq 1 60); do kill -0 "$server" 2>/dev/null || break; sleep 1; done; }
SERVE_FLAGS=${SERVE_FLAGS:-}
SERVE_TAG=${SERVE_TAG:-}  # names the serve stage's files, to keep two runs apart
PORT=${PORT:-8081}  # one per session where two share a host

for stage in "$@"; do
  case $stage in
  tests)
    # the GPU suite, and the kernel tests that CI interprets on its CPU, compiled here
    timeout 330 python3 -m pytest tests/gpu tests/test_kernels.py tests/test_fused_kernels.py tests/test_step_graphs.py \
      tests/test_held_steps.py -q \
      -p no:cacheprovider -o addopts="" >"$OUT/tests.log" 2>&1
    echo "tests: exit $?"; tail -3 "$OUT/tests.log" ;;
  ab)
    # babc62b's own `bench offline` defaults were tuned (graphs to 256, context 4096): its product's
    # defaults (LLM(), sfllm launch) were graphs to 32 and the model's whole context, given here unless
    # $BASE_DEFAULTS says otherwise (BASE_DEFAULTS= for a base whose bench runs the product's defaults).
    BASE_DEFAULTS=${BASE_DEFAULTS---cuda-graph-max-bs 32 --max-context-length 40960}
    # $BASE: a commit, or a folder holding one's files (carried where the host has no .git)
    unpack_base
    for tree in /tmp/base "$PWD"; do
      name=new; flags=""; [ "$tree" = /tmp/base ] && name=base && flags=$BASE_DEFAULTS
      for run in "standard" "batch1 --num-requests 1 --input-len 512 --output-len 256"; do
        read -r tag args <<<"$run"
        (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 150 python3 -m sfllm bench offline --model qwen3-0.6b \
          $flags $args --output-file "$OUT/ab-$name-$tag.json" >"$OUT/ab-$name-$tag.log" 2>&1)
        echo "$name $tag: exit $? $(grep -E '^wall|roofline' "$OUT/ab-$name-$tag.log" | tr '\n' ' ')"
      done
    done ;;
  batch1)
    # Batch 1 A/B on one host, alternating $ROUNDS times: $BASE's and this tree's server at concurrency 1
    # (TPOT p50) and their offline batch-1 wall time, at each tree's defaults; then this tree's gate/up
    # kernels timed (unless KERNEL_SWEEP=0)
    unpack_base
    for round in $(seq 1 "${ROUNDS:-2}"); do
      for tree in /tmp/base "$PWD"; do
        name=new; [ "$tree" = /tmp/base ] && name=base
        (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 90 python3 -m sfllm bench offline --model qwen3-0.6b \
          --num-requests 1 --input-len 512 --output-len 256 >"$OUT/batch1-$name-$round-offline.log" 2>&1)
        (cd "$tree" && PYTHONPATH=/tmp/site:$tree exec python3 -m sfllm launch --model qwen3-0.6b --load-format dummy \
          --port $PORT --host 127.0.0.1 >"$OUT/batch1-$name-$round-server.log" 2>&1) &
        server=$!; started=$(date +%s)
        for i in $(seq 1 120); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
        echo "$name round $round: server ready after $(( $(date +%s) - started )) s"
        timeout 90 python3 -m sfllm bench serve --url http://127.0.0.1:$PORT --concurrency 1 --requests 32 \
          --input-len 512 --output-len 256 --vocab-size 151936 --warmup 4 --gpu-monitor off \
          >"$OUT/batch1-$name-$round-serve.log" 2>&1
        echo "$name round $round: offline $(grep -E '^wall' "$OUT/batch1-$name-$round-offline.log"); served \
$(grep -E 'TPOT p50|TTFT p50' "$OUT/batch1-$name-$round-serve.log" | tr -s ' ' | tr '\n' ';')"
        stop_server
      done
    done
    [ "${KERNEL_SWEEP:-1}" = 1 ] || continue
    timeout 120 python3 tests/gpu/bench_kernels.py gate_up >"$OUT/gate-up-sweep.log" 2>&1
    echo "gate_up sweep: exit $?"; cat "$OUT/gate-up-sweep.log" ;;
  ragged)
    # decode attention over the standard workload's batches of unequal sequences ($BASE's kernel beside, if set)
    base_kernel=""
    if [ -n "${BASE:-}" ]; then unpack_base; base_kernel=/tmp/base/kernels/decode_attention.py; fi
    BASE_DECODE_KERNEL=$base_kernel timeout 180 python3 tests/gpu/bench_kernels.py ragged >"$OUT/ragged.log" 2>&1
    echo "ragged: exit $?"; cat "$OUT/ragged.log" ;;
  halves)
    timeout 300 python3 tests/gpu/bench_kernels.py halves >"$OUT/halves.log" 2>&1
    echo "halves: exit $?"; cat "$OUT/halves.log" ;;
  pdl)
    timeout 300 python3 tests/gpu/bench_kernels.py pdl >"$OUT/pdl.log" 2>&1
    echo "pdl: exit $?"; cat "$OUT/pdl.log" ;;
  extend)
    # extend attention's tiles over the standard workload's first prefill steps, and longest-first tile order
    timeout 240 python3 tests/gpu/bench_kernels.py extend >"$OUT/extend.log" 2>&1
    echo "extend: exit $?"; cat "$OUT/extend.log" ;;
  offline)
    timeout 240 $BENCH --model qwen3-0.6b --output-file "$OUT/offline-0.6b.json" --profile-steps 30 \
      --profile-skip-steps 300 --profile-dir /tmp/prof --baseline transformers --baseline-requests 64 \
      >"$OUT/offline.log" 2>&1
    echo "offline: exit $?"; grep -E "==|wall|roofline|idle|x$" "$OUT/offline.log" ;;
  latency)
    for n in 1 4 16; do
      for graphs in on off; do
        flag=""; [ $graphs = off ] && flag=--disable-cuda-graph
        timeout 90 $BENCH --model qwen3-0.6b --num-requests $n --input-len 128 --output-len 256 \
          $flag >"$OUT/latency-$n-$graphs.log" 2>&1
        echo "batch $n graphs $graphs: $(grep -E 'wall' "$OUT/latency-$n-$graphs.log")"
      done
    done
    for overlap in on off; do
      flag=""; [ $overlap = off ] && flag=--disable-overlap
      timeout 120 $BENCH --model qwen3-0.6b --num-requests 64 --input-len 512 --output-len 512 \
        --profile-steps 30 --profile-skip-steps 200 --profile-dir /tmp/prof-$overlap $flag \
        >"$OUT/overlap-$overlap.log" 2>&1
      echo "batch 64 overlap $overlap: $(grep -E 'wall|idle' "$OUT/overlap-$overlap.log" | tr '\n' ' ')"
    done ;;
  serve)
    # Requests per level grow with concurrency so that every level runs at its concurrency for a while;
    # the last level is the burst of 600 requests at concurrency 200.
    python3 -m sfllm launch --model qwen3-0.6b --load-format dummy --port $PORT --host 127.0.0.1 \
      $SERVE_FLAGS >"$OUT/server$SERVE_TAG.log" 2>&1 &
    server=$!
    for i in $(seq 1 300); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
    python3 scripts/process_cpu_sampler.py >"$OUT/serve$SERVE_TAG-cpu.log" 2>&1 &
    sampler=$!
    timeout 300 python3 -m sfllm bench serve --url http://127.0.0.1:$PORT --concurrency ${LEVELS:-1,10,50,200} \
      --requests ${REQUESTS:-32,100,200,600} --input-len 512 --output-len 256 --vocab-size 151936 --warmup 8 \
      --output-file "$OUT/serve$SERVE_TAG.json" --plot "$OUT/serve$SERVE_TAG.png" >"$OUT/serve$SERVE_TAG.log" 2>&1
    echo "serve: exit $?"; kill $sampler; grep -vE "^c=|warm-up" "$OUT/serve$SERVE_TAG.log" | head -34
    python3 - "$OUT/serve$SERVE_TAG.json" "$OUT/serve$SERVE_TAG-cpu.log" <<'PY'
import json, sys
levels = json.load(open(sys.argv[1]))["levels"]
samples = [line.split() for line in open(sys.argv[2])]
for level in levels:
    start, end = level["started_unix"], level["started_unix"] + level["summary"]["duration_s"]
    roles = {}
    for t, *shares in samples:
        if start <= float(t) <= end:
            for share in shares:
                role, pct = share.split(":")
                roles.setdefault(role, []).append(float(pct.rstrip("%")))
    print(f"c={level['concurrency']}: CPU % of one core, mean over the level:",
          " ".join(f"{r} {sum(v) / len(v):.0f}" for r, v in sorted(roles.items())))
PY
    stop_server ;;
  text)
    python3 - "$OUT/prompts512.txt" <<'PY'
import random, sys
rng = random.Random(7)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
with open(sys.argv[1], "w") as f:
    for i in range(1500):
        line = f"Request {i}:"
        while len(line) < 512:
            line += " " + rng.choice(words)
        f.write(line[:512] + "\n")
PY
    python3 -m sfllm launch --model qwen3-0.6b --load-format dummy --port $PORT --host 127.0.0.1 $SERVE_FLAGS \
      >"$OUT/server-text.log" 2>&1 &
    server=$!
    for i in $(seq 1 300); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
    for endpoint in completions chat; do
      timeout 150 python3 -m sfllm bench serve --url http://127.0.0.1:$PORT --endpoint $endpoint --concurrency 50,200 \
        --requests 200,600 --prompt-file "$OUT/prompts512.txt" --output-len 256 --ignore-eos --warmup 8 \
        --gpu-monitor off >"$OUT/text-$endpoint.log" 2>&1
      echo "text prompts, $endpoint: exit $?"; grep -vE "^c=|warm-up" "$OUT/text-$endpoint.log" | head -24
    done
    stop_server ;;
  serve_ab)
    # $BASE's and this tree's servers alternately ($ROUNDS, 1 by default), each at its defaults plus $SERVE_FLAGS:
    # bench serve at $LEVELS (1,50,200) and the priority probes, with this tree's clients
    unpack_base
    for round in $(seq 1 "${ROUNDS:-1}"); do
      for tree in /tmp/base "$PWD"; do
        name=new; [ "$tree" = /tmp/base ] && name=base
        tag=$name-$round
        (cd "$tree" && PYTHONPATH=/tmp/site:$tree exec python3 -m sfllm launch --model qwen3-0.6b --load-format dummy \
          --port $PORT --host 127.0.0.1 $SERVE_FLAGS >"$OUT/serve-ab-$tag-server.log" 2>&1) &
        server=$!
        for i in $(seq 1 150); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
        timeout 150 python3 -m sfllm bench serve --url http://127.0.0.1:$PORT --concurrency ${LEVELS:-1,50,200} \
          --requests ${REQUESTS:-32,200,600} --input-len 512 --output-len 256 --vocab-size 151936 --warmup 8 \
          --gpu-monitor off >"$OUT/serve-ab-$tag-serve.log" 2>&1
        echo "$name round $round serve: $(grep -E '^ +c=|TPOT p50|TTFT p50|TTFT p99' \
          "$OUT/serve-ab-$tag-serve.log" | tr -s ' ' | tr '\n' ';')"
        # another seed than bench serve's: its prompts are in the prefix cache now
        timeout 150 python3 -m sfllm bench priority --url http://127.0.0.1:$PORT --probes 10 --warmup 2 \
          --probe-input-len 512 --probe-output-len 8 --background-requests 600 --input-len 1024 --output-len 512 \
          --vocab-size 151936 --seed 1 >"$OUT/serve-ab-$tag-priority.log" 2>&1
        echo "$name round $round priority: $(grep -E 'TTFT p50' "$OUT/serve-ab-$tag-priority.log" | tr -s ' ' \
          | tr '\n' ';')"
        case "$SERVE_FLAGS" in *debug*) python3 scripts/priority_waits.py "$OUT/serve-ab-$tag-server.log" ;; esac
        stop_server
      done
    done ;;
  priority_clients)
    # the same server measured by two priority clients in turn ($ROUNDS, 2 by default): $BASE's and this tree's
    unpack_base
    python3 -m sfllm launch --model qwen3-0.6b --load-format dummy --port $PORT --host 127.0.0.1 $SERVE_FLAGS \
      >"$OUT/server-priority-clients.log" 2>&1 &
    server=$!
    for i in $(seq 1 120); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
    for round in $(seq 1 "${ROUNDS:-2}"); do
      # each run its own seed (prompts already in the prefix cache would be cheaper), the first client alternating
      trees="/tmp/base $PWD"; [ $((round % 2)) = 0 ] && trees="$PWD /tmp/base"
      for tree in $trees; do
        name=new; [ "$tree" = /tmp/base ] && name=base
        seed=$((10 + 2 * round)); [ $name = new ] && seed=$((seed + 100))
        (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 150 python3 -m sfllm bench priority --url http://127.0.0.1:$PORT \
          --probes 10 --warmup 2 --probe-input-len 512 --probe-output-len 8 --background-requests 600 --input-len 1024 \
          --output-len 512 --vocab-size 151936 --seed $seed >"$OUT/priority-$name-client-$round.log" 2>&1)
        echo "$name client, round $round: $(grep -E 'TTFT p50' "$OUT/priority-$name-client-$round.log" | tr -s ' ' \
          | tr '\n' ';')"
      done
    done
    case "$SERVE_FLAGS" in *debug*) python3 scripts/priority_waits.py "$OUT/server-priority-clients.log" ;; esac
    stop_server ;;
  priority)
    python3 -m sfllm launch --model qwen3-0.6b --load-format dummy --port $PORT --host 127.0.0.1 $SERVE_FLAGS \
      >"$OUT/server-priority.log" 2>&1 &
    server=$!
    for i in $(seq 1 120); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
    timeout 150 python3 -m sfllm bench priority --url http://127.0.0.1:$PORT --probes 10 --warmup 2 \
      --probe-input-len 512 --probe-output-len 8 --background-requests 600 --input-len 1024 --output-len 512 \
      --vocab-size 151936 --output-file "$OUT/priority.json" >"$OUT/priority.log" 2>&1
    echo "priority: exit $?"; grep -vE "it/s\]|req/s\]" "$OUT/priority.log" | tail -12
    case "$SERVE_FLAGS" in *debug*) python3 scripts/priority_waits.py "$OUT/server-priority.log" ;; esac
    pkill -KILL -P "$server" -f "sfllm frontend"; started=$(date +%s%N)
    until curl -sf localhost:$PORT/health >/dev/null; do sleep 0.05; done
    echo "every frontend SIGKILLed: /health 200 again after $(( ($(date +%s%N) - started) / 1000000 )) ms"
    stop_server ;;
  burst)
    # The first-token latency of a burst: prefill of 200 x 512 tokens, then one token each; the profiled
    # run's wall time includes writing the trace.
    for tokens in 8192 16384; do
      timeout 120 $BENCH --model qwen3-0.6b --num-requests 200 --input-len 512 --output-len 2 \
        --max-running-tokens $tokens --output-file "$OUT/burst-$tokens.json" >"$OUT/burst-$tokens.log" 2>&1
      echo "burst, step budget $tokens: exit $? $(grep -E '^wall' "$OUT/burst-$tokens.log")"
    done
    timeout 120 $BENCH --model qwen3-0.6b --num-requests 200 --input-len 512 --output-len 2 --profile-steps 6 \
      --profile-skip-steps 0 --profile-dir /tmp/prof-burst >"$OUT/burst-profile.log" 2>&1
    echo "burst, profiled: exit $?"; grep -A10 "^profiled" "$OUT/burst-profile.log" ;;
  policy)
    for policy in fcfs length-bucket; do
      timeout 120 $BENCH --model qwen3-0.6b --schedule-policy $policy --output-file "$OUT/policy-$policy.json" \
        >"$OUT/policy-$policy.log" 2>&1
      echo "$policy: exit $? $(grep -E 'wall|roofline' "$OUT/policy-$policy.log" | tr '\n' ' ')"
    done ;;
  smallbatch)
    for spec in "1 0" "1 1" "10 1"; do
      read -r n temperature <<<"$spec"
      timeout 90 $BENCH --model qwen3-0.6b --num-requests $n --input-len 512 --output-len 256 \
        --temperature $temperature --profile-steps 100 --profile-skip-steps 50 --profile-dir /tmp/prof-sb \
        >"$OUT/smallbatch-$n-t$temperature$SERVE_TAG.log" 2>&1
      echo "offline batch $n temperature $temperature: exit $?"
      grep -E "^wall|^profiled" "$OUT/smallbatch-$n-t$temperature$SERVE_TAG.log"
      sed -n '/^GPU busy/,$p' "$OUT/smallbatch-$n-t$temperature$SERVE_TAG.log"
    done
    rm -rf /tmp/prof-serve
    python3 -m sfllm launch --model qwen3-0.6b --load-format dummy --port $PORT --host 127.0.0.1 \
      --profile-dir /tmp/prof-serve $SERVE_FLAGS \
      >"$OUT/server-smallbatch$SERVE_TAG.log" 2>&1 &
    server=$!
    for i in $(seq 1 120); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
    # first without the profiler (GPU utilisation as the sweep measures it), then each level traced for 0.5 s
    timeout 120 python3 -m sfllm bench serve --url http://127.0.0.1:$PORT --concurrency 1,10 --requests 24,200 \
      --input-len 512 --output-len 256 --vocab-size 151936 --warmup 4 \
      --output-file "$OUT/serve-smallbatch$SERVE_TAG.json" >"$OUT/serve-smallbatch$SERVE_TAG.log" 2>&1
    echo "served, unprofiled: exit $?"; grep -vE "^c=|warm-up" "$OUT/serve-smallbatch$SERVE_TAG.log" | head -30
    for spec in "1 8" "10 60"; do
      read -r c n <<<"$spec"
      timeout 60 python3 -m sfllm bench serve --url http://127.0.0.1:$PORT --concurrency $c --requests $n \
        --input-len 512 --output-len 256 --vocab-size 151936 --warmup 0 --gpu-monitor off >/dev/null 2>&1 &
      bench=$!
      sleep 2.5; curl -s -X POST localhost:$PORT/start_profile >/dev/null; sleep 0.5
      curl -s -X POST localhost:$PORT/stop_profile >/dev/null; wait $bench
      sleep 2; trace=$(ls -t /tmp/prof-serve/*.json | head -1)
      echo "served, concurrency $c, worker trace:"; python3 -m sfllm.bench.profiler_trace "$trace" | tail -n +2
    done
    grep -E "engine loop|worker loop" "$OUT/server-smallbatch$SERVE_TAG.log"
    stop_server ;;
  structured)
    for so in none json_schema structural_tag; do
      timeout 300 $BENCH --model qwen3-0.6b --load-format dummy --num-requests 64 --input-len 512 --output-len 512 \
        --structured-output $so --output-file "$OUT/structured-$so.json" >"$OUT/structured-$so.log" 2>&1
      echo "structured $so: exit $?"; grep -E "wall time|grammar masks|host loop" "$OUT/structured-$so.log"
    done
    python3 -m sfllm launch --model qwen3-0.6b --load-format dummy --port $PORT --host 127.0.0.1 \
      >"$OUT/server-structured.log" 2>&1 &
    server=$!
    for i in $(seq 1 300); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 1; done
    for so in none json_schema structural_tag; do
      flag=""; [ $so = json_schema ] && flag=--json-schema; [ $so = structural_tag ] && flag=--structural-tag
      timeout 120 python3 -m sfllm bench serve --url http://127.0.0.1:$PORT --concurrency 64 --requests 128 \
        --input-len 512 --output-len 512 --vocab-size 151936 --warmup 8 --gpu-monitor off $flag \
        --output-file "$OUT/structured-served-$so.json" >"$OUT/structured-served-$so.log" 2>&1
      echo "served $so: exit $? $(grep -E 'output tokens/s|TPOT p50' "$OUT/structured-served-$so.log" | tr -s ' ' | tr '\n' ';')"
    done
    grep -E "engine loop|worker loop" "$OUT/server-structured.log" | tail -2
    stop_server ;;
  redraw)
    # Rows the eager sampler redraws from a graph step's logits (grammar, top-k/p, seeds, logit bias), A/B on one
    # host: $BASE's and this tree's 64 x 512 tokens, greedy then under a JSON schema; this tree's at temperature 1
    # and then with top-p 0.9 as well ($REDRAW_RUNS: other "tree run" pairs, comma-separated)
    unpack_base
    IFS=, read -r -a runs <<<"${REDRAW_RUNS:-base none,base schema,new t1,new topp}"
    for spec in "${runs[@]}"; do
      read -r name tag <<<"$spec"
      tree=$PWD; [ $name = base ] && tree=/tmp/base
      shape="--num-requests 64 --input-len 512 --output-len 512"
      case $tag in b1*) shape="--num-requests 1 --input-len 512 --output-len 256" ;; esac  # batch 1
      case ${tag#b1} in
        none) args="" ;; schema) args="--structured-output json_schema" ;;
        t1) args="--temperature 1" ;; topp) args="--temperature 1 --top-p 0.9" ;;
        qwen3) args="--temperature 0.6 --top-k 20 --top-p 0.95" ;;  # Qwen3's generation_config.json
      esac
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 120 python3 -m sfllm bench offline --model qwen3-0.6b \
        $shape $args >"$OUT/redraw-$name-$tag.log" 2>&1)
      echo "$name $tag: exit $? $(grep -E '^wall|grammar masks' "$OUT/redraw-$name-$tag.log" | tr '\n' ' ')"
    done ;;
  tp)
    # one pytest a fault, so that a hang in the second leaves the first's report in the log
    for fault in "signal" "finished"; do  # the parameters: a rank killed by a signal, a hung one
      timeout 200 python3 -m pytest tests/gpu/test_tensor_parallel_gpu.py -k "$fault" -q -rs \
        -p no:cacheprovider -o addopts="" >>"$OUT/tp-tests.log" 2>&1
    done
    echo "tp tests: exit $?"; tail -3 "$OUT/tp-tests.log"
    for tp in 1 2; do
      # batch-1 TPOT, served (the serve stage at concurrency 1 only)
      LEVELS=1 REQUESTS=64 SERVE_TAG=-8b-tp$tp SERVE_FLAGS="--model qwen3-8b --tensor-parallel-size $tp" \
        GPU_SESSION_NESTED=1 bash "$0" serve
      timeout 300 $BENCH --model qwen3-8b --tensor-parallel-size $tp --output-file "$OUT/tp$tp-8b-standard.json" \
        >"$OUT/tp$tp-8b-standard.log" 2>&1
      echo "qwen3-8b tp $tp standard workload: exit $? $(grep -E '^wall|roofline' "$OUT/tp$tp-8b-standard.log" | tr '\n' ' ')"
    done
    # the all-reduce's share of a batch-1 decode step: its NCCL kernels in the kernel list
    timeout 200 $BENCH --model qwen3-8b --tensor-parallel-size 2 --num-requests 1 --input-len 512 --output-len 256 \
      --profile-steps 50 --profile-skip-steps 100 --profile-dir /tmp/prof-tp >"$OUT/tp2-8b-profile.log" 2>&1
    echo "qwen3-8b tp 2 batch-1 decode profile: exit $?"; grep -A14 "^profiled" "$OUT/tp2-8b-profile.log"
    timeout 600 $BENCH --model qwen3-32b --tensor-parallel-size 2 --output-file "$OUT/tp2-32b-standard.json" \
      >"$OUT/tp2-32b-standard.log" 2>&1
    echo "qwen3-32b tp 2 standard workload: exit $? $(grep -E '^wall|roofline' "$OUT/tp2-32b-standard.log" | tr '\n' ' ')" ;;
  spec)
    if [ -z "${SKIP_SPEC_TESTS:-}" ]; then  # set where the tests stage ran them in the same call
      timeout 300 python3 -m pytest tests/gpu/test_speculative_gpu.py tests/test_step_graphs.py -q -p no:cacheprovider \
        -o addopts="" >"$OUT/spec-tests.log" 2>&1
      echo "spec tests: exit $?"; tail -3 "$OUT/spec-tests.log"
    fi
    # batch 1: with drafts (accepted where the random model loops); then drafts forced to be rejected, at the
    # defaults (auto-off: a request stops drafting after 16 steps, a step of more than 32 requests has no drafts)
    # and with auto-off lifted (the raw cost of a verify step) at batch 1 and 64. Each against plain decoding.
    # ngram-raw at 64: drafts above the default batch limit (32), where the dummy model's loops accept them
    for run in "b1 plain,ngram,reject,reject-raw --num-requests 1 --input-len 512 --output-len 512" \
               "b8 plain,ngram --num-requests 8 --input-len 512 --output-len 256" \
               "b32 plain,ngram --num-requests 32 --input-len 512 --output-len 256" \
               "b64 plain,ngram-raw,reject,reject-raw --num-requests 64 --input-len 512 --output-len 256"; do
      read -r tag modes args <<<"$run"
      for mode in ${modes//,/ }; do
        case $mode in
          plain) flags="" ;;
          ngram) flags="--speculative-method ngram" ;;
          ngram-raw) flags="--speculative-method ngram --speculative-max-batch-size 64" ;;
          reject) flags="--speculative-method ngram --spec-force-reject" ;;
          reject-raw) flags="--speculative-method ngram --spec-force-reject --speculative-max-batch-size 64 \
            --speculative-min-acceptance-rate 0" ;;
        esac
        timeout 240 $BENCH --model qwen3-0.6b $args $flags --output-file "$OUT/spec-$tag-$mode.json" \
          >"$OUT/spec-$tag-$mode.log" 2>&1
        echo "spec $tag $mode: exit $? $(grep -E '^wall|^speculation' "$OUT/spec-$tag-$mode.log" | tr '\n' ' ')"
      done
    done ;;
  large)
    for model in qwen3-4b qwen3-8b; do
      timeout 200 $BENCH --model $model --output-file "$OUT/offline-$model.json" >"$OUT/offline-$model.log" 2>&1
      echo "$model: exit $? $(grep -E 'wall|roofline' "$OUT/offline-$model.log" | tr '\n' ' ')"
    done ;;
  esac
done
# at most 8 files come back from a lent host: more go into one archive (by the outermost call only)
if [ -z "${GPU_SESSION_NESTED:-}" ] && [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  archive=$(mktemp /tmp/gpu-session-logs.XXXXXX)
  (cd "$OUT" && tar czf "$archive" . && find . -mindepth 1 -delete && mv "$archive" logs.tgz)
fi
