"""Cache-aware dispatch: prompt fingerprints (computed by the API server) and the controller's index of which
worker each fingerprinted prefix was last sent to.

A fingerprint is a chain of hashes over fixed-size chunks of the prompt: chunk i's hash covers every chunk up
to i, so two prompts share fingerprint entries exactly as far as they share a prefix. The controller never
sees workers' caches; it remembers where it sent prefixes (as SGLang's router does), so the index is an
estimate: a worker may have evicted a prefix, and the index forgets the oldest entries past its capacity. A
conversation's next turn repeats its history, so it scores highest on the worker that served the last turn.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

TEXT_CHUNK_CHARS = 128  # fingerprint granularity for text prompts
TOKEN_CHUNK = 16  # and for token-id prompts (one KV block)
MAX_CHUNKS = 64  # fingerprint at most this much of a prompt's start


def prompt_fingerprint(prompt: str | list[int]) -> list[int]:
    """Chained 64-bit hashes of the prompt's whole chunks (stable across processes, unlike ``hash``)."""
    if isinstance(prompt, str):
        data = prompt.encode("utf-8", "surrogatepass")
        step = TEXT_CHUNK_CHARS
        chunks = [data[i : i + step] for i in range(0, len(data) - step + 1, step)]
    else:
        step = TOKEN_CHUNK
        chunks = [
            b",".join(str(t).encode() for t in prompt[i : i + step])
            for i in range(0, len(prompt) - step + 1, step)
        ]
    hashes, previous = [], b""
    for chunk in chunks[:MAX_CHUNKS]:
        previous = hashlib.blake2b(previous + chunk, digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "big", signed=True))
    return hashes


class PrefixIndex:
    """fingerprint hash -> worker address it was last dispatched to, least recently used first."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._where: OrderedDict[int, str] = OrderedDict()

    def matched_chunks(self, fingerprint: list[int]) -> dict[str, int]:
        """For each worker, how many leading chunks of this prompt it was last sent."""
        depth: dict[str, int] = {}
        for index, key in enumerate(fingerprint):
            address = self._where.get(key)
            if address is None:
                break
            depth[address] = index + 1
        return depth

    def record(self, fingerprint: list[int], address: str) -> None:
        for key in fingerprint:
            self._where[key] = address
            self._where.move_to_end(key)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)

    def forget(self, address: str) -> None:
        """Drop a worker that left (expired or unregistered)."""
        for key in [k for k, a in self._where.items() if a == address]:
            del self._where[key]

    def __len__(self) -> int:
        return len(self._where)
