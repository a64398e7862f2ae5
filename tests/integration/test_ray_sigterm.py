"""``init_ray`` keeps a SIGTERM handler installed before it (Prefect's cancellation bridge).

``ray.init`` installs its own handler (``sys.exit(15)``) in the driver. Inside a Prefect flow
run that replaced Prefect's bridge, so a cancelled run could not be acknowledged and ended
Crashed (the end-to-end check: test_prefect_deployment.py). Each case runs in a fresh process:
Ray installs its handler only when it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

PREFECT_BRIDGE = """
from prefect.utilities.engine import capture_sigterm, is_prefect_sigterm_handler_installed
from tasks.ray_runtime import init_ray

with capture_sigterm():  # what Prefect's flow engine wraps a flow run in
    assert is_prefect_sigterm_handler_installed()
    init_ray(num_cpus=1)
    print("bridge kept:", is_prefect_sigterm_handler_installed())
"""

DEFAULT_HANDLER = """
import signal
from tasks.ray_runtime import init_ray

assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
init_ray(num_cpus=1)
print("handler:", signal.getsignal(signal.SIGTERM).__module__)
"""


def run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CNC_RAY_DASHBOARD": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_init_ray_keeps_prefects_sigterm_bridge():
    assert "bridge kept: True" in run(PREFECT_BRIDGE)


def test_init_ray_leaves_rays_handler_where_python_had_its_default():
    # a plain `cnc build-triplets` process: Ray's SystemExit runs finally blocks (the lease's release)
    # where the default action would kill the process outright
    assert "handler: ray._private.worker" in run(DEFAULT_HANDLER)
