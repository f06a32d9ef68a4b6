"""The API server, the controller and the worker import no torch: each process of a deployment but the
engine core's starts fast and small (issue 24)."""

from __future__ import annotations

import subprocess
import sys


def test_api_server_controller_and_worker_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import longserve.serve.api_server, longserve.serve.controller, longserve.serve.controller_app, longserve.serve.launcher\n"
        "import longserve.serve.worker, longserve.serve.worker_app, longserve.engine.core_client, longserve.serve.api_processes\n"
        "import longserve.cli\n"
        "import longserve.config, longserve.engine.protocol, longserve.engine.output_processor\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
