"""Tiny random embedding checkpoints (fp32, seeded) as sentence-transformers ships them, built for tests.

- ``write_tiny_qwen3_embedding``: a ``Qwen3Model`` (no ``model.`` prefix, no lm_head) whose tokenizer.json appends
  ``<|endoftext|>`` in its post-processor, with modules.json -> last-token Pooling -> Normalize (Qwen3-Embedding's
  layout, legacy ``pooling_mode_*`` keys as the hub files have them).
- ``write_tiny_bert``: a ``BertModel`` with a WordPiece tokenizer.json ([CLS] ... [SEP] post-processor) and a
  CLS or mean Pooling, with or without Normalize.

``sentence_transformers.SentenceTransformer(directory)`` loads each one and is the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import _CORPUS, CHATML_TEMPLATE, SEED, train_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Texts of different lengths (a batch pads them), some with words outside the tiny vocabularies.
TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Paged memory splits the cache into fixed-size blocks, so sequences of any length share one pool; "
    "continuous batching adds new requests as soon as old ones finish.",
    "Zebras quietly xylophone!",
]


def randomize_(model: torch.nn.Module) -> None:
    """Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.2), norm weights ~ 1 + N(0, 0.1): far from HF's init, so a
    wrong norm, bias, mask or pooling moves embeddings well beyond the tolerances."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if "norm" in name.lower() and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_sentence_transformers_files(
    directory: Path, *, hidden_size: int, pooling: str, normalize: bool, max_seq_length: int
) -> None:
    """modules.json, 1_Pooling/config.json (legacy boolean keys), [2_Normalize], sentence_bert_config.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
        (directory / "2_Normalize").mkdir(parents=True, exist_ok=True)
    _write_json(directory / "modules.json", modules)
    _write_json(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": pooling == "lasttoken",
            "include_prompt": True,
        },
    )
    _write_json(
        directory / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False}
    )


def write_tiny_qwen3_embedding(directory: str | Path) -> str:
    """A Qwen3-Embedding-shaped checkpoint: ``Qwen3Model`` weights, last-token pooling, Normalize."""
    import transformers

    directory = Path(directory)
    tokenizer = train_tokenizer()
    # As Qwen3-Embedding's tokenizer.json does: every text ends with <|endoftext|>, the token pooled.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {ENDOFTEXT}",
        pair=f"$A {ENDOFTEXT} $B:1 {ENDOFTEXT}:1",
        special_tokens=[(ENDOFTEXT, tokenizer.token_to_id(ENDOFTEXT))],
    )
    config = transformers.Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = transformers.AutoModel.from_config(config, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3Model"
    randomize_(model)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            # Not Qwen2Tokenizer: transformers 5 would rebuild that pipeline from its own defaults.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": ENDOFTEXT,
            "padding_side": "left",  # as Qwen3-Embedding's: a padded batch's last column is every last token
            "clean_up_tokenization_spaces": False,
            "model_max_length": 512,
            "chat_template": CHATML_TEMPLATE,  # Qwen3-Embedding ships its chat model's template
        },
    )
    write_sentence_transformers_files(
        directory, hidden_size=config.hidden_size, pooling="lasttoken", normalize=True, max_seq_length=512
    )
    return str(directory)


def train_wordpiece(vocab_size: int = 400) -> Tokenizer:
    """A BERT-style (uncased) WordPiece tokenizer trained on the fixed corpus, [CLS] $A [SEP] post-processor."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def write_tiny_bert(directory: str | Path, *, pooling: str = "cls", normalize: bool = True) -> str:
    """A sentence-transformers BERT checkpoint: ``BertModel`` weights (pooler included, as HF saves it)."""
    import transformers

    directory = Path(directory)
    tokenizer = train_wordpiece()
    config = transformers.BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(SEED)
    model = transformers.BertModel(config)
    randomize_(model)
    model.eval().save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": True,
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "model_max_length": 128,
        },
    )
    write_sentence_transformers_files(
        directory, hidden_size=config.hidden_size, pooling=pooling, normalize=normalize, max_seq_length=128
    )
    return str(directory)
