"""The engine process: the engine core between its frontends (ROUTER) and its worker (PAIR).

Frontends come and go: each says hello, heartbeats, sends requests and aborts. One whose
heartbeats stop for `CLIENT_TIMEOUT_S` is gone, and its requests are aborted so their
KV blocks come back.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zmq

from sfllm.config import EngineConfig, write_config_file
from sfllm.engine.engine_core import EngineCore
from sfllm.engine.remote_worker import RemoteWorker, WorkerDied
from sfllm.gc_pauses import freeze_startup_objects
from sfllm.ipc import (WORKER_CONFIG_PREFIX, RunDirLock, die_with_parent, ipc_path, remove_stale_files, sigint_ignored,
                       worker_address, worker_environment)
from sfllm.loop_time import loop_time
from sfllm.messages import (PROTOCOL_VERSION, QUEUE_TIME_BUCKETS_S, AbortRequest, ClientGoodbye, ClientHello,
                            EngineHello, EngineStats, FlushPrefixCache, FrontendToEngine, GenerateRequest, Heartbeat,
                            MessageCodec, OutputBatch, ProfileControl, RequestOutput, Shutdown, StartProfile,
                            SamplingDefaults, StopProfile, TokenizerSpec)
from sfllm.ordered_stop import ORDERED_STOP, SigtermFromOutside, launch_pid
from sfllm.scheduler.grammar_matchers import GrammarMatchers
from sfllm.scheduler.request import Request

logger = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 3.0
# messages handled per read of the frontends' socket: a steady stream of them (a burst of hundreds of requests,
# heartbeats of many frontends) must not keep the engine from sending its next step; the rest wait one loop turn
FRONTEND_MESSAGES_PER_READ = 256
SEND_SLICE_MS = 200  # a send to the worker gives up this often to check that the worker still lives


class TokenizerUnavailable(RuntimeError):
    pass


class EngineCounters:
    """Totals since the engine started, sent in every EngineStats: they outlive any frontend."""

    def __init__(self) -> None:
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_finished: dict[str, int] = {}
        self.queue_time_counts = [0] * (len(QUEUE_TIME_BUCKETS_S) + 1)
        self.queue_time_sum_s = 0.0
        self._awaiting_first_output: dict[str, Request] = {}
        # high-priority requests, for the debug log: (the frontend's arrival time, the engine's state on arrival)
        self._high_priority_arrivals: dict[str, tuple[float, str]] = {}

    def admitted(self, request: Request, frontend_arrival_time: float, engine_state: Callable[[], str]) -> None:
        # The scheduler stamps enqueue and first-scheduled times on its Request; read them at the first output.
        self._awaiting_first_output[request.request_id] = request
        # (a frontend always stamps its arrival time; a client of the engine's socket might not)
        if request.priority == "high" and frontend_arrival_time > 0 and logger.isEnabledFor(logging.DEBUG):
            self._high_priority_arrivals[request.request_id] = (frontend_arrival_time, engine_state())

    def count(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            request = self._awaiting_first_output.get(output.request_id)
            if request is not None and (output.token_ids or output.finish_reason is not None):
                del self._awaiting_first_output[output.request_id]
                high_priority = self._high_priority_arrivals.pop(output.request_id, None)
                if output.token_ids:
                    self.num_prompt_tokens += len(request.prompt_token_ids)
                if request.first_scheduled_time is not None:
                    queue_time = request.first_scheduled_time - request.enqueue_time
                    self.queue_time_counts[bisect.bisect_left(QUEUE_TIME_BUCKETS_S, queue_time)] += 1
                    self.queue_time_sum_s += queue_time
                    if high_priority is not None:  # where its first token waited, from the frontend's clock
                        frontend_arrival, engine_state = high_priority
                        to_engine = request.enqueue_time - time.monotonic() + time.time() - frontend_arrival
                        logger.debug("high-priority request %s: at the engine %.1f ms after the frontend took it "
                                     "(%s); scheduled %.1f ms later, first output sent at %.1f ms",
                                     output.request_id, 1e3 * to_engine, engine_state, 1e3 * queue_time,
                                     1e3 * (time.time() - frontend_arrival))
            self.num_generation_tokens += len(output.token_ids)
            if output.finish_reason is not None:
                self.num_finished[output.finish_reason] = self.num_finished.get(output.finish_reason, 0) + 1


def client_name(identity: bytes) -> str:
    """A frontend's socket identity is its client id (a hex string, see EngineClient) as bytes."""
    return identity.decode("ascii", errors="backslashreplace")


class EngineServer:
    def __init__(self, config: EngineConfig, core: EngineCore, worker: RemoteWorker, frontend_sock: zmq.Socket,
                 tokenizer: TokenizerSpec, sampling_defaults: SamplingDefaults) -> None:
        self.config = config
        self.core = core
        self.worker = worker
        self.sock = frontend_sock
        self.codec = MessageCodec(FrontendToEngine)
        info = worker.info
        # Encoded once: it carries the tokenizer (megabytes for large vocabularies) to every frontend that says hello.
        self.hello = self.codec.encode(EngineHello(
            protocol_version=PROTOCOL_VERSION, model_name=config.model_name, max_context_length=info.max_context_length,
            eos_token_ids=info.eos_token_ids, num_kv_blocks=info.num_kv_blocks, block_size=info.block_size,
            tokenizer=tokenizer, sampling_defaults=sampling_defaults,
            max_running_requests=config.scheduler.max_running_requests,
            max_running_tokens=config.scheduler.max_running_tokens,
            tensor_parallel_size=config.worker.tensor_parallel_size,
            prefix_cache=not config.scheduler.disable_prefix_cache))
        self.owner: dict[str, bytes] = {}
        self.last_seen: dict[bytes, float] = {}
        self.greeted: set[bytes] = set()  # frontends whose hello was logged
        self.counters = EngineCounters()
        self.loop_time = core.loop_time = loop_time(config.disable_log_stats)
        self.stopping = False

    def _send(self, identity: bytes, message: object) -> None:
        self._send_encoded(identity, self.codec.encode(message))

    def _send_encoded(self, identity: bytes, data: bytes) -> None:
        try:
            self.sock.send_multipart([identity, data], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # that frontend is gone or not reading; its heartbeat timeout cleans up

    def _stats(self) -> EngineStats:
        s = self.core.scheduler.stats()
        return EngineStats(running=s["running"], waiting=s["waiting"], num_kv_blocks=s["num_kv_blocks"],
                           num_free_kv_blocks=s["num_free_kv_blocks"], num_cached_kv_blocks=s["num_cached_kv_blocks"],
                           prefix_cache_queries=s["prefix_cache_queries"], prefix_cache_hits=s["prefix_cache_hits"],
                           num_preemptions=s["num_preemptions"], num_steps=self.core.num_steps,
                           step_time_s=self.core.last_step_time_s,
                           batch_size=self.core.last_batch_size if self.core.has_work() else 0,
                           gpu_memory_allocated=self.core.gpu_memory[0], gpu_memory_reserved=self.core.gpu_memory[1],
                           ready=True, num_prompt_tokens=self.counters.num_prompt_tokens,
                           num_generation_tokens=self.counters.num_generation_tokens,
                           num_finished=self.counters.num_finished, queue_time_counts=self.counters.queue_time_counts,
                           queue_time_sum_s=self.counters.queue_time_sum_s,
                           num_spec_proposed_tokens=s["num_spec_proposed_tokens"],
                           num_spec_accepted_tokens=s["num_spec_accepted_tokens"])

    def _handle(self, identity: bytes, message: object) -> None:
        if isinstance(message, ClientGoodbye):
            self._forget_client(identity, said_goodbye=True)
            return
        self.last_seen[identity] = time.monotonic()
        if isinstance(message, GenerateRequest):
            self.owner[message.request_id] = identity
            error = self.core.add_request(message, client_name(identity))
            if error is not None:
                self._deliver([error])
            else:
                self.counters.admitted(self.core.scheduler.requests[message.request_id], message.arrival_time,
                                       self._pipeline_state)
        elif isinstance(message, AbortRequest):
            self._deliver(self.core.abort(message.request_ids))
        elif isinstance(message, Heartbeat):
            self._send(identity, self._stats())
        elif isinstance(message, ClientHello):
            if identity not in self.greeted:  # a frontend says hello again until the answer comes
                self.greeted.add(identity)
                logger.info("frontend %s connected", message.client_id)
            self._send_encoded(identity, self.hello)
        elif isinstance(message, FlushPrefixCache):
            logger.info("prefix cache flushed: %d cached KV blocks forgotten",
                        self.core.scheduler.allocator.forget_cached())
        elif isinstance(message, ProfileControl):
            directory = self.config.profile_dir or str(Path.cwd() / "sfllm-profiles")
            self.worker.send(StartProfile(directory=directory) if message.start else StopProfile())
        elif isinstance(message, Shutdown):
            self.stopping = True

    def _pipeline_state(self) -> str:
        core = self.core
        return (f"{core.num_in_flight} steps in flight, the next due in {1e3 * core.seconds_until_due():.1f} ms, "
                f"sent {1e3 * core.send_ahead_s():.1f} ms before the one in flight ends")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        self.counters.count(outputs)
        by_client: dict[bytes, list[RequestOutput]] = {}
        for output in outputs:
            identity = self.owner.get(output.request_id)
            if output.finish_reason is not None:
                self.owner.pop(output.request_id, None)
            if identity is not None:
                by_client.setdefault(identity, []).append(output)
        for identity, batch in by_client.items():
            self._send(identity, OutputBatch(outputs=batch))

    def _drop_silent_clients(self) -> None:
        now = time.monotonic()
        for identity, seen in list(self.last_seen.items()):
            if now - seen > CLIENT_TIMEOUT_S:
                self._forget_client(identity, said_goodbye=False)

    def _forget_client(self, identity: bytes, said_goodbye: bool) -> None:
        """Aborts a frontend's requests, their blocks freed: it left (a goodbye) or went silent. A frontend that
        left with nothing running is routine (INFO); one that went silent, or left requests behind, is a WARNING."""
        self.last_seen.pop(identity, None)
        self.greeted.discard(identity)
        aborted = self.core.abort_client(client_name(identity))
        self.counters.count(aborted)
        for output in aborted:
            self.owner.pop(output.request_id, None)
        level = logging.INFO if said_goodbye and not aborted else logging.WARNING
        logger.log(level, "frontend %s %s; aborted its %d requests", client_name(identity),
                   "left" if said_goodbye else "went silent", len(aborted))

    def serve(self) -> None:
        """Answers frontends while the worker computes: both sockets in one poll."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.worker.sock, zmq.POLLIN)
        last_check = time.monotonic()
        clock = self.loop_time
        while not self.stopping:
            while self.core.submit_due():
                pass
            clock.lap("scheduling")
            idle = self.core.num_in_flight == 0
            due_ms = 1000 * self.core.seconds_until_due()
            if idle:
                timeout = 1 if self.core.scheduler.grammars_compiling() else 50
            else:
                timeout = 1 + int(due_ms) if due_ms > 0 else 1000
            events = dict(poller.poll(timeout=timeout))
            clock.lap("idle" if idle else "waiting for the worker")
            if self.sock in events:
                self._drain_frontends()
                clock.lap("frontend messages")
                if self.core.submit_urgent():
                    clock.lap("scheduling")
            if self.worker.sock in events:
                self._deliver(self.core.complete(self.worker.collect()))
                clock.lap("results")
                # a request that came while the results were read joins the step about to be scheduled
                self._drain_frontends()
                clock.lap("frontend messages")
            if time.monotonic() - last_check > 0.5:
                self.worker.check_alive()
                self._drop_silent_clients()
                last_check = time.monotonic()
                line = clock.report(self.core.num_steps)
                if line is not None:
                    scheduler = self.core.scheduler
                    if scheduler.speculation.enabled:
                        line += f"; speculation: {scheduler.speculation_summary()}"
                    logger.info("engine loop, %s", line)

    def _drain_frontends(self) -> None:
        """Handles the frontends' messages that wait, up to FRONTEND_MESSAGES_PER_READ."""
        for _ in range(FRONTEND_MESSAGES_PER_READ):
            if not self.sock.poll(timeout=0):
                return
            identity, payload = self.sock.recv_multipart()
            try:
                message = self.codec.decode(payload)
            except Exception as error:  # a malformed frame must not take the engine down
                logger.warning("dropped an undecodable message from %s: %s", client_name(identity), error)
                continue
            self._handle(identity, message)


def _start_worker_process(config_path: Path, address: str) -> subprocess.Popen:
    """The worker (with tensor parallelism its rank 0, which starts the other ranks)."""
    return subprocess.Popen([sys.executable, "-m", "sfllm", "worker", "--config", str(config_path),
                             "--worker-address", address], env=worker_environment(), preexec_fn=die_with_parent)


def _model_for_frontends(config: EngineConfig) -> tuple[TokenizerSpec, SamplingDefaults, Future[GrammarMatchers]]:
    """Made while the worker loads the model: frontends get the tokenizer and the model's sampling defaults from
    the engine, so they need no transformers (nor the model's files). With it, the grammar engine's tokenizer
    starts to build in a thread (0.3-0.4 s on the CI machine, which the engine's start waited for once the worker
    was ready), for the vocabulary and end tokens of the model's config, which the worker reports (EngineCore
    builds its own if not)."""
    # imported only now, the worker started: where no kept spec serves, transformers takes seconds to import
    from sfllm.model_source import resolve_model
    from sfllm.model_source.chat_template_override import with_chat_template
    from sfllm.model_source.generation_defaults import sampling_defaults
    from sfllm.model_source.resolve import resolve_cache_dir
    from sfllm.model_source.tokenizer_spec import tokenizer_spec
    try:
        source = resolve_model(config.model, config.load_format, config.cache_dir)
        spec = with_chat_template(tokenizer_spec(source, resolve_cache_dir(config.cache_dir)), config.chat_template)
    except (OSError, ValueError) as error:  # the model is absent, its files are wrong, or the chat template given
        raise TokenizerUnavailable(f"cannot load the tokenizer of {config.model!r}: {error}") from error
    try:
        defaults = sampling_defaults(config.generation_config, source.config_folder, config.override_generation_config)
    except ValueError as error:  # a generation config that changed since the settings were checked
        raise TokenizerUnavailable(f"cannot read the generation config of {config.model!r}: {error}") from error
    builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-tokenizer")
    grammars = builder.submit(GrammarMatchers, spec.tokenizer_json, source.config.vocab_size,
                              list(source.config.eos_token_ids))
    builder.shutdown(wait=False)
    return spec, defaults, grammars


def run_engine(config: EngineConfig) -> int:
    run_dir = config.run_dir
    lock = RunDirLock(run_dir)
    lock.acquire()
    remove_stale_files(run_dir, WORKER_CONFIG_PREFIX)
    config_path = run_dir / f"{WORKER_CONFIG_PREFIX}-{os.getpid()}.yaml"
    write_config_file(dataclasses.asdict(config.worker), config_path)
    address = config.engine_address
    worker_addr = worker_address(run_dir)
    context = zmq.Context()
    worker_sock = context.socket(zmq.PAIR)
    worker_sock.setsockopt(zmq.LINGER, 0)
    worker_sock.setsockopt(zmq.SNDTIMEO, SEND_SLICE_MS)
    worker_sock.bind(worker_addr)
    frontend_sock = context.socket(zmq.ROUTER)
    frontend_sock.setsockopt(zmq.LINGER, 0)
    frontend_sock.setsockopt(zmq.SNDHWM, 0)
    stopping = {"flag": False}
    process = _start_worker_process(config_path, worker_addr)

    def stop(*_: object) -> None:
        stopping["flag"] = True
        if server is not None:
            server.stopping = True

    server: EngineServer | None = None
    signal.signal(ORDERED_STOP, stop)  # launch's, once its frontends drained
    signal.signal(signal.SIGTERM, SigtermFromOutside(launch_pid(), stop, "sfllm launch"))
    if not sigint_ignored():  # ignored under `sfllm launch`, which stops the engine after the frontends drain
        signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        tokenizer, defaults, grammars = _model_for_frontends(config)
        worker = RemoteWorker(worker_sock, process)
        logger.info("worker ready (pid %d): %d KV blocks of %d tokens, context %d", worker.info.pid,
                    worker.info.num_kv_blocks, worker.info.block_size, worker.info.max_context_length)
        core = EngineCore(config.scheduler, worker, tokenizer, grammars=grammars.result())
        frontend_sock.bind(address)
        server = EngineServer(config, core, worker, frontend_sock, tokenizer, defaults)
        if stopping["flag"]:
            server.stopping = True
        logger.info("engine listening on %s", address)
        freeze_startup_objects()
        server.serve()
        worker.send(Shutdown())
    except (WorkerDied, TokenizerUnavailable) as error:
        logger.error("%s", error)
        code = 1
    finally:
        if process.poll() is None:
            process.send_signal(ORDERED_STOP)  # its SIGTERM would wait for this engine's end
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        worker_sock.close()
        frontend_sock.close()
        context.term()
        lock.release([config_path] + [p for p in (ipc_path(address), ipc_path(worker_addr)) if p is not None])
    return code
