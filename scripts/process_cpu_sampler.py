"""CPU use of each sfllm process (launch, frontend, engine, worker) once a second, until killed.

    python scripts/process_cpu_sampler.py > cpu.log &

One line per second: the wall time, then per process its role and the share of one core it used
over that second. A frontend near 100% is the serving bottleneck, whatever the GPU does.
"""
from __future__ import annotations

import os
import sys
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("launch", "frontend", "engine", "worker", "bench")


def sfllm_processes() -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        if "sfllm" in words:
            role = next((w for w in words[words.index("sfllm") + 1:] if w in ROLES), None)
            if role is not None:
                found[int(entry)] = role
    return found


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def main() -> None:
    previous: dict[int, float] = {}
    previous_at = time.monotonic()
    while True:
        processes = sfllm_processes()
        now = {pid: s for pid in processes if (s := cpu_seconds(pid)) is not None}
        at = time.monotonic()
        shares = [f"{processes[pid]}:{100 * (now[pid] - previous[pid]) / (at - previous_at):.0f}%"
                  for pid in sorted(now) if pid in previous]
        if shares:
            print(f"{time.time():.1f} " + " ".join(shares), flush=True)
        previous, previous_at = now, at
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
