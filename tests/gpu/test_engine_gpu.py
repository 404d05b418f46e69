"""The engine on a GPU: triton backend and CUDA graphs against the torch backend and transformers.

Random weights made here with transformers (no download): float32 greedy token for token,
bf16 prefill logits within bf16 rounding, a mixed batch of long and short sequences.
"""
from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 32000


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """Each test builds engines of its own; the engine's reference cycles keep the last one's memory
    until a collection runs."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import transformers
    folder = tmp_path_factory.mktemp("qwen3-random")
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=1024, intermediate_size=3072,
                                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
                                      head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True, initializer_range=0.1, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder


def _copy_tokenizer(folder: Path) -> None:
    from sfllm.model_source.dummy_tokenizer import dummy_tokenizer_folder
    for file in dummy_tokenizer_folder(folder / "tokenizer-cache").iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = [1, 7, 16, 33, 100, 257, 600, 1500]
    return [torch.randint(100, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def _reference(checkpoint: Path, dtype: torch.dtype):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval()
    model.generation_config.eos_token_id = None
    return model


def _reference_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _llm(checkpoint: Path, **overrides):
    from sfllm import LLM
    settings = dict(dtype="float32", max_context_length=2048, mem_fraction=0.5, cuda_graph_max_bs=16,
                    cache_dir=str(checkpoint / "cache"))
    settings.update(overrides)
    return LLM(model=str(checkpoint), **settings)


def test_float32_greedy_triton_graphs_equal_torch_backend_and_transformers(checkpoint: Path) -> None:
    """Every step of the graph engines runs as a graph: prefills and mixed steps in the mixed graphs, decode
    batches in the decode graphs, or in the mixed graphs past the largest decode graph (batch 8 > 4); on a host
    of two GPUs also over two tensor-parallel ranks."""
    from sfllm import SamplingParams
    from sfllm.loop_time import LoopTime
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = _prompts()
    reference = _reference(checkpoint, torch.float32)
    expected = [_reference_greedy(reference, p, 32) for p in prompts]
    del reference
    outputs = {}
    engines = {"triton+graphs": {"attention_backend": "triton"},
               "triton+graphs, decode past the decode graphs": {"attention_backend": "triton", "cuda_graph_max_bs": 4},
               "triton eager": {"attention_backend": "triton", "disable_cuda_graph": True},
               "torch": {"attention_backend": "torch", "disable_cuda_graph": True}}
    if torch.cuda.device_count() >= 2:  # the all-reduces and the logits gather captured in the graphs
        engines["triton+graphs, tensor parallel 2"] = {"attention_backend": "triton", "tensor_parallel_size": 2}
    for name, overrides in engines.items():
        llm = _llm(checkpoint, **overrides)
        runner = llm.engine.worker.runner
        runner.loop_time = LoopTime()
        outputs[name] = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
        if "graphs" in name:
            assert runner.graph_runner is not None
            assert runner.loop_time.calls["forward"] == runner.num_steps >= 32, "every step ran as a graph"
        assert llm.kv_usage()[0] == llm.kv_usage()[1]
        del llm, runner
        gc.collect()  # the engine's objects hold reference cycles
        torch.cuda.empty_cache()
    for name, tokens in outputs.items():
        assert tokens == expected, name


def test_bf16_prefill_logits_within_bf16_rounding(checkpoint: Path) -> None:
    from sfllm.messages import BlockTableUpdate, ForwardBatch
    reference = _reference(checkpoint, torch.bfloat16)
    llm = _llm(checkpoint, dtype="bfloat16", attention_backend="triton")
    runner = llm.engine.worker.runner
    prompts = _prompts()[3:]
    block_size = runner.block_size
    updates, next_block = [], 0
    for slot, p in enumerate(prompts):
        count = -(-len(p) // block_size)
        updates.append(BlockTableUpdate(slot, 0, list(range(next_block, next_block + count))))
        next_block += count
    batch = ForwardBatch(step_id=0, slots=list(range(len(prompts))), num_new_tokens=[len(p) for p in prompts],
                         context_lens=[len(p) for p in prompts], input_token_ids=[t for p in prompts for t in p],
                         sample=[False] * (len(prompts) - 1) + [True], block_table_updates=updates)
    with torch.inference_mode():
        runner.block_tables.apply(batch.block_table_updates)
        ours = runner.model.compute_logits(runner.eager.hidden_states(batch, runner.slot_temperature)[0])
        start = 0
        for p in prompts:
            theirs = reference(torch.tensor([p], device="cuda")).logits[0].float()
            mine = ours[start:start + len(p)]
            relative = (mine - theirs).norm() / theirs.norm()
            assert relative < 2e-2, f"prompt of {len(p)}: relative error {relative:.3e}"
            start += len(p)


@pytest.mark.parametrize("tensor_parallel_size", [1, pytest.param(2, marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs"))])
def test_graph_replay_equals_eager_on_a_mixed_batch(checkpoint: Path, tensor_parallel_size: int) -> None:
    """With two ranks, the all-reduces and the logits gather captured in the graphs compute what eager ones do."""
    from sfllm import SamplingParams
    prompts = _prompts()
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (40, 3, 17, 64, 5, 30, 8, 50)]
    results = {}
    for graphs in (True, False):
        llm = _llm(checkpoint, dtype="bfloat16", attention_backend="triton", disable_cuda_graph=not graphs,
                   tensor_parallel_size=tensor_parallel_size)
        results[graphs] = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
        del llm
        gc.collect()  # the engine's objects hold reference cycles
        torch.cuda.empty_cache()
    assert results[True] == results[False]
    assert [len(t) for t in results[True]] == [p.max_tokens for p in params]


def test_sampling_inside_the_graph(checkpoint: Path) -> None:
    """Greedy, temperature-only and other rows in one graph batch. Rows the graph samples by itself: greedy
    ones decode as in an all-greedy eager run, temperature 1 samples other tokens. Rows redrawn by the eager
    sampler from the graph's logits (logprobs, a seed, penalties, top-p): the deterministic ones equal an
    eager run of the same batch. The same engine seed samples the same tokens again."""
    from sfllm import SamplingParams

    def params(**kwargs):
        return SamplingParams(max_tokens=24, ignore_eos=True, **kwargs)

    prompts = _prompts()
    greedy = params(temperature=0.0)
    mixed = [greedy, params(temperature=0.5), params(temperature=1.0), params(temperature=0.0, logprobs=2),
             params(temperature=0.8, top_p=0.9), params(temperature=0.9, seed=1234),
             params(temperature=1.0), params(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5)]
    runs = {}
    for name, overrides, batch in (("eager greedy", {"disable_cuda_graph": True}, [greedy] * len(prompts)),
                                   ("eager mixed", {"disable_cuda_graph": True}, mixed),
                                   ("graphs", {}, mixed), ("graphs again", {}, mixed)):
        llm = _llm(checkpoint, dtype="bfloat16", attention_backend="triton", **overrides)
        runs[name] = [r.outputs[0] for r in llm.generate(prompts, batch)]
        assert llm.kv_usage()[0] == llm.kv_usage()[1]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    reference = [o.token_ids for o in runs["eager greedy"]]
    sampled = [o.token_ids for o in runs["graphs"]]
    assert sampled[0] == reference[0] and sampled[3] == reference[3]
    assert sampled[2] != reference[2] and sampled[6] != reference[6], "temperature 1 samples"
    assert all(len(t) == 24 and all(0 <= x < VOCAB for x in t) for t in sampled)
    for row in (3, 5, 7):  # greedy with logprobs, seeded, greedy with penalties
        assert sampled[row] == runs["eager mixed"][row].token_ids, f"row {row}: graph and eager disagree"
    logprobs = runs["graphs"][3].logprobs
    assert len(logprobs) == 24 and all(next(iter(entries)) == token and entries[token].rank == 1
                                       for entries, token in zip(logprobs, sampled[3])), "greedy: the likeliest"
    assert sampled == [o.token_ids for o in runs["graphs again"]], "one engine seed, one draw"


def test_constrained_rows_of_graph_steps_draw_what_eager_steps_draw(checkpoint: Path) -> None:
    """Grammar rows of graph steps are drawn by the eager sampler from the graph's logits, their masks computed
    while the forward runs (overlap on): the same tokens as an eager engine, every constrained answer matches its
    regex, the unconstrained rows beside them are unchanged, and no KV block is left."""
    import re

    from sfllm import SamplingParams
    from sfllm.structured_output import StructuredOutput
    pattern = r"[0-9]{3}-[a-z]{4}"
    constrained = SamplingParams(temperature=0.0, max_tokens=24, structured_output=StructuredOutput.regex(pattern))
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = _prompts()
    params = [constrained if index % 2 else plain for index in range(len(prompts))]
    outputs = {}
    for name, overrides in {"graphs": {"attention_backend": "triton"},
                            "eager": {"attention_backend": "triton", "disable_cuda_graph": True}}.items():
        llm = _llm(checkpoint, **overrides)
        results = llm.generate(prompts, params)
        outputs[name] = [r.outputs[0].token_ids for r in results]
        for result, sampling in zip(results, params):
            if sampling is constrained:
                assert re.fullmatch(pattern, result.outputs[0].text), (name, result.outputs[0].text)
        assert llm.kv_usage()[0] == llm.kv_usage()[1]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert outputs["graphs"] == outputs["eager"]
