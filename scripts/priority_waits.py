"""Where each high-priority request's first token waited, from a server log at `--log-level debug`.

One row per request, in milliseconds from the moment its frontend took it: at the engine, scheduled,
first output sent by the engine, first output in the frontend, first event written to the client; and the
engine's pipeline when it arrived.
Run: python scripts/priority_waits.py SERVER_LOG
"""
from __future__ import annotations

import re
import sys

ENGINE = re.compile(r"high-priority request (\S+): at the engine ([\d.-]+) ms after the frontend took it \((.*)\); "
                    r"scheduled ([\d.]+) ms later, first output sent at ([\d.]+) ms")
FRONTEND = re.compile(r"high-priority request (\S+): first output in the frontend at ([\d.]+) ms")
WRITTEN = re.compile(r"high-priority request (\S+): first event written at ([\d.]+) ms")


def main(path: str) -> None:
    rows: dict[str, dict[str, str]] = {}  # by the engine's request id: the API request's id, "-", the choice
    written: dict[str, str] = {}  # by the API request's id
    with open(path, errors="replace") as log:
        for line in log:
            if match := ENGINE.search(line):
                request, to_engine, state, scheduled_after, sent = match.groups()
                scheduled = f"{float(to_engine) + float(scheduled_after):.1f}"
                rows.setdefault(request, {}).update(engine=to_engine, scheduled=scheduled, sent=sent, state=state)
            elif match := FRONTEND.search(line):
                rows.setdefault(match[1], {})["frontend"] = match[2]
            elif match := WRITTEN.search(line):
                written[match[1]] = match[2]
    print("| at the engine | scheduled | engine sent | frontend got | written | the engine on arrival |")
    print("| --- | --- | --- | --- | --- | --- |")
    for request, row in rows.items():
        row["written"] = written.get(request.rsplit("-", 1)[0], "")
        cells = (row.get(k, "") for k in ("engine", "scheduled", "sent", "frontend", "written", "state"))
        print(" | ".join(["", *cells, ""]).strip())


if __name__ == "__main__":
    main(sys.argv[1])
