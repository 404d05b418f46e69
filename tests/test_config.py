"""Configuration: flag > environment > config file > default; profiles; unknown keys named."""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sfllm.cli import main
from sfllm.config import FIELDS, ConfigError, ServerConfig, add_config_arguments, load_config, write_config_file

REPO = Path(__file__).resolve().parent.parent


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(list(argv))


def test_precedence_flag_over_environment_over_file_over_default(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("cuda_graph_max_bs: 8\nmax_running_tokens: 1000\nport: 9000\n")
    env = {"SFLLM_CUDA_GRAPH_MAX_BS": "64", "SFLLM_MAX_RUNNING_TOKENS": "2000"}
    config = load_config(_args("--config", str(profile), "--cuda-graph-max-bs", "128"), environ=env)
    assert config.cuda_graph_max_bs == 128          # flag
    assert config.max_running_tokens == 2000        # environment over file
    assert config.port == 9000                      # file over default
    assert config.block_size == ServerConfig().block_size  # default


def test_unknown_key_in_a_file_is_an_error_naming_it(tmp_path: Path) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("max_runing_tokens: 10\n")
    with pytest.raises(ConfigError, match="max_runing_tokens"):
        load_config(_args("--config", str(profile)), environ={})


def test_vllms_and_sglangs_names_set_the_same_settings(tmp_path: Path) -> None:
    """As their users pass them: LLM(...) keywords, flags, a config file's keys; vLLM's enable_prefix_caching is
    sfllm's disable_prefix_cache negated; trust_remote_code is accepted and does nothing."""
    vllm = load_config(environ={}, max_model_len=512, gpu_memory_utilization=0.5, max_num_seqs=8,
                       max_num_batched_tokens=1024, enforce_eager=True, enable_prefix_caching=False,
                       max_cudagraph_capture_size=16, trust_remote_code=True)
    assert (vllm.max_context_length, vllm.mem_fraction, vllm.max_running_requests, vllm.max_running_tokens,
            vllm.disable_cuda_graph, vllm.disable_prefix_cache, vllm.cuda_graph_max_bs) == (512, 0.5, 8, 1024, True,
                                                                                             True, 16)
    defaults = ServerConfig()
    unset = load_config(environ={}, max_num_seqs=None, max_num_batched_tokens=None, seed=None)  # vLLM's None
    assert (unset.max_running_requests, unset.max_running_tokens, unset.seed) == (
        defaults.max_running_requests, defaults.max_running_tokens, defaults.seed)
    assert load_config(environ={}, enable_prefix_caching=True).disable_prefix_cache is False
    assert (load_config(_args("--dtype", "half"), environ={}).dtype, load_config(environ={}, dtype="float").dtype) == (
        "float16", "float32"), "vLLM's dtype names"
    copied = load_config(_args("--enable-chunked-prefill", "True", "--disable-custom-all-reduce", "--tool-call-parser",
                               "qwen25"), environ={})
    assert copied.tool_call_parser == "hermes", "SGLang's name of the format"
    assert load_config(environ={}, tool_call_parser="llama3").tool_call_parser == "llama3_json"
    assert load_config(_args("--enable-chunked-prefill=true", "--tool-call-parser", "qwen"),
                       environ={}).tool_call_parser == "hermes"
    profile = tmp_path / "sglang.yaml"
    profile.write_text("context_length: 300\nmem_fraction_static: 0.7\nchunked_prefill_size: 2048\n"
                       "disable_radix_cache: true\ntp_size: 2\nrandom_seed: 9\n")
    sglang = load_config(_args("--config", str(profile)), environ={})
    assert (sglang.max_context_length, sglang.mem_fraction, sglang.max_running_tokens, sglang.disable_prefix_cache,
            sglang.tensor_parallel_size, sglang.seed) == (300, 0.7, 2048, True, 2, 9)
    flags = load_config(_args("--model-path", "m", "--max-model-len", "700", "--gpu-memory-utilization", "0.6",
                              "--no-enable-prefix-caching", "--enforce-eager", "--trust-remote-code", "-tp", "2",
                              "--enable-auto-tool-choice"),
                        environ={})
    assert (flags.model, flags.max_context_length, flags.mem_fraction, flags.disable_prefix_cache,
            flags.disable_cuda_graph, flags.tensor_parallel_size) == ("m", 700, 0.6, True, True, 2)
    assert load_config(_args("--disable-prefix-cache", "--enable-prefix-caching"), environ={}).disable_prefix_cache \
        is False, "the last flag for a setting wins, as argparse has it"
    with pytest.raises(ConfigError, match="max_model_len and max_context_length both set max_context_length"):
        load_config(environ={}, max_model_len=512, max_context_length=256)
    with pytest.raises(ConfigError, match=r"max_running_requests must be int; got .many. \(given as max_num_seqs\)"):
        load_config(environ={}, max_num_seqs="many")
    for keywords, message in (({"gpu_memory_utilization": 1.5}, r"mem_fraction must be in \(0, 1\]; got 1.5 \(given as "
                                                                  r"gpu_memory_utilization\)"),
                              ({"chunked_prefill_size": -1}, r"max_running_tokens must be positive; got -1 \(given as "
                                                             r"chunked_prefill_size\)"),
                              ({"max_model_len": True}, r"max_context_length must be int; got True"),
                              ({"gpu_memory_utilization": False}, r"mem_fraction must be float; got False")):
        with pytest.raises(ConfigError, match=message):
            load_config(environ={}, **keywords)
    with pytest.raises(ConfigError, match=r"mem_fraction must be in \(0, 1\]; got 2.0$"):  # sfllm's name: no other
        load_config(_args("--mem-fraction", "2"), environ={})
    for flags, message in ((("--gpu-memory-utilization", "1.5"), r"got 1.5 \(given as --gpu-memory-utilization\)$"),
                           (("--max-model-len", "abc"), r"must be int; got 'abc' \(given as --max-model-len\)$"),
                           (("--max-num-seqs", "0", "--max-running-requests", "0"), r"positive; got 0$")):
        with pytest.raises(ConfigError, match=message):  # the flag typed is named; sfllm's own, last, names nothing
            load_config(_args(*flags), environ={})
    with pytest.raises(ConfigError, match=r"in .*sglang.yaml, given as tp_size"):
        profile.write_text("tp_size: two\n")
        load_config(_args("--config", str(profile)), environ={})


def test_bad_values_are_errors_with_the_value() -> None:
    with pytest.raises(ConfigError, match="attention_backend"):
        load_config(_args("--attention-backend", "magic"), environ={})
    with pytest.raises(ConfigError, match="mem_fraction"):
        load_config(_args(), environ={"SFLLM_MEM_FRACTION": "1.5"})
    with pytest.raises(ConfigError, match="disable_cuda_graph"):
        load_config(_args(), environ={"SFLLM_DISABLE_CUDA_GRAPH": "maybe"})
    with pytest.raises(ConfigError, match="high_priority_slots must be at least 0; got -1"):
        load_config(_args("--high-priority-slots", "-1"), environ={})
    assert load_config(_args("--high-priority-slots", "0"), environ={}).high_priority_slots == 0
    with pytest.raises(ConfigError, match="high_priority_step_tokens must be at least 0; got -1"):
        load_config(_args("--high-priority-step-tokens", "-1"), environ={})


@pytest.mark.parametrize("flags, message", [
    (("--background-share", "7"), r"background_share must be in \[0, 1\]; got 7.0"),
    (("--background-share", "-1"), r"background_share must be in \[0, 1\]; got -1.0"),
    (("--max-background-wait-s", "-5"), "max_background_wait_s must be at least 0; got -5.0"),
    (("--cpu-kv-cache-gib", "-1"), "cpu_kv_cache_gib must be at least 0; got -1.0"),
    (("--drain-timeout-s", "nan"), "drain_timeout_s must be a finite number; got nan"),
    (("--request-timeout-s", "nan"), "request_timeout_s must be a finite number; got nan"),
    (("--engine-address", "foo://bar"), "engine_address must be ipc://<path> or tcp://<host>:<port>; got 'foo://bar'"),
])
def test_out_of_range_values_are_refused_before_anything_starts(flags: tuple[str, ...], message: str) -> None:
    """A share of -1 split the batch's slots into more than there were; a bad engine address started every
    process, then failed in each."""
    with pytest.raises(ConfigError, match=message):
        load_config(_args(*flags), environ={})
    assert load_config(_args("--background-share", "0", "--engine-address", "tcp://127.0.0.1:5555"),
                       environ={}).background_share == 0.0


@pytest.mark.parametrize("content, message", [
    (b"max_running_tokens: [1, 2\n", r"is not valid YAML \(line 2\)"),
    (b"\xff\xfe bad", "cannot read config file .*: 'utf-8' codec can't decode"),
    (b"- a\n- b\n", "must be a mapping of keys to values"),
])
def test_a_config_file_that_cannot_be_read_is_one_line_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as refused:
        load_config(_args("--config", str(profile)), environ={})
    assert str(profile) in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'absent.yaml'} does not exist, nor is it a "
                                          r"profile sfllm ships \(cpu, h100, "):
        load_config(_args("--config", str(tmp_path / "absent.yaml")), environ={})
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        load_config(_args("--config", str(tmp_path)), environ={})


def test_a_profile_sfllm_ships_is_found_by_its_name_where_no_checkout_is(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config configs/h100.yaml` as README says, run outside a checkout (a pip install, the Docker image): the
    shipped profile; a path elsewhere names the user's own file, and its absence is an error."""
    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((REPO / "configs" / "h100.yaml").read_text())
    for name in ("configs/h100.yaml", "h100.yaml", "h100"):
        assert load_config(_args("--config", name), environ={}).model == shipped["model"], name
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_args("--config", str(tmp_path / "configs" / "h100.yaml")), environ={})
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "h100.yaml").write_text("model: mine\n")
    assert load_config(_args("--config", "configs/h100.yaml"), environ={}).model == "mine", "the user's own first"


def test_environment_values_are_named_in_errors_and_unknown_variables_are_warned_of(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"port must be int; got 'abc' \(from the environment's SFLLM_PORT\)"):
        load_config(_args(), environ={"SFLLM_PORT": "abc"})
    profile = tmp_path / "p.yaml"
    profile.write_text("port: abc\n")
    with pytest.raises(ConfigError, match=f"port must be int; got 'abc' \\(in {profile}\\)"):
        load_config(_args("--config", str(profile)), environ={})
    with caplog.at_level("WARNING", logger="sfllm.config"):
        config = load_config(_args(), environ={"SFLLM_CUDA_GRAPH_MAXBS": "8", "SFLLM_CUDA_GRAPH_MAX_BS": "16"})
    assert config.cuda_graph_max_bs == 16
    assert [record.getMessage() for record in caplog.records] == [
        "SFLLM_CUDA_GRAPH_MAXBS is not an sfllm setting (no config key 'cuda_graph_maxbs'): ignored"]


@pytest.mark.parametrize("overrides, message", [
    (dict(num_kv_blocks=-4), "num_kv_blocks must be positive; got -4"),
    (dict(max_context_length=0), "max_context_length must be positive; got 0"),
    (dict(block_size=7), "block_size must be a power of two"),
    (dict(max_running_tokens="abc"), "max_running_tokens must be int; got 'abc'"),
    (dict(port=99999), r"port must be in \[1, 65535\]; got 99999"),
    (dict(num_kv_blocks=0.5), "num_kv_blocks must be int; got 0.5"),
    (dict(max_running_tokens=float("inf")), "max_running_tokens must be int; got inf"),
])
def test_bad_sizes_and_types_given_as_keywords_are_errors_naming_them(overrides: dict, message: str) -> None:
    """LLM(**keywords) passes them to load_config: checked and converted as flags and files are."""
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, **overrides)
    assert load_config(environ={}, max_running_tokens="4096", block_size=32).max_running_tokens == 4096


@pytest.mark.parametrize("profile", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_profile_loads(profile: Path) -> None:
    config = load_config(_args("--config", str(profile)), environ={})
    assert set(yaml.safe_load(profile.read_text())) <= set(config.to_dict())


def test_guide_profiles_carry_the_guides_values_but_the_decode_graphs() -> None:
    rtx4090 = load_config(_args("--config", str(REPO / "configs" / "rtx4090.yaml")), environ={})
    assert (rtx4090.max_context_length, rtx4090.max_running_tokens) == (16384, 32768)
    assert rtx4090.dtype == "float16"
    assert rtx4090.cuda_graph_max_bs is None, "measured slower than the default: the worker chooses from memory"


def _options(part: object) -> dict[str, object]:
    """A process's configuration as options: the parts it hands on (the engine's scheduler and worker) flattened."""
    options: dict[str, object] = {}
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        options |= _options(value) if dataclasses.is_dataclass(value) else {f.name: value}
    return options


def test_each_process_gets_its_part_and_every_option_reaches_one() -> None:
    config = ServerConfig(model="m", port=9000, api_key="k", max_n=3, block_size=8, device="cpu", profile_dir="p")
    parts = {"frontend": _options(config.frontend()), "engine": _options(config.engine()),
             "worker": _options(config.worker())}
    resolved = {"run_dir": config.resolved_run_dir(), "engine_address": config.resolved_engine_address()}
    for process, options in parts.items():
        for name, value in options.items():
            assert value == resolved.get(name, getattr(config, name)), (process, name)
    # launch alone reads frontend_processes: it starts that many frontends
    assert set(FIELDS) - set().union(*parts.values()) == {"frontend_processes"}
    assert set(parts["frontend"]) & set(parts["worker"]) == {"log_level"}, "the frontend knows no model or device"
    assert "api_key" in parts["frontend"] and "api_key" not in parts["engine"] | parts["worker"]
    assert config.engine().model_name == "m" and ServerConfig(served_model_name="n").engine().model_name == "n"


def test_the_workers_config_file_gives_it_the_same_config(tmp_path: Path) -> None:
    worker = ServerConfig(model="m", tensor_parallel_size=2, num_kv_blocks=64, disable_cuda_graph=True).worker()
    write_config_file(dataclasses.asdict(worker), tmp_path / "worker.yaml")
    assert load_config(_args("--config", str(tmp_path / "worker.yaml")), environ={}).worker() == worker


def test_launch_picks_its_profile_by_what_torch_would_say_without_importing_torch() -> None:
    """Whether CUDA is there is read from torch's build and asked of the driver: torch's own answer (the CPU
    profile here, none on a GPU host), without the import that took each launch 1.6 s before it started anything."""
    import torch

    from sfllm.cuda_presence import cuda_available
    from sfllm.shipped_profiles import shipped_profile
    assert cuda_available() == torch.cuda.is_available()
    check = ("import argparse, sys\n"
             "from sfllm import cli\n"
             "args = argparse.Namespace(config=None)\n"
             "cli._default_profile(args)\n"
             "print(args.config, 'torch' in sys.modules)\n")
    for hidden in (False, True):  # CUDA_VISIBLE_DEVICES applies, as for torch
        env = os.environ | ({"CUDA_VISIBLE_DEVICES": ""} if hidden else {})
        done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=REPO,
                              env=env)
        assert done.returncode == 0, done.stderr
        cuda = torch.cuda.is_available() and not hidden
        assert done.stdout.split() == [str(None if cuda else shipped_profile("cpu")), "False"], hidden


@pytest.mark.parametrize("build, devices, torch_says, expected", [
    ({"cuda": None, "hip": None}, 1, None, False),  # a CPU build: no device it could use
    ({"cuda": "12.8", "hip": None}, 2, None, True),  # the driver counts devices: torch is not asked
    ({"cuda": "12.8", "hip": None}, 0, None, False),  # none visible (CUDA_VISIBLE_DEVICES, or no GPU)
    ({"cuda": "12.8", "hip": None}, None, True, True),  # no driver library found: torch decides
    ({"cuda": None, "hip": "6.2"}, None, True, True),  # ROCm: torch decides
    (None, None, False, False),  # an unreadable build: torch decides
])
def test_the_cuda_check_asks_torch_only_where_it_cannot_tell(monkeypatch: pytest.MonkeyPatch, build: dict | None,
                                                             devices: int | None, torch_says: bool | None,
                                                             expected: bool) -> None:
    import torch

    from sfllm import cuda_presence

    def torch_answer() -> bool:
        assert torch_says is not None, "torch was asked where the build and the driver tell"
        return torch_says
    monkeypatch.setattr(cuda_presence, "_torch_build", lambda: build)
    monkeypatch.setattr(cuda_presence, "_driver_device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "is_available", torch_answer)
    assert cuda_presence.cuda_available() is expected


def test_python_dash_m_sfllm_works() -> None:
    ok = subprocess.run([sys.executable, "-m", "sfllm", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "launch" in ok.stdout


def test_a_bad_flag_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "--attention-backend", "magic"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("sfllm launch: error: attention_backend must be one of ")
    assert "usage:" not in err, "a bad value is no misuse of the flags: one line, not the 40-line usage"
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "--no-such-flag"])
    assert exit_.value.code == 2 and "usage:" in capsys.readouterr().err


def test_the_model_may_come_first_as_vllm_serve_takes_it(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    launched = []
    monkeypatch.setattr("sfllm.launcher.launch", lambda config: launched.append(config) or 0)
    assert main(["serve", "qwen3-0.6b", "--load-format", "dummy", "--max-model-len", "512"]) == 0
    assert main(["launch", "--max-num-seqs", "8", "qwen3-0.6b"]) == 0
    assert main(["serve", "--trust-remote-code", "qwen3-1.7b"]) == 0  # a flag of no value leaves the model alone
    assert [(c.model, c.max_context_length, c.max_running_requests) for c in launched] == [
        ("qwen3-0.6b", 512, ServerConfig().max_running_requests), ("qwen3-0.6b", None, 8),
        ("qwen3-1.7b", None, ServerConfig().max_running_requests)]
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "qwen3-0.6b", "--model", "qwen3-8b"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "two models: 'qwen3-0.6b' and --model 'qwen3-8b'; give one" in err
    with pytest.raises(SystemExit):
        main(["serve", "--max-num-seqs", "0"])
    assert capsys.readouterr().err.startswith("sfllm serve: error: max_running_requests must be positive; got 0 "
                                              "(given as --max-num-seqs)"), "the verb and the flag typed"


@pytest.mark.parametrize("flags, message", [
    (("--host", "nosuchhost.invalid"), "cannot bind to host 'nosuchhost.invalid': "),
    (("--host", "192.0.2.1"), "192.0.2.1 is not an address of this machine"),
    (("--run-dir", "/etc/passwd/run"), "cannot use run directory /etc/passwd/run: Not a directory; pass another"),
])
def test_launch_says_what_is_wrong_with_its_address_or_run_dir(caplog: pytest.LogCaptureFixture,
                                                                flags: tuple[str, ...], message: str) -> None:
    """Every bind error read "port ... is already in use" (a bad --host too), and a run directory under a file
    ended in a traceback; launch fails before it starts any process."""
    from servers import free_port
    with caplog.at_level("ERROR", logger="sfllm.launcher"):
        assert main(["launch", "--port", str(free_port()), *flags]) == 2
    assert [record.getMessage() for record in caplog.records if record.name == "sfllm.launcher"][0].startswith(message)
