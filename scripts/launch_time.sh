#!/usr/bin/env bash
# A server's start: `sfllm launch` until /health answers 200, alternating a base tree and this one on one machine.
#   BASE=<commit or folder> ROUNDS=3 bash scripts/launch_time.sh [launch flags, e.g. --model qwen3-0.6b --load-format dummy]
# Without BASE, this tree alone. Each launch runs with the flags given and nothing else (the product's defaults),
# from its tree (PYTHONPATH), with the same cache directory, and is stopped (SIGTERM) before the next.
set -eu
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
trees=()
if [ -n "${BASE:-}" ]; then
  if [ -d "$BASE" ]; then trees+=("$(cd "$BASE" && pwd)"); else
    base_dir=$(mktemp -d); git -C "$HERE" archive "$BASE" | tar -x -C "$base_dir"; trees+=("$base_dir"); fi
fi
trees+=("$HERE")
for round in $(seq 1 "${ROUNDS:-3}"); do
  for tree in "${trees[@]}"; do
    label=$([ "$tree" = "$HERE" ] && echo "this tree" || echo "base")
    PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$label" "$round" "$@" <<'PYEOF'
import socket, subprocess, sys, tempfile, time, urllib.request
label, round_, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
run_dir = tempfile.mkdtemp(prefix="sfllm-launch-time-")
start = time.monotonic()
server = subprocess.Popen([sys.executable, "-m", "sfllm", "launch", "--host", "127.0.0.1", "--port", str(port),
                           "--run-dir", run_dir, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          cwd=tempfile.gettempdir())
while True:
    if server.poll() is not None:
        sys.exit(f"round {round_}, {label}: launch exited with {server.returncode}")
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
            break
    except OSError:
        pass
    time.sleep(0.05)
print(f"round {round_}, {label}: /health answered after {time.monotonic() - start:.2f} s", flush=True)
server.terminate()
server.wait(60)
PYEOF
  done
done
