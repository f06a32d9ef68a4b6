"""SamplingParams: how one request turns logits into tokens and when it stops; validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this sample greedily (as vLLM): dividing logits by a tinier one overflows to inf and
# the softmax to NaN, and the distribution is one-hot long before that anyway.
GREEDY_TEMPERATURE = 1e-5
# repetition_penalty divides or multiplies logits; beyond these bounds float32 logits overflow to inf or
# vanish to 0 (the API rejects such values rather than clamp them silently).
REPETITION_PENALTY_RANGE = (0.01, 100.0)
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI and vLLM take it


@dataclass
class StructuredOutputParams:
    """What the output must match; exactly one field is set (vLLM's ``guided_*`` options).

    The grammar library (llguidance, see ``engine/structured_output.py``) turns it into a token mask per step.
    """

    json: str | None = None  # a JSON schema, as JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # a Lark grammar or a llama.cpp GBNF grammar

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                f"structured_output must set exactly one of json, json_object, regex, choice, grammar; got {given}"
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                f"structured_output choice must be a non-empty list of non-empty strings, got {self.choice!r}"
            )

    @property
    def kind(self) -> str:
        return next(n for n in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, n))


@dataclass
class SamplingParams:
    """Per-request generation settings (names and meanings follow vLLM / the OpenAI API).

    A bad value raises ``ValueError`` whose message starts with the field's name.
    """

    n: int = 1  # number of completions to return for the prompt
    temperature: float = 1.0  # 0 (anything below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 means all
    min_p: float = 0.0  # drop tokens whose probability is below min_p * max probability
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # subtracted once from logits of tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence from logits of generated tokens
    seed: int | None = None  # per-request RNG seed: same seed, same prompt -> same output
    stop: list[str] = field(default_factory=list)  # strings that end generation (not included in text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end generation
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0  # EOS and stop tokens are suppressed until this many tokens are generated
    ignore_eos: bool = False  # keep generating past the end-of-sequence token
    logprobs: int | None = None  # return the sampled token's logprob plus this many top alternatives
    prompt_logprobs: int | None = None  # same, for every prompt token (after the first)
    skip_special_tokens: bool = True  # drop special tokens from the returned text
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutputParams | None = None  # constrain the output to a grammar
    # token id -> added to its logit before sampling (OpenAI's); values are clamped to [-100, 100]
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_output, dict):  # as it travels from the worker protocol
            self.structured_output = StructuredOutputParams(**self.structured_output)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self._check_logit_bias()
        self._validate()

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if not isinstance(bias, dict) or not all(_is_int(t) and t >= 0 for t in bias):
            raise ValueError(f"logit_bias must map token ids (integers >= 0) to numbers, got {bias!r}")
        if not all(_is_number(v) for v in bias.values()):
            raise ValueError(f"logit_bias values must be finite numbers, got {bias!r}")
        self.logit_bias = {t: min(100.0, max(-100.0, float(v))) for t, v in bias.items()} or None

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            fail("temperature", "must be a number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            fail("top_k", "must be an integer >= -1 (0 or -1 disables it)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        low, high = REPETITION_PENALTY_RANGE
        if not _is_number(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            fail("repetition_penalty", f"must be in [{low}, {high:g}]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                fail(name, "must be in [-2, 2]")
        if self.seed is not None and (
            not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            fail("seed", "must be a 64-bit signed integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative integers")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                fail(name, "must be an integer >= 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalty(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """The argmax is all there is to sampling: greedy, nothing to mask, penalise or report."""
        return (
            self.greedy
            and self.logprobs is None
            and not self.has_penalty
            and not self.logit_bias
            and not self.min_tokens
            and self.structured_output is None
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
