"""Tensor and expert parallelism: process groups, weight slicing and the collectives the model calls.

Only this package talks to ``torch.distributed``. Layers receive a ``TensorParallel`` (``parallel.py``) and
never see a process group; ``launch.py`` starts the ranks (torchrun-compatible environment variables).
"""
