"""`sfllm launch | engine | frontend | worker | bench offline | bench serve | bench priority`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sfllm.config import ConfigError, ServerConfig, add_config_arguments, load_config
from sfllm.cuda_presence import cuda_available
from sfllm.shipped_profiles import shipped_profile

COMMANDS = ("launch", "engine", "frontend", "worker", "bench")


def setup_logging(level: str, process: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{process}] %(name)s: %(message)s")


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser)
    return parser


def _default_profile(args: argparse.Namespace) -> None:
    """Without --config on a machine without CUDA, the CPU profile is the starting point."""
    if args.config is None and (cpu_profile := shipped_profile("cpu")) is not None and not cuda_available():
        args.config = str(cpu_profile)


def _load(parser: argparse.ArgumentParser, argv: list[str],
          default_profile: bool = False) -> tuple[argparse.Namespace, ServerConfig]:
    args = parser.parse_args(argv)
    positional = getattr(args, "model_positional", None)
    if positional is not None:
        if args.model is not None and args.model != positional:
            parser.error(f"two models: {positional!r} and --model {args.model!r}; give one")
        args.model = positional
    if default_profile:
        _default_profile(args)
    try:
        return args, load_config(args)
    except ConfigError as error:  # the flags parsed: the value is at fault, not the usage
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = argv[0] if argv else ""  # as the user typed it, for the errors
    if verb == "serve":
        argv = ["launch", *argv[1:]]  # vLLM's verb
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["launch", *argv]  # `sfllm --model X` serves, as `sfllm launch --model X`
    if argv[0] in ("-h", "--help"):
        print(f"usage: sfllm {{{','.join(COMMANDS)}}} ...\n\n"
              "  launch    start the engine (scheduler + worker) and the HTTP frontend, and supervise them\n"
              "            (`sfllm launch MODEL` or `sfllm serve MODEL` as vLLM's, `sfllm --model MODEL`)\n"
              "  engine    start the scheduler and worker only (frontends connect to --engine-address)\n"
              "  frontend  start an HTTP frontend for a running engine (--engine-address)\n"
              "  bench     offline | serve | priority benchmarks\n")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        return _bench(rest)
    if command == "worker":
        parser = _config_parser("sfllm worker", "the GPU worker (started by the engine; with tensor parallelism "
                                                "its rank 0, which starts the other ranks)")
        parser.add_argument("--worker-address", required=True)
        parser.add_argument("--tensor-parallel-rank", type=int, default=0)
        parser.add_argument("--rendezvous", type=Path, help="the tensor-parallel group's meeting file (ranks 1..N-1)")
        args, config = _load(parser, rest)
        if args.tensor_parallel_rank:
            setup_logging(config.log_level, f"worker rank {args.tensor_parallel_rank}")
            from sfllm.worker.follower_process import run_follower
            return run_follower(config.worker(), args.worker_address, args.tensor_parallel_rank, args.rendezvous)
        setup_logging(config.log_level, "worker")
        from sfllm.worker.worker_process import run_worker
        return run_worker(config.worker(), args.worker_address)
    parser = _config_parser(f"sfllm {'serve' if verb == 'serve' else command}", {
        "launch": "serve a model over an OpenAI-compatible HTTP API",
        "engine": "run the scheduler and worker; frontends connect to --engine-address",
        "frontend": "run an HTTP frontend for a running engine",
    }[command])
    if command in ("launch", "engine"):
        parser.add_argument("model_positional", nargs="?", metavar="MODEL",
                            help="the model, as `vllm serve MODEL` takes it (or --model)")
    if command == "frontend":
        parser.add_argument("--http-fd", type=int, help="the HTTP port's socket, inherited (set by sfllm launch)")
        parser.add_argument("--ready-fd", type=int, help="a pipe told once the frontend serves (set by sfllm launch)")
    args, config = _load(parser, rest, default_profile=command in ("launch", "engine"))
    setup_logging(config.log_level, command)
    if command == "launch":
        from sfllm.launcher import launch
        return launch(config)
    if command == "engine":
        from sfllm.launcher import run_engine_command
        return run_engine_command(config.engine())
    from sfllm.frontend.server import FrontendStartupError, run_frontend
    try:
        run_frontend(config.frontend(), http_fd=args.http_fd, ready_fd=args.ready_fd)
    except FrontendStartupError as error:
        logging.getLogger("sfllm.frontend").error("%s", error)
        return 2
    return 0


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] not in ("offline", "serve", "priority"):
        print("usage: sfllm bench {offline,serve,priority} ...", file=sys.stderr)
        return 2
    if argv[0] == "serve":
        from sfllm.bench.serve import main as serve_main
        return serve_main(argv[1:])
    if argv[0] == "priority":
        from sfllm.bench.priority import main as priority_main
        return priority_main(argv[1:])
    from sfllm.bench.offline import main as offline_main
    return offline_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
