"""Pictures of what the model does on a prompt, from recording hooks that are off by default.

``capture_*`` runs one prefill with the hooks on and returns the data; ``plot_*`` draws it (a matplotlib
``Figure``, written as PNG or SVG when given a path). ``longserve viz`` is the command line (viz/cli.py).
"""

from longserve.viz.attention import AttentionCapture, capture_attention, plot_attention
from longserve.viz.checks import VizError
from longserve.viz.moba import MobaCapture, capture_moba, plot_moba_blocks
from longserve.viz.moe import MoeCapture, capture_moe_routing, plot_moe_routing

__all__ = [
    "AttentionCapture",
    "MobaCapture",
    "MoeCapture",
    "VizError",
    "capture_attention",
    "capture_moba",
    "capture_moe_routing",
    "plot_attention",
    "plot_moba_blocks",
    "plot_moe_routing",
]
