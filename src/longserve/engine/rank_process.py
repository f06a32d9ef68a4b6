"""A follower rank's process: ``python -m longserve.engine.rank_process --placement JSON``, the EngineConfig as
JSON on stdin (started by rank 0's ``FollowerRanks``; a fresh interpreter, so the parent's ``__main__`` is never
re-imported). It loads its shard and follows rank 0's steps until told to stop (tensor_parallel.py)."""

from __future__ import annotations

import argparse
import sys

import msgspec

from longserve.config import EngineConfig
from longserve.distributed.launch import placement_from_json
from longserve.engine.tensor_parallel import run_follower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--placement", required=True, help="the rank's RankPlacement as JSON")
    args = parser.parse_args()
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineConfig)
    run_follower(config, placement_from_json(args.placement))


if __name__ == "__main__":
    main()
