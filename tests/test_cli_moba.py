"""MoBA command-line flags: they reach EngineConfig for serve, worker and generate; bad values exit 2."""

import os
import subprocess
import sys

import pytest

from longserve.cli import build_parser
from longserve.engine_options import engine_config_from_args

MOBA_FLAGS = [
    "--attention",
    "moba",
    "--moba-chunk-size",
    "512",
    "--moba-topk",
    "3",
    "--moba-full-layers",
    "2",
]


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["generate", "hi"]])
def test_moba_flags_reach_the_engine_config(command):
    config = engine_config_from_args(build_parser().parse_args([*command, *MOBA_FLAGS]))
    assert (config.attention, config.moba_chunk_size, config.moba_topk, config.moba_full_layers) == (
        "moba",
        512,
        3,
        2,
    )


def test_a_bad_moba_chunk_size_is_an_error_message_and_exit_status_2():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "longserve.cli",
            "generate",
            "hi",
            "--attention",
            "moba",
            "--moba-chunk-size",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert result.returncode == 2
    assert "error: moba chunk_size must be a positive multiple of 16, got 100" in result.stderr
    assert "Traceback" not in result.stderr
