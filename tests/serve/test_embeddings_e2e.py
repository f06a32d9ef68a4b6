"""Embedding models served for real, called with the official ``openai`` client: the tiny Qwen3-Embedding through
``longserve serve`` (its engine in a core process), the tiny BERT through in-process apps on loopback.

Vectors equal sentence-transformers' (float and base64), ``dimensions`` truncates and renormalises, an out of
range ``dimensions`` is a 400 naming it, /v1/models says how each model pools, and generation is a 400.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import openai
import pytest
from embedding_models import TEXTS
from servers import serve_app, unused_port, wait_until

from longserve.config import EngineConfig, ServeConfig
from longserve.engine.core_client import EngineCoreClient
from longserve.serve.api_server import create_api_app
from longserve.serve.controller_app import create_controller_app
from longserve.serve.worker_app import create_worker_app

TOL = 1e-4


@dataclass
class Served:
    url: str  # the API server's base URL
    model: str  # the served model name
    path: str  # its checkpoint directory (for the sentence-transformers oracle)
    pooling: str

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def qwen_served(tiny_qwen3_embedding_dir: str) -> Iterator[Served]:
    """``longserve serve`` in a subprocess: API server, controller, worker and the engine core process."""
    ports = {name: unused_port() for name in ("port", "controller-port", "worker-port")}
    command = [sys.executable, "-m", "longserve.cli", "serve", "--model", tiny_qwen3_embedding_dir]
    command += ["--model-name", "qwen3-emb", "--kv-cache-memory-mb", "8"]
    command += [f"--{name}={port}" for name, port in ports.items()]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{ports['port']}"
    try:

        def serving() -> bool:
            assert process.poll() is None, f"longserve serve exited: {process.stderr.read()}"
            with contextlib.suppress(httpx.HTTPError):
                return bool(httpx.get(f"{url}/v1/models", timeout=2).json()["data"])
            return False

        wait_until(serving, timeout=90, what="longserve serve to list the model")
        yield Served(url, "qwen3-emb", tiny_qwen3_embedding_dir, "last")
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def bert_served(tiny_bert_dir: str) -> Iterator[Served]:
    """Controller, worker (in-process EngineCoreClient) and API server apps, each a uvicorn server on loopback."""
    engine = asyncio.run(EngineCoreClient.create(EngineConfig(model=tiny_bert_dir), in_process=True))
    try:
        with serve_app(create_controller_app(ServeConfig())) as controller_url:
            port = unused_port()
            worker_config = ServeConfig(
                controller_address=controller_url, worker_address=f"http://127.0.0.1:{port}", worker_port=port
            )
            with serve_app(create_worker_app(engine, worker_config, "bert"), port=port):
                wait_until(
                    lambda: httpx.post(f"{controller_url}/list_models").json()["models"],
                    what="the worker to register",
                )
                with serve_app(create_api_app(ServeConfig(controller_address=controller_url))) as url:
                    yield Served(url, "bert", tiny_bert_dir, "cls")
    finally:
        engine.shutdown()


@pytest.fixture(params=["qwen_served", "bert_served"])
def served(request) -> Served:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def expected():
    """dir -> sentence-transformers' embeddings of TEXTS (the oracle), computed once."""
    from sentence_transformers import SentenceTransformer

    cache: dict[str, np.ndarray] = {}

    def get(path: str) -> np.ndarray:
        if path not in cache:
            cache[path] = SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_numpy=True)
        return cache[path]

    return get


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_embeddings_equal_sentence_transformers(served: Served, expected) -> None:
    out = served.client.embeddings.create(model=served.model, input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in sorted(out.data, key=lambda d: d.index)])
    assert got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, expected(served.path), atol=TOL, rtol=0)
    assert out.usage.prompt_tokens > len(TEXTS)

    single = served.client.embeddings.create(model=served.model, input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, expected(served.path)[1], atol=TOL, rtol=0)


def test_dimensions_truncate_then_renormalise_in_float_and_base64(served: Served, expected) -> None:
    want = _unit(expected(served.path)[:, :8])
    floats = served.client.embeddings.create(
        model=served.model, input=TEXTS, dimensions=8, encoding_format="float"
    )
    got = np.array([d.embedding for d in floats.data])
    assert got.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    # Asked for explicitly, base64 comes back as the string: little-endian float32.
    packed = served.client.embeddings.create(
        model=served.model, input=TEXTS, dimensions=8, encoding_format="base64"
    )
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data])
    np.testing.assert_allclose(decoded, want, atol=TOL, rtol=0)
    # The client's default (base64, decoded for you) gives the same vectors.
    default = served.client.embeddings.create(model=served.model, input=TEXTS, dimensions=8)
    np.testing.assert_allclose(np.array([d.embedding for d in default.data]), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("dimensions", [0, -3, 65])
def test_dimensions_out_of_range_is_400_naming_it(served: Served, dimensions: int) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        served.client.embeddings.create(model=served.model, input="hello", dimensions=dimensions)
    assert caught.value.status_code == 400
    assert caught.value.param == "dimensions", caught.value.body


def test_models_say_what_the_embeddings_are(served: Served) -> None:
    card = served.client.models.retrieve(served.model).model_dump()
    assert card["pooling"] == served.pooling
    assert card["embedding_only"] is True
    assert card["embedding_dimensions"] == 64 and card["normalized_embeddings"] is True
    listed = [m.model_dump() for m in served.client.models.list()]
    assert [m["pooling"] for m in listed] == [served.pooling]


def test_generation_on_an_embedding_model_is_400(served: Served) -> None:
    client = served.client
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=served.model, prompt="hello", max_tokens=4, stream=stream)
        assert "cannot generate" in caught.value.message and caught.value.param == "model"


def test_chat_on_an_embedding_model_with_a_template_is_400(qwen_served: Served) -> None:
    """Qwen3-Embedding ships a chat template: the messages render, and generating is what gets refused."""
    with pytest.raises(openai.BadRequestError) as caught:
        qwen_served.client.chat.completions.create(
            model=qwen_served.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert "cannot generate" in caught.value.message
