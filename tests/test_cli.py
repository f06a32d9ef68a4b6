"""The command line as a user runs it: a subprocess, text on stdout, stats and errors on stderr."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from longserve.cli import build_parser
from longserve.config import EngineConfig
from longserve.engine_options import engine_config_from_args


def _run(*args, timeout=180):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "longserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_generate_streams_a_raw_completion_with_a_tiny_model(tiny_llama_dir):
    result = _run(
        "generate",
        "The quick brown fox",
        "--model",
        tiny_llama_dir,
        "--no-chat",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "12 generated" in result.stderr and "finish: length" in result.stderr
    spec = '{"method": "suffix", "num_speculative_tokens": 3}'
    speculating = _run(
        "generate", "The quick brown fox", "--model", tiny_llama_dir, "--no-chat", "--max-tokens", "12",
        "--temperature", "0", "--speculative-config", spec,
    )  # fmt: skip
    assert speculating.returncode == 0, speculating.stderr
    assert speculating.stdout == result.stdout


def test_generate_applies_the_chat_template_and_answers_with_the_default_model():
    result = _run("generate", "What is the capital of France?", "--temperature", "0", "--max-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model.gguf"], "does not exist"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--speculative-config", '{"method": "eagle"}'], "method must be one of"),
    ],
)
def test_generate_reports_bad_input_without_a_traceback(args, message):
    result = _run("generate", "hi", "--max-tokens", "2", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_engine_flags_reach_the_engine_config():
    args = build_parser().parse_args(["serve", "--max-num-batched-tokens", "96", "--max-num-seqs", "8"])
    config = engine_config_from_args(args)
    assert (config.max_num_batched_tokens, config.max_num_seqs) == (96, 8)
    assert (
        engine_config_from_args(build_parser().parse_args(["serve"])).max_num_batched_tokens is None
    )  # by device


def test_kv_cache_dtype_reaches_the_engine_config_and_bad_values_are_refused():
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "float32"])
    assert engine_config_from_args(args).kv_cache_dtype == "float32"
    assert engine_config_from_args(build_parser().parse_args(["serve"])).kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        EngineConfig(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="on a GPU the cache holds --dtype"):
        EngineConfig(device="cuda", dtype="bfloat16", kv_cache_dtype="float16")


def test_unknown_arguments_are_still_errors_outside_bench():
    result = _run("generate", "hi", "--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr


def test_bench_help_lists_the_load_generator_options():
    result = _run("bench", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: longserve bench")
    for option in ("--base-url", "--concurrency", "--max-tokens", "--json"):
        assert option in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(model_dir: str, *extra: str):
    """``longserve serve`` on free loopback ports; yields the OpenAI base URL once the model is listed."""
    port = _free_port()
    ports = [f"--port={port}", f"--controller-port={_free_port()}", f"--worker-port={_free_port()}"]
    command = [sys.executable, "-m", "longserve.cli", "serve", "--model", model_dir, *ports, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/models", timeout=5).json()["data"]:
                    break
            assert time.monotonic() < deadline, "longserve serve did not list its model in time"
            time.sleep(0.3)
        yield base_url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def test_bench_measures_a_real_server(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    with _serving(tiny_llama_dir, "--model-name", "tiny", "--max-num-batched-tokens", "64") as base_url:
        options = "-n 4 -c 2 --max-tokens 6 --ignore-eos".split()
        result = _run("bench", "--base-url", base_url, *options, "--json", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4/4 ok" in result.stdout
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    assert doc["config"]["model"] == "tiny" and summary["token_count_source"] == "usage"
    assert summary["output_tokens"] == 24 and summary["ttft"]["count"] == 4
    assert all(r["finish_reason"] == "length" for r in doc["requests"])


def test_lora_flags_reach_the_engine_config():
    argv = ["serve", "--lora-modules", "a=/x/a", '{"name": "b", "path": "/x/b"}', "--max-loras", "3",
            "--max-lora-rank", "32", "--max-cpu-loras", "5"]  # fmt: skip
    config = engine_config_from_args(build_parser().parse_args(argv))
    assert config.lora_paths() == {"a": "/x/a", "b": "/x/b"} and config.lora_enabled
    assert (config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (3, 32, 5)
    assert not engine_config_from_args(build_parser().parse_args(["serve"])).lora_enabled
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora-modules", "no-path"])
    with pytest.raises(ValueError, match="max_cpu_loras"):
        engine_config_from_args(
            build_parser().parse_args(["serve", "--max-loras", "4", "--max-cpu-loras", "2"])
        )
