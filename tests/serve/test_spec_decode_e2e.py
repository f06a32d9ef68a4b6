"""Speculative decoding behind the API, driven as users drive it: a stack whose engine speculates
(``speculative_config``, as ``--speculative-config``) streams the same greedy text as plain decoding through
the official client, and /metrics reports vLLM's spec_decode counters."""

import re

import httpx
from stack import MODEL, Stack

from longserve import LLM, SamplingParams

PROMPT = "alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta alpha beta"


def test_streamed_greedy_text_equals_plain_and_metrics_count_drafts(tiny_llama_dir):
    want = LLM(tiny_llama_dir).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    )
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
    with Stack(tiny_llama_dir, 1, engine_options={"speculative_config": spec}) as stack:
        stream = stack.client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=40,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        usage = stack.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
        ).usage
        metrics = httpx.get(f"{stack.api_url}/metrics").text
    assert text == want[0].outputs[0].text
    assert usage.completion_tokens == 40  # accepted drafts count once, as any token
    counts = {
        name: float(value)
        for name, value in re.findall(
            r'^vllm:(spec_decode_\w+)_total\{model_name="tiny"\} (\S+)$', metrics, re.M
        )
    }
    assert counts["spec_decode_num_drafts"] > 0
    assert 0 < counts["spec_decode_num_accepted_tokens"] <= counts["spec_decode_num_draft_tokens"]
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}' in metrics
