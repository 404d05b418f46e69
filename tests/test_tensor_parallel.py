"""Tensor parallelism on the CPU (gloo): sharded loading of every source format, the error for a model a size
does not split, every rank drawing the same tokens as one device does (eager and graph step functions), and
the engine with two ranks, offline and launched, answering what one device answers and ending cleanly when a
rank dies. Everything runs in float32, where a TP 2 step differs from a TP 1 step only by the order of the
all-reduce's sums (logits agree to ~1e-6): greedy tokens must be equal."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the graph step functions, before Triton is first imported

from servers import LaunchedServer, alive, assert_health_stays_down, fault_rank_mid_stream, process_tree  # noqa: E402
from test_step_graphs import graphs_for  # noqa: E402
from tiny_models import write_tiny_qwen3  # noqa: E402

from sfllm import LLM, SamplingParams  # noqa: E402
from sfllm.config import ServerConfig, WorkerConfig  # noqa: E402
from sfllm.messages import BlockTableUpdate, ForwardBatch, SequenceSampling  # noqa: E402
from sfllm.model_source import resolve_model  # noqa: E402
from sfllm.worker.model_runner import ModelRunner  # noqa: E402
from sfllm.worker.model_shard import IndivisibleModel, ModelShard  # noqa: E402
from sfllm.worker.tensor_parallel import TensorParallelGroup  # noqa: E402
from sfllm.worker.weight_loader import load_model  # noqa: E402

VOCAB = 509  # odd: the last rank's vocabulary rows end in padding
SAMPLED = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.7, seed=3, logprobs=2, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=12,
                          ignore_eos=True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), VOCAB, tie_word_embeddings=False)


def prompt(length: int, offset: int) -> list[int]:
    return [(7 * i + offset) % (VOCAB - 10) + 5 for i in range(length)]


# ---- the model's split -------------------------------------------------------------------------------

def test_a_size_that_does_not_split_the_heads_is_refused_naming_the_counts(smollm_source) -> None:
    """SmolLM2-135M has 9 attention heads and 3 KV heads: 2 does not split it, 3 does."""
    config = smollm_source.source.config
    with pytest.raises(IndivisibleModel, match=r"size 2 does not split this model: it has 9 attention heads, 3 KV "
                                               r"heads and an MLP width of 1536.*Sizes that fit: 1, 3$"):
        ModelShard.of(config, 0, 2)
    children_before = set(process_tree(os.getpid()))
    with pytest.raises(IndivisibleModel, match="9 attention heads"):
        LLM(dtype="float32", device="cpu", tensor_parallel_size=2)
    assert set(process_tree(os.getpid())) == children_before, "no rank was started"
    assert ModelShard.of(config, 2, 3).num_heads == 3


def test_fewer_kv_heads_than_ranks_are_replicated(checkpoint: Path) -> None:
    """4 query heads in 2 groups, over 4 ranks: ranks 0 and 1 hold KV head 0, ranks 2 and 3 KV head 1."""
    config = resolve_model(str(checkpoint)).config
    shards = [ModelShard.of(config, rank, 4) for rank in range(4)]
    assert [(s.first_head, s.num_heads, s.first_kv_head, s.num_kv_heads) for s in shards] == [
        (0, 1, 0, 1), (1, 1, 0, 1), (2, 1, 1, 1), (3, 1, 1, 1)]
    assert [(s.first_token, s.real_vocab_rows) for s in shards] == [(0, 128), (128, 128), (256, 128), (384, 125)]


def _stitched(name: str, parts: list[torch.Tensor], whole: torch.Tensor, shards: list[ModelShard]) -> torch.Tensor:
    """The whole parameter back from the ranks' parts (KV heads replicated on several ranks taken once)."""
    if ".qkv_proj." in name:
        d = shards[0].head_dim
        pieces = [p.split([s.num_heads * d, s.num_kv_heads * d, s.num_kv_heads * d]) for p, s in zip(parts, shards)]
        firsts = {s.first_kv_head: rank for rank, s in reversed(list(enumerate(shards)))}
        kv_ranks = [firsts[head] for head in sorted(firsts)]
        return torch.cat([q for q, _, _ in pieces] + [pieces[r][1] for r in kv_ranks]
                         + [pieces[r][2] for r in kv_ranks])
    if ".gate_up_proj." in name:
        halves = [p.chunk(2) for p in parts]
        return torch.cat([g for g, _ in halves] + [u for _, u in halves])
    if ".o_proj." in name or ".down_proj." in name:
        return torch.cat(parts, dim=1)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        assert all(not p[s.real_vocab_rows:].any() for p, s in zip(parts, shards)), "padding rows are zero"
        return torch.cat(parts)[:whole.shape[0]]
    assert all(torch.equal(p, parts[0]) for p in parts), f"{name} is the same on every rank"
    return parts[0]


def _assert_shards_stitch_back(source, size: int) -> None:
    cpu = torch.device("cpu")
    whole = dict(load_model(source, torch.float32, cpu, 64).named_parameters())
    shards = [ModelShard.of(source.config, rank, size) for rank in range(size)]
    ranks = [dict(load_model(source, torch.float32, cpu, 64, shard=shard).named_parameters()) for shard in shards]
    assert ranks[0].keys() == whole.keys()
    for name, param in whole.items():
        assert ranks[0][name].numel() < param.numel() or ".norm" in name or "norm." in name, f"{name} is split"
        torch.testing.assert_close(_stitched(name, [r[name] for r in ranks], param, shards), param, rtol=0, atol=0,
                                   msg=name)


@pytest.mark.parametrize("size", [2, 4])
def test_safetensors_shards_stitch_back_to_the_whole_model(checkpoint: Path, size: int) -> None:
    _assert_shards_stitch_back(resolve_model(str(checkpoint)), size)


def test_gguf_shards_stitch_back_to_the_whole_model(smollm_source) -> None:
    """The bundled SmolLM2 GGUF (converted once, then read as safetensors), over 3 ranks."""
    _assert_shards_stitch_back(smollm_source.source, 3)


def test_a_checkpoint_tensor_of_another_shape_is_refused_though_a_ranks_part_would_fit(checkpoint: Path,
                                                                                       tmp_path: Path) -> None:
    """A config of 2 heads over a checkpoint of 4: rank 0 of 2 would read 16 of o_proj's 64 columns without
    noticing (the checkpoint's first tensor of the attention)."""
    from sfllm.worker.weight_loader import WeightLoadError
    folder = tmp_path / "mislabelled"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("cache", "tokenizer-cache"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_attention_heads": 2}))
    source = resolve_model(str(folder))
    with pytest.raises(WeightLoadError, match=r"layers\.0\.self_attn\.o_proj\.weight: checkpoint shape \(64, 64\) "
                                              r"but the model expects \(64, 32\)"):
        load_model(source, torch.float32, torch.device("cpu"), 64, shard=ModelShard.of(source.config, 0, 2))


def test_dummy_shards_are_the_one_device_dummy_model_cut() -> None:
    """Every tensor-parallel size serves the same random model: the GPU measurements compare like with like."""
    from sfllm.model_source.dummy_presets import QWEN3_GENERATION_CONFIG
    from sfllm.model_source.model_config import ModelConfig
    from sfllm.model_source.resolve import ModelSource
    config = ModelConfig.from_dict({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 301, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
                                    "tie_word_embeddings": True}, QWEN3_GENERATION_CONFIG)
    _assert_shards_stitch_back(ModelSource("tiny", None, config, "dummy", Path(".")), 2)


# ---- the ranks draw the same tokens ------------------------------------------------------------------

def _worker_config(folder: str) -> WorkerConfig:
    return ServerConfig(model=folder, device="cpu", dtype="float32", attention_backend="triton", max_running_requests=8,
                        max_running_tokens=64, max_context_length=128, num_kv_blocks=64,
                        cache_dir=f"{folder}/cache").worker()


def _run_steps(runner: ModelRunner) -> dict:
    """Eager steps of every kind of sampling through the worker's path, then a mixed and a decode step of the
    captured graphs' step function (interpreted kernels); what each step sampled, and the graphs' logits."""
    lengths = [5, 9, 3, 12, 7]
    first = ForwardBatch(
        step_id=0, slots=list(range(5)), num_new_tokens=lengths, context_lens=lengths,
        input_token_ids=[t for slot, n in enumerate(lengths) for t in prompt(n, slot)], sample=[True] * 5,
        block_table_updates=[BlockTableUpdate(slot, 0, [slot]) for slot in range(7)],
        new_sequences=[SequenceSampling(slot=slot, params=SAMPLED[slot % 5], prompt_token_ids=prompt(n, slot))
                       for slot, n in enumerate(lengths + [4, 6])])
    steps = [first] + [ForwardBatch(step_id=i, slots=list(range(5)), num_new_tokens=[1] * 5,
                                    context_lens=[n + i for n in lengths], input_token_ids=[-1] * 5,
                                    sample=[True] * 5) for i in range(1, 8)]
    eager = []
    for batch in steps:
        runner.execute(batch)
        result = runner.next_result(wait=True)
        eager.append((result.token_ids, [None if lp is None else lp.logprob for lp in result.logprobs]))
    graphs = graphs_for(runner)
    mixed = ForwardBatch(step_id=8, slots=[0, 1, 5, 6], num_new_tokens=[1, 1, 4, 6], context_lens=[13, 17, 4, 6],
                         input_token_ids=[-1, -1] + prompt(4, 5) + prompt(6, 6), sample=[True] * 4)
    decode = ForwardBatch(step_id=9, slots=[0, 1, 5, 6], num_new_tokens=[1] * 4, context_lens=[14, 18, 5, 7],
                          input_token_ids=[-1] * 4, sample=[True] * 4)
    graph = []
    with torch.inference_mode():
        for batch in (mixed, decode):
            shape = graphs.shape_for(batch)
            num_sampled = graphs.stage(batch, shape, runner.slot_temperature)
            graphs.run_step(shape)
            graph.append((graphs.tokens[:num_sampled].tolist(), graphs.logits[:num_sampled, :VOCAB].tolist()))
    return {"eager": eager, "graph": graph, "last_tokens": runner.last_tokens.tolist()}


def _rank_main(rank: int, size: int, rendezvous: str, folder: str, results) -> None:
    group = TensorParallelGroup(rank, size, torch.device("cpu"), Path(rendezvous))
    config = _worker_config(folder)
    results.put((rank, _run_steps(ModelRunner(config, resolve_model(folder, "auto", config.cache_dir), group))))
    group.close()


def test_every_rank_draws_what_one_device_draws(checkpoint: Path, tmp_path: Path) -> None:
    """Greedy, temperature, top-k/p, seeded with logprobs, and penalised rows; placeholders for the previous
    tokens; the graphs' sampling kernel with temperature noise. Each rank's tokens (and the slots' last tokens,
    the next steps' inputs) are the other's, bit for bit, and one device's; logits agree within the rounding
    of the all-reduce's order."""
    config = _worker_config(str(checkpoint))
    alone = _run_steps(ModelRunner(config, resolve_model(str(checkpoint), "auto", config.cache_dir)))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_rank_main, args=(rank, 2, str(tmp_path / "rendezvous"), str(checkpoint), results))
             for rank in range(2)]
    for process in ranks:
        process.start()
    by_rank = dict(results.get(timeout=300) for _ in ranks)
    for process in ranks:
        process.join(60)
        assert process.exitcode == 0
    assert by_rank[0] == by_rank[1], "the ranks agree exactly"
    parallel = by_rank[0]
    assert [tokens for tokens, _ in parallel["eager"]] == [tokens for tokens, _ in alone["eager"]]
    assert parallel["last_tokens"] == alone["last_tokens"]
    assert len({tuple(tokens) for tokens, _ in alone["eager"]}) > 1, "the steps draw different tokens"
    for (tokens, logprobs), (expected_tokens, expected_logprobs) in zip(parallel["eager"], alone["eager"]):
        assert [lp is None for lp in logprobs] == [lp is None for lp in expected_logprobs]
        torch.testing.assert_close([lp or 0.0 for lp in logprobs], [lp or 0.0 for lp in expected_logprobs],
                                   rtol=1e-5, atol=1e-5)
    for (tokens, logits), (expected_tokens, expected_logits) in zip(parallel["graph"], alone["graph"]):
        assert tokens == expected_tokens
        torch.testing.assert_close(torch.tensor(logits), torch.tensor(expected_logits), rtol=1e-5, atol=1e-5)


# ---- the engine --------------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return [prompt(n, i) for i, n in enumerate([1, 6, 17, 40, 3])]


@pytest.fixture(scope="module")
def one_device(checkpoint: Path) -> list:
    llm = LLM(model=str(checkpoint), dtype="float32", device="cpu", max_context_length=128, max_running_tokens=16,
              cache_dir=str(checkpoint / "cache"))
    return [r.outputs[0] for r in llm.generate(_prompts(), SAMPLED)]


class KnownContinuation:
    """Drafts the tokens that followed a prompt in another run."""

    def __init__(self, outputs: dict[tuple[int, ...], list[int]]) -> None:
        self.outputs = outputs

    def propose(self, tokens: list[int], max_drafts: int) -> list[int]:
        for prompt, output in self.outputs.items():
            if tuple(tokens[:len(prompt)]) == prompt and len(tokens) > len(prompt):
                done = len(tokens) - len(prompt)
                return output[done:done + max_drafts]
        return []


def test_offline_two_ranks_generate_what_one_device_does(checkpoint: Path, one_device: list) -> None:
    """Prefill chunked over steps (16-token budget), overlapped steps, every kind of sampling."""
    llm = LLM(model=str(checkpoint), dtype="float32", device="cpu", max_context_length=128, max_running_tokens=16,
              cache_dir=str(checkpoint / "cache"), tensor_parallel_size=2)
    followers = llm.engine.worker.followers
    try:
        assert len(followers.processes) == 1 and llm.engine.worker.runner.shard.num_heads == 2
        outputs = [r.outputs[0] for r in llm.generate(_prompts(), SAMPLED)]
        assert [o.token_ids for o in outputs] == [o.token_ids for o in one_device]
        assert llm.kv_usage()[0] == llm.kv_usage()[1]
        # speculative decoding, drafting one device's continuation: every rank verifies the drafts its relayed
        # steps carry; greedy and seeded requests (whose drafts are all right) and penalised ones (never
        # drafting) give the same tokens, the unseeded ones reject most of theirs
        speculation = llm.engine.scheduler.speculation
        speculation.enabled = True
        speculation.proposer = KnownContinuation({tuple(p): o.token_ids for p, o in zip(_prompts(), one_device)})
        drafted = [r.outputs[0] for r in llm.generate(_prompts(), SAMPLED)]
        assert [drafted[i].token_ids for i in (0, 3, 4)] == [one_device[i].token_ids for i in (0, 3, 4)]
        assert 0 < speculation.num_accepted < speculation.num_proposed
        assert llm.kv_usage()[0] == llm.kv_usage()[1]
    finally:
        llm.engine.worker.close()
    assert followers.processes[0].returncode == 0, "the other rank stopped on its Shutdown"


def test_launched_two_ranks_serve_one_devices_text_and_end_when_a_rank_dies(checkpoint: Path, tmp_path: Path,
                                                                           one_device: list) -> None:
    """The greedy, seeded and penalised requests (whose tokens do not depend on the batch) answer what one
    device generated offline; then rank 1 is killed in the middle of a stream: the stream ends in an error,
    /health never answers 200 again, launch exits non-zero within seconds naming the rank, and no process is
    left."""
    import httpx
    server = LaunchedServer(tmp_path, "--model", str(checkpoint), "--tensor-parallel-size", "2",
                            "--max-context-length", "256", "--max-running-tokens", "16",
                            "--cache-dir", str(checkpoint / "cache"))
    try:
        for row in (0, 3, 4):
            params = SAMPLED[row]
            reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "prompt": _prompts()[row], "max_tokens": params.max_tokens, "temperature": params.temperature,
                "seed": params.seed, "repetition_penalty": params.repetition_penalty,
                "presence_penalty": params.presence_penalty, "ignore_eos": True})
            assert reply.json()["choices"][0]["text"] == one_device[row].text, f"row {row}"
        fault = fault_rank_mid_stream(server, signal.SIGKILL, {"prompt": prompt(4, 0), "max_tokens": 250,
                                                               "temperature": 0, "ignore_eos": True}, 3, 30)
        assert fault.exit_code != 0 and fault.seconds_to_exit < 15, "launch exits non-zero within seconds"
        assert f"tensor-parallel rank 1 (pid {fault.rank_pid}) was killed by signal 9" in server.log.read_text()
        events = fault.stream_events
        assert 3 <= len(events) < 250 and '"finish_reason":"length"' not in "".join(events), "cut mid-stream"
        assert_health_stays_down(fault.health)
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in fault.tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in fault.tree), "no rank or other process is left"
    finally:
        server.stop()
