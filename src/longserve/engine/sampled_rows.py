"""What one sampler call returns: the step's tokens (and logprobs) on the device (``SampledRows``), and read
back to the host (``SamplerOutput``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longserve.engine.protocol import TokenLogprob
from longserve.engine.sampling_ops import logprob_entries


@dataclass
class SamplerOutput:
    """What one sampler call produced, row-aligned with the sequences passed in."""

    token_ids: list[int]  # one per row; -1 for a row in ``errors``
    logprobs: list[TokenLogprob | None]  # filled only for rows whose params.logprobs is not None
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it produced no token
    # Speculative decoding: row -> the drafts accepted before ``token_ids[row]``, with their logprobs
    accepted: dict[int, list[tuple[int, TokenLogprob | None]]] = field(default_factory=dict)


@dataclass
class LogprobRows:
    """Logprobs of the chosen tokens of ``rows``, still on the device (``logprob_tensors``)."""

    rows: list[int]  # the sampler rows these tensors cover, in order
    wanted: dict[int, int]  # sampler row -> how many alternatives its request asked for
    tensors: tuple[torch.Tensor, ...]  # chosen [m], ranks [m], top values [m, k], top ids [m, k]


class SampledRows:
    """One step's sampled tokens (and logprobs) on the device; ``to_host`` reads them back, the one wait.

    ``token_ids`` ``[rows]`` may feed the next step's inputs before the host has seen them: every entry is a
    valid token id, even in a row that failed (the host drops that row's token).
    """

    def __init__(
        self,
        token_ids: torch.Tensor,
        *,
        invalid: torch.Tensor | None = None,  # [rows] bool: no distribution to draw from (NaN logits)
        logprobs: LogprobRows | None = None,
        errors: dict[int, str] | None = None,  # rows that failed on the host already (a grammar broke)
        resolved: SamplerOutput | None = None,  # sampled row by row on the host: nothing left to read
    ) -> None:
        self.token_ids = token_ids
        self._invalid = invalid
        self._logprobs = logprobs
        self._errors = errors or {}
        self._resolved = resolved
        self._host: list[torch.Tensor] | None = None
        self._copied: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Queue the copies to host memory (pinned, non-blocking on CUDA), so ``to_host`` only waits."""
        tensors = [self.token_ids]
        if self._invalid is not None:
            tensors.append(self._invalid)
        if self._logprobs is not None:
            tensors.extend(self._logprobs.tensors)
        if self.token_ids.device.type != "cuda":
            self._host = tensors
            return
        self._host = [t.to("cpu", non_blocking=True) for t in tensors]
        self._copied = torch.cuda.Event()
        self._copied.record()

    def to_host(self) -> SamplerOutput:
        if self._resolved is not None:
            return self._resolved
        if self._host is None:
            self.start_copy()
        if self._copied is not None:
            self._copied.synchronize()
        host = iter(self._host)
        tokens = next(host).tolist()
        errors = dict(self._errors)
        if self._invalid is not None:
            for row in next(host).nonzero().flatten().tolist():
                errors.setdefault(
                    row,
                    "sampling failed: the next-token probabilities are not finite (NaN or infinite logits)",
                )
        for row in errors:
            tokens[row] = -1
        logprobs: list[TokenLogprob | None] = [None] * len(tokens)
        if self._logprobs is not None:
            entries = logprob_entries(
                [tokens[row] for row in self._logprobs.rows],
                *(t.tolist() for t in host),
                [self._logprobs.wanted.get(row, 0) for row in self._logprobs.rows],
            )
            for row, entry in zip(self._logprobs.rows, entries, strict=True):
                if row in self._logprobs.wanted and row not in errors:
                    logprobs[row] = entry
        self._resolved = SamplerOutput(tokens, logprobs, errors)
        return self._resolved
