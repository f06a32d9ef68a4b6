"""Embedding checkpoints: a decoder embedder (``Qwen3Model``, last-token pooling) and BERT encoders (CLS / mean
pooling) give sentence-transformers' vectors (fp32, 1e-4) for single and batched inputs of different lengths;
pooling is read from the checkpoint; a chat model keeps its mean-pooled embedding; embedders cannot generate."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from embedding_models import ENDOFTEXT, TEXTS, write_sentence_transformers_files

from longserve.attention.reference import bidirectional_attention, dot_product_attention
from longserve.config import EngineConfig
from longserve.engine.engine import LLMEngine
from longserve.engine.pooling import ChunkPooler
from longserve.engine.protocol import EngineRequest
from longserve.engine.sampling_params import SamplingParams
from longserve.loading.errors import ModelLoadError
from longserve.loading.pooling_config import PoolingConfig, read_pooling_config, truncate_embedding
from longserve.loading.tokenizer import Tokenizer

TOL = 1e-4
EMBEDDING_DIRS = ["tiny_qwen3_embedding_dir", "tiny_bert_dir", "tiny_bert_mean_dir"]


@pytest.fixture(scope="module")
def oracle():
    """dir -> its sentence_transformers.SentenceTransformer, loaded once."""
    from sentence_transformers import SentenceTransformer

    loaded: dict[str, SentenceTransformer] = {}

    def get(path: str) -> SentenceTransformer:
        if path not in loaded:
            loaded[path] = SentenceTransformer(path, device="cpu")
        return loaded[path]

    return get


def _engine(path: str, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, kv_cache_memory_mb=4, **options))


def _embed_texts(engine: LLMEngine, texts: list[str]) -> np.ndarray:
    return np.array(engine.embed_batch([engine.tokenizer.encode(t) for t in texts]))


# ---- against sentence-transformers ----------------------------------------------------------------------


@pytest.mark.parametrize("fixture", EMBEDDING_DIRS)
def test_batched_embeddings_match_sentence_transformers(fixture, request, oracle):
    path = request.getfixturevalue(fixture)
    expected = oracle(path).encode(TEXTS, convert_to_numpy=True)  # one padded batch of different lengths
    got = _embed_texts(_engine(path), TEXTS)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    # Guard: the inputs give clearly different vectors, so matching them means something.
    assert np.abs(expected[0] - expected[1]).max() > 100 * TOL


@pytest.mark.parametrize("fixture", EMBEDDING_DIRS)
def test_single_embedding_matches_sentence_transformers(fixture, request, oracle):
    path = request.getfixturevalue(fixture)
    engine = _engine(path)
    for text in (TEXTS[0], TEXTS[2]):
        expected = oracle(path).encode([text], convert_to_numpy=True)[0]
        got = np.array(engine.embed(engine.tokenizer.encode(text)))
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_pooling_and_normalisation_come_from_the_checkpoint(
    tiny_qwen3_embedding_dir, tiny_bert_dir, tiny_bert_mean_dir
):
    assert _engine(tiny_qwen3_embedding_dir).pooling == PoolingConfig("last", True)
    assert _engine(tiny_bert_dir).pooling == PoolingConfig("cls", True)
    mean = _engine(tiny_bert_mean_dir)
    assert mean.pooling == PoolingConfig("mean", False)
    norms = np.linalg.norm(_embed_texts(mean, TEXTS[:2]), axis=1)
    assert np.all(np.abs(norms - 1) > 0.1), norms  # no Normalize module: not unit vectors


def test_long_decoder_input_pooled_over_chunks_matches_sentence_transformers(
    tiny_qwen3_embedding_dir, oracle
):
    """A prompt longer than the step's token budget runs in chunks through the paged cache."""
    text = " ".join(TEXTS * 4)
    engine = _engine(tiny_qwen3_embedding_dir, max_num_batched_tokens=64, max_num_seqs=8)
    ids = engine.tokenizer.encode(text)
    assert len(ids) > 2 * 64
    expected = oracle(tiny_qwen3_embedding_dir).encode([text], convert_to_numpy=True)[0]
    np.testing.assert_allclose(np.array(engine.embed(ids)), expected, atol=TOL, rtol=0)


def test_encoder_batches_split_by_the_token_budget_give_the_same_vectors(tiny_bert_dir, oracle):
    engine = _engine(tiny_bert_dir, max_num_batched_tokens=16, max_num_seqs=4)
    calls = []
    encode = engine.model.encode
    engine.model.encode = lambda ids, lens: calls.append(list(lens)) or encode(ids, lens)
    got = _embed_texts(engine, TEXTS)
    assert len(calls) > 1 and all(sum(c) <= 16 or len(c) == 1 for c in calls), calls
    np.testing.assert_allclose(got, oracle(tiny_bert_dir).encode(TEXTS, convert_to_numpy=True), atol=TOL)


# ---- tokenizers ------------------------------------------------------------------------------------------


def test_tokenizers_add_what_the_checkpoint_says(tiny_qwen3_embedding_dir, tiny_bert_dir, oracle):
    for path in (tiny_qwen3_embedding_dir, tiny_bert_dir):
        ours = Tokenizer.from_hf_dir(path)
        assert [ours.encode(t) for t in TEXTS] == oracle(path).tokenizer(TEXTS)["input_ids"]
    qwen = Tokenizer.from_hf_dir(tiny_qwen3_embedding_dir)
    assert qwen.encode("hello")[-1] == qwen.token_to_id(ENDOFTEXT)  # the token last-token pooling reads
    bert = Tokenizer.from_hf_dir(tiny_bert_dir)
    ids = bert.encode("Hello world")
    assert (ids[0], ids[-1]) == (bert.token_to_id("[CLS]"), bert.token_to_id("[SEP]"))
    assert bert.encode("Hello world", add_special_tokens=False) == ids[1:-1]


def test_add_bos_false_without_a_bos_token_keeps_the_checkpoints_post_processor(
    tiny_qwen3_embedding_dir, tmp_path
):
    """Qwen's tokenizer_config says ``add_bos_token: false`` and has no BOS: the appended EOS must stay."""
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_qwen3_embedding_dir, copy)
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(add_bos_token=False, bos_token=None)
    config_file.write_text(json.dumps(config))
    tokenizer = Tokenizer.from_hf_dir(copy)
    assert tokenizer.encode("hello")[-1] == tokenizer.token_to_id(ENDOFTEXT)


# ---- generation is refused --------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_qwen3_embedding_dir", "tiny_bert_dir"])
def test_embedding_models_cannot_generate(fixture, request):
    engine = _engine(request.getfixturevalue(fixture))
    assert not engine.limits.can_generate
    assert engine.limits.embedding_size == 64
    with pytest.raises(ValueError, match="cannot generate"):
        engine.add_request(EngineRequest("r", [5, 6], SamplingParams()))
    with pytest.raises(ValueError, match="cannot generate"):
        engine.limits.check_prompt([5, 6], SamplingParams())


def test_decoder_embedder_has_no_output_head(tiny_qwen3_embedding_dir):
    engine = _engine(tiny_qwen3_embedding_dir)
    with pytest.raises(ValueError, match="no output head"):
        engine.model.compute_logits(torch.zeros(1, 64))


# ---- chat models keep the mean of their hidden states --------------------------------------------------


def test_chat_model_embedding_is_the_normalised_mean_of_final_hidden_states(tiny_llama_dir):
    import transformers

    engine = _engine(tiny_llama_dir)
    assert engine.limits.can_generate and engine.pooling == PoolingConfig("mean", True)
    ids = engine.tokenizer.encode("The quick brown fox")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # final norm applied
    expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
    np.testing.assert_allclose(np.array(engine.embed(ids)), expected.numpy(), atol=TOL, rtol=0)


# ---- pieces --------------------------------------------------------------------------------------------------


def test_read_pooling_config_forms_and_errors(tmp_path):
    assert read_pooling_config(str(tmp_path)) is None  # no modules.json: not a sentence-transformers dir
    for pooling, expected in (("cls", "cls"), ("mean", "mean"), ("lasttoken", "last")):
        directory = tmp_path / pooling
        write_sentence_transformers_files(
            directory, hidden_size=8, pooling=pooling, normalize=pooling == "cls", max_seq_length=16
        )
        assert read_pooling_config(str(directory)) == PoolingConfig(expected, pooling == "cls")
    # sentence-transformers >= 5 writes one pooling_mode string and its own module paths
    new = tmp_path / "new"
    (new / "1_Pooling").mkdir(parents=True)
    (new / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
                {
                    "idx": 1,
                    "path": "1_Pooling",
                    "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
                },
                {
                    "idx": 2,
                    "path": "2_Normalize",
                    "type": "sentence_transformers.base.modules.normalize.Normalize",
                },
            ]
        )
    )
    (new / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    assert read_pooling_config(str(new)) == PoolingConfig("last", True)

    (new / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(ModelLoadError, match="'max' is not supported"):
        read_pooling_config(str(new))
    modules = json.loads((new / "modules.json").read_text())
    modules.append({"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (new / "modules.json").write_text(json.dumps(modules))
    (new / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    with pytest.raises(ModelLoadError, match="Dense"):
        read_pooling_config(str(new))


def test_unsupported_pipeline_fails_the_load(tiny_bert_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_bert_dir, copy)
    modules = json.loads((copy / "modules.json").read_text())
    modules.append({"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (copy / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match=os.path.basename(str(copy)) + ".*Dense"):
        _engine(str(copy))


def test_bidirectional_attention_sees_later_keys_and_not_other_sequences():
    torch.manual_seed(0)
    q, k, v = (torch.randn(7, 2, 4) for _ in range(3))
    out = bidirectional_attention(q, k, v, [3, 4], scale=0.5)
    full = torch.full((3,), 3)
    torch.testing.assert_close(out[:3], dot_product_attention(q[:3], k[:3], v[:3], full, 0.5))
    causal = dot_product_attention(q[:3], k[:3], v[:3], torch.arange(1, 4), 0.5)
    assert not torch.allclose(out[:3], causal)  # the first query sees the later keys
    torch.testing.assert_close(out[3:], bidirectional_attention(q[3:], k[3:], v[3:], [4], scale=0.5))


def test_chunk_pooler_matches_whole_sequence_pooling():
    hidden = torch.randn(10, 6)
    for mode, expected in (("cls", hidden[0]), ("mean", hidden.mean(0)), ("last", hidden[-1])):
        pooler = ChunkPooler(PoolingConfig(mode, False))
        for chunk in hidden.split([4, 3, 3]):
            pooler.add(chunk)
        torch.testing.assert_close(pooler.result(), expected)
    normalized = ChunkPooler(PoolingConfig("mean", True))
    normalized.add(hidden)
    assert float(normalized.result().norm()) == pytest.approx(1.0)


def test_truncate_embedding_is_matryoshka():
    vector = [3.0, 4.0, 12.0]
    assert truncate_embedding(vector, 2, normalize=True) == pytest.approx([0.6, 0.8])
    assert truncate_embedding(vector, 2, normalize=False) == [3.0, 4.0]
    assert truncate_embedding(vector, 3, normalize=False) == vector
    for bad in (0, 4):
        with pytest.raises(ValueError, match="dimensions"):
            truncate_embedding(vector, bad, normalize=True)
