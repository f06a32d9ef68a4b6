"""Tiny random Hugging Face checkpoints (fp32, seeded) with a byte-level BPE tokenizer, built for tests.

Each checkpoint is what ``save_pretrained`` writes plus ``tokenizer.json``/``tokenizer_config.json``, so HF
transformers can load the same directory and serve as the oracle. Weights are re-randomised after HF's init so
that biases are non-zero, norm weights differ from 1 and attention is far from uniform: a bug in RoPE, masking,
norms or biases then moves the logits well beyond test tolerances.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SEED = 1234
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
# Ids follow from SPECIAL_TOKENS being the first entries of the trained vocabulary.
BOS_ID, IM_START_ID, EOS_ID = 0, 1, 2
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Fixed text (not e.g. stdlib docstrings) so the trained vocabulary is identical on every Python version.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving system answers many requests at once.
Large language models predict the next token from the tokens before it, one step at a time.
Attention lets every position look back at earlier positions; the key and value cache keeps them.
Paged memory splits the cache into fixed-size blocks, so sequences of any length share one pool.
Continuous batching adds new requests as soon as old ones finish, keeping the accelerator busy.
def generate(prompt, max_tokens=16):
    tokens = tokenizer.encode(prompt)
    for step in range(max_tokens):
        logits = model(tokens)
        tokens.append(int(logits[-1].argmax()))
    return tokenizer.decode(tokens)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -1e-6 0x1F.
Punctuation and symbols: ( ) [ ] { } < > = + - * / % & | ^ ~ ! ? , ; : ' " ` @ # $ \\ _
Unicode text: café, naïve, über, señor, 東京, 北京, Здравствуйте, γειά σου, 🙂 🚀 ✓.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Once upon a time there was a little model that wanted to learn to write stories about the sea.
It read every book in the library, and then it wrote a story about a lighthouse and a storm.
The system prompt says: you are a helpful assistant. The user asks a question; the assistant answers.
"""


@dataclass(frozen=True)
class TinySpec:
    """One tiny architecture: the HF config class name, its keyword arguments, and on-disk config style."""

    config_class: str
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    # Rewrite config.json with transformers-4 keys (rope_theta + rope_scaling), as most hub checkpoints ship.
    legacy_rope_keys: bool = False


_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=None,
)

TINY_SPECS: dict[str, TinySpec] = {
    "llama": TinySpec("LlamaConfig", dict(_COMMON, rms_norm_eps=1e-5)),
    "llama_tied": TinySpec("LlamaConfig", dict(_COMMON, tie_word_embeddings=True)),
    "llama3_rope": TinySpec(
        "LlamaConfig",
        dict(
            _COMMON,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            },
        ),
        legacy_rope_keys=True,
    ),
    "mistral": TinySpec(
        "MistralConfig",
        dict(
            _COMMON,
            num_hidden_layers=3,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    "qwen2": TinySpec(
        "Qwen2Config",
        dict(_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        legacy_rope_keys=True,
    ),
    "qwen3": TinySpec(
        "Qwen3Config",
        dict(_COMMON, head_dim=32, tie_word_embeddings=True),
    ),
    # Mixture-of-Experts families: few enough experts that a short prompt reaches each of them.
    "mixtral": TinySpec(
        "MixtralConfig",
        dict(_COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    ),
    "qwen2_moe": TinySpec(  # shared expert + sigmoid gate; layer 1 dense (mlp_only_layers); no renormalising
        "Qwen2MoeConfig",
        dict(
            _COMMON,
            num_hidden_layers=3,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
        legacy_rope_keys=True,
    ),
    "qwen3_moe": TinySpec(  # q/k norm, renormalised top-k; decoder_sparse_step=2: layer 0 dense, layer 1 MoE
        "Qwen3MoeConfig",
        dict(
            _COMMON,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=2,
        ),
    ),
    # DeepSeek: Multi-head Latent Attention + DeepSeekMoE (layer 0 dense, then shared + routed experts).
    "deepseek_v2": TinySpec(  # V2-Lite-like: no q LoRA; group_limited_greedy softmax routing; YaRN rope
        "DeepseekV2Config",
        dict(
            _COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            n_group=2,  # topk_group < num_experts_per_tok, or the best group's best experts are the top-k
            topk_group=1,
            routed_scaling_factor=1.5,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "beta_fast": 32,
                "beta_slow": 1,
                "rope_theta": 10000.0,
            },
        ),
        legacy_rope_keys=True,
    ),
    "deepseek_v3": TinySpec(  # q LoRA; sigmoid + correction bias, noaux_tc group routing, renormalised
        "DeepseekV3Config",
        dict(
            _COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    ),
}


# Qwen2's pre-tokenizer regex: transformers 5 rebuilds Qwen2Tokenizer with it whatever tokenizer.json says, so
# using it everywhere keeps tokenizer.json and the HF oracle in agreement for every architecture.
_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` (Qwen2-style pipeline) on the fixed corpus."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [BOS_ID, IM_START_ID, EOS_ID]
    return tok


def write_tokenizer(directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> None:
    """Write tokenizer.json and a tokenizer_config.json with a ChatML template into ``directory``."""
    tokenizer = tokenizer or train_tokenizer()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        # Without this AutoTokenizer would pick the model family's tokenizer class, which rebuilds its own pipeline.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHATML_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.2), norm weights ~ 1 + N(0, 0.1)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.2 * noise)
            else:
                # Unit-scale activations keep attention scores O(1), so attention is not near-uniform.
                param.copy_(noise * param.shape[-1] ** -0.5)


def build_hf_model(name: str, vocab_size: int | None = None, **overrides) -> torch.nn.Module:
    """Build the seeded fp32 HF model for ``name`` (config fields ``overrides`` changed); the same call always
    gives the same weights."""
    import transformers

    spec = TINY_SPECS[name]
    if vocab_size is None:
        vocab_size = train_tokenizer().get_vocab_size()
    config = getattr(transformers, spec.config_class)(
        vocab_size=vocab_size, **{**spec.config_kwargs, **overrides}
    )
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_(model, torch.Generator().manual_seed(SEED))
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, BOS_ID], pad_token_id=BOS_ID
    )
    return model.eval()


def _to_legacy_rope_keys(config_path: Path) -> None:
    """Replace transformers-5 ``rope_parameters`` by the ``rope_theta``/``rope_scaling`` keys of older files."""
    config = json.loads(config_path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tiny_model(
    name: str,
    directory: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    max_shard_size: int | str | None = None,
) -> str:
    """Write the tiny checkpoint ``name`` (config, safetensors weights, tokenizer) into ``directory``."""
    tokenizer = tokenizer or train_tokenizer()
    directory = Path(directory)
    model = build_hf_model(name, tokenizer.get_vocab_size())
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    if TINY_SPECS[name].legacy_rope_keys:
        _to_legacy_rope_keys(directory / "config.json")
    write_tokenizer(directory, tokenizer)
    return str(directory)


def load_hf_model(directory: str | os.PathLike) -> torch.nn.Module:
    """Load a checkpoint directory with HF transformers in fp32 (the test oracle)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def write_sharded_copy(src: str | os.PathLike, dst: str | os.PathLike, num_shards: int = 2) -> str:
    """Re-save checkpoint ``src`` into ``dst`` as ``num_shards`` shards plus model.safetensors.index.json."""
    src, dst = Path(src), Path(dst)
    model = load_hf_model(src)
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    # Greedy packing with this limit fills each shard past total/num_shards, so no extra shard appears.
    max_shard_size = sum(sizes) // num_shards + max(sizes) + 1
    model.save_pretrained(dst, safe_serialization=True, max_shard_size=max_shard_size)
    shards = sorted(dst.glob("model-*-of-*.safetensors"))
    if len(shards) != num_shards:
        raise RuntimeError(f"expected {num_shards} shards in {dst}, save_pretrained wrote {len(shards)}")
    # Keep the source's exact config (e.g. legacy rope keys) and tokenizer files.
    for file in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (src / file).exists():
            shutil.copyfile(src / file, dst / file)
    return str(dst)


MTP_PREFIX = f"model.layers.{TINY_SPECS['deepseek_v3'].config_kwargs['num_hidden_layers']}."


def write_tiny_mtp_model(
    directory: str | os.PathLike,
) -> tuple[str, torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny DeepSeek-V3 checkpoint carrying a multi-token-prediction layer: (its directory, the HF model it
    came from, its tensors). Built with one layer more than the target has: that layer is the MTP block; the
    MTP layer's own tensors are added beside it, and config.json declares one MTP layer."""
    import safetensors.torch

    directory = Path(directory)
    layers = TINY_SPECS["deepseek_v3"].config_kwargs["num_hidden_layers"]
    tokenizer = train_tokenizer()
    model = build_hf_model("deepseek_v3", tokenizer.get_vocab_size(), num_hidden_layers=layers + 1)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory, tokenizer)
    weights = safetensors.torch.load_file(directory / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    hidden, mtp = model.config.hidden_size, MTP_PREFIX
    weights.update({
        mtp + "enorm.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
        mtp + "hnorm.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
        mtp + "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g) / (2 * hidden) ** 0.5,
        mtp + "embed_tokens.weight": weights["model.embed_tokens.weight"].clone(),
        mtp + "shared_head.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
        mtp + "shared_head.head.weight": weights["lm_head.weight"].clone(),
    })  # fmt: skip
    safetensors.torch.save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(num_hidden_layers=layers, num_nextn_predict_layers=1)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory), model, weights
