"""The default GGUF model (SmolLM2-135M-Instruct Q4_1): our logits and greedy text equal transformers'.

transformers dequantizes the same GGUF file itself, so this also checks our GGUF reading (Q/K permutation,
dequantization, tied embeddings) and our tokenizer and chat template end to end.
"""

import os

import pytest
import torch

from longserve import LLM, SamplingParams
from longserve.engine.protocol import EngineRequest
from longserve.loading.default_model import default_model_path

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in two sentences."}]


@pytest.fixture(scope="module")
def hf_model_and_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    directory, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="float32")


@pytest.mark.parametrize(
    ("quantization", "kv_cache_dtype", "tolerance"),
    [
        ("none", "auto", 1e-3),
        ("gguf", "float32", 1e-2),  # 16-bit activation blocks, ~5e-3 after 30 layers
        ("gguf", "auto", 5e-2),  # as served: plus keys and values rounded to fp16, ~2e-2
    ],
    ids=["exact", "blocks", "blocks-fp16-cache"],
)
def test_logits_match_transformers_on_the_default_gguf(
    llm, hf_model_and_tokenizer, quantization, kv_cache_dtype, tolerance
):
    model, tokenizer = hf_model_and_tokenizer
    if (quantization, kv_cache_dtype) != ("gguf", "auto"):  # the llm fixture is the default (auto) setup
        llm = LLM(None, dtype="float32", quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert llm.tokenizer.encode(prompt) == ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].float()
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=0, prompt_logprobs=0))[0]
    # Whole-vocabulary logits of the last prompt position, through the engine's model runner.
    engine = llm.engine
    engine.add_request(EngineRequest("logits", ids, SamplingParams(max_tokens=1)))
    plan = engine.scheduler.schedule()
    ours = engine.runner.execute(plan.scheduled).sample_logits[0]
    engine.abort("logits")
    engine.step()
    torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance)
    assert out.outputs[0].token_ids[0] == int(expected.argmax())


def test_greedy_chat_text_matches_transformers_for_64_tokens(llm, hf_model_and_tokenizer):
    model, tokenizer = hf_model_and_tokenizer
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
    # min_tokens masks EOS exactly as transformers' min_new_tokens does, so both run the full 64 tokens.
    ours = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=64, min_tokens=64))[0].outputs[0]
    assert ours.token_ids == generated
    assert ours.text == tokenizer.decode(generated, skip_special_tokens=True)
    assert "Paris" in ours.text


def test_greedy_output_alone_equals_batched_with_15_others_on_the_default_model(llm):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (16,), generator=generator).tolist()
    prompts = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    batched = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    alone = [llm.generate([prompt], params)[0].outputs[0].token_ids for prompt in prompts]
    assert batched == alone
