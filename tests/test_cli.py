"""``longserve generate`` as a user runs it: a subprocess, text on stdout, stats and errors on stderr."""

import os
import subprocess
import sys

import pytest


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
    ],
)
def test_generate_reports_bad_input_without_a_traceback(args, message):
    result = _run("generate", "hi", "--max-tokens", "2", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
