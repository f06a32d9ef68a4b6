"""LoRA behind the API as users drive it: ``--lora-modules`` adapters listed in /v1/models with their parent,
selected by ``model`` in completions, chat, responses and messages; adapters loaded and unloaded at run time through
``/v1/load_lora_adapter`` while streams run; bad adapters refused with 400; routing to the workers that have
an adapter."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from lora_adapters import write_adapter
from stack import MODEL, Stack

from longserve import LLM, SamplingParams

PROMPT = "The quick brown fox"
GREEDY = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served_adapters")
    return {
        "a": write_adapter(tiny_llama_dir, root / "a", seed=1),
        "b": write_adapter(tiny_llama_dir, root / "b", targets=["q_proj", "v_proj"], seed=2),
        "wide": write_adapter(tiny_llama_dir, root / "wide", rank=32, seed=3),
    }


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, adapters):
    """Each adapter's greedy completion of PROMPT, and the base model's, from the offline engine."""
    llm = LLM(tiny_llama_dir, lora_modules=(f"a={adapters['a']}", f"b={adapters['b']}"), max_lora_rank=16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return {lora: llm.generate([PROMPT], params, lora=lora)[0].outputs[0].text for lora in ("a", "b", None)}


def test_adapters_are_models_with_a_parent_and_answer_each_api(tiny_llama_dir, adapters, expected):
    options = {"lora_modules": (f"a={adapters['a']}",), "max_lora_rank": 16, "max_loras": 2}
    with Stack(tiny_llama_dir, 1, engine_options=options) as stack:
        cards = {m.id: m for m in stack.client.models.list().data}
        assert set(cards) == {MODEL, "a"}
        assert cards["a"].parent == MODEL and cards["a"].root == MODEL and cards[MODEL].parent is None
        text = stack.client.completions.create(model="a", prompt=PROMPT, **GREEDY).choices[0].text
        assert text == expected["a"] != expected[None]
        base = stack.client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
        assert base == expected[None]
        chat = stack.client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert chat.model == "a" and chat.choices[0].message.content is not None
        messages = httpx.post(
            f"{stack.api_url}/v1/messages",
            json={"model": "a", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert messages.status_code == 200 and messages.json()["model"] == "a", messages.text
        response = stack.client.responses.create(model="a", input="hi", max_output_tokens=5)
        assert response.model == "a" and response.status in ("completed", "incomplete")
        metrics = httpx.get(f"{stack.api_url}/metrics").text
        assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",' in metrics, metrics[-2000:]


def test_load_and_unload_at_run_time_while_streams_run(tiny_llama_dir, adapters, expected):
    options = {"enable_lora": True, "max_lora_rank": 16}
    with Stack(tiny_llama_dir, 2, engine_options=options) as stack:
        # A long stream on the base model keeps running across every load and unload.
        long_text: list[str] = []

        def stream() -> None:
            chunks = stack.client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            long_text.extend(chunk.choices[0].text for chunk in chunks if chunk.choices)

        thread = threading.Thread(target=stream)
        thread.start()
        load = httpx.post(
            f"{stack.api_url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": adapters["b"]}
        )
        assert load.status_code == 200, load.text
        assert "b" in {m.id for m in stack.client.models.list().data}
        assert (
            stack.client.completions.create(model="b", prompt=PROMPT, **GREEDY).choices[0].text
            == expected["b"]
        )
        # Bad adapters: 400 with the reason, and nothing else changes.
        for body, reason in (
            ({"lora_name": "w", "lora_path": adapters["wide"]}, "exceeds max_lora_rank"),
            ({"lora_name": "x", "lora_path": "/no/such/dir"}, "is not a directory"),
            ({"lora_name": "b", "lora_path": adapters["a"]}, "already loaded"),
            ({"lora_name": MODEL, "lora_path": adapters["a"]}, "base model's name"),
        ):
            refused = httpx.post(f"{stack.api_url}/v1/load_lora_adapter", json=body)
            assert refused.status_code == 400 and reason in refused.json()["error"]["message"], refused.text
        assert httpx.post(f"{stack.api_url}/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
        unload = httpx.post(f"{stack.api_url}/v1/unload_lora_adapter", json={"lora_name": "b"})
        assert unload.status_code == 200, unload.text
        with pytest.raises(openai.NotFoundError):
            stack.client.completions.create(model="b", prompt=PROMPT, max_tokens=2)
        again = httpx.post(f"{stack.api_url}/v1/unload_lora_adapter", json={"lora_name": "b"})
        assert again.status_code == 404, again.text
        thread.join(60)
        assert not thread.is_alive() and len("".join(long_text)) > 0
        assert (
            stack.client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
            == expected[None]
        )


def test_an_adapters_requests_go_only_to_workers_that_have_it(tiny_llama_dir, adapters, expected):
    with Stack(tiny_llama_dir, 2, engine_options={"enable_lora": True, "max_lora_rank": 16}) as stack:
        loaded = httpx.post(
            f"{stack.worker_urls[1]}/load_lora_adapter", json={"lora_name": "a", "lora_path": adapters["a"]}
        )
        assert loaded.status_code == 200, loaded.text
        before = list(stack.added)
        for _ in range(4):
            text = stack.client.completions.create(model="a", prompt=PROMPT, **GREEDY).choices[0].text
            assert text == expected["a"]
        assert stack.added[0] == before[0] and stack.added[1] == before[1] + 4


def test_loading_adapters_needs_the_api_key(tiny_llama_dir, adapters):
    with Stack(tiny_llama_dir, 1, engine_options={"enable_lora": True}, api_keys=("secret",)) as stack:
        body = {"lora_name": "a", "lora_path": adapters["a"]}
        assert httpx.post(f"{stack.api_url}/v1/load_lora_adapter", json=body).status_code == 401
        headers = {"Authorization": "Bearer secret"}
        loaded = httpx.post(f"{stack.api_url}/v1/load_lora_adapter", json=body, headers=headers)
        assert loaded.status_code == 200, loaded.text
