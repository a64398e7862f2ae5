"""Shared fixtures for the whole suite (keep small)."""

from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture
def memory_url():
    """A fresh ``memory://`` folder URL, removed afterwards."""
    import fsspec

    root = f"/test-{uuid.uuid4().hex[:10]}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on a 2-core machine: one torch thread avoids OpenMP spin-waiting against Ray
    workers and the other process, and keeps float results independent of the core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible HTTP server on 127.0.0.1 (real protocol, as s3fs's own tests use), one for
    the session; its variables stay set until the session ends, so every Ray started after it
    hands them to its workers."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the server binds a free port
    server.start()
    endpoint = "http://127.0.0.1:{}".format(server.get_host_and_port()[1])
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "S3_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns its s3:// URL."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    name = f"cnc-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return f"s3://{name}"


_OWN_RAY: dict[str, str] = {}


def _ensure_own_ray():
    """A local Ray of 2 CPUs that this suite started after the S3 server's variables were set (so
    its workers have them). A Ray that some test started or replaced in between (other resources,
    other variables) is shut down first, and a cluster started on this machine (``ray start``,
    ``RAY_ADDRESS``) is never joined."""
    import ray

    if ray.is_initialized() and _OWN_RAY.get("gcs") == ray.get_runtime_context().gcs_address:
        return ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert ray.cluster_resources()["CPU"] == 2
    _OWN_RAY["gcs"] = ray.get_runtime_context().gcs_address
    return ray


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """The suite's local Ray (see :func:`_ensure_own_ray`); checked again before every test that uses it."""
    return _ensure_own_ray()


@pytest.fixture(autouse=True)
def _ray_local_is_still_ours(request):
    if "ray_local" in request.fixturenames:
        _ensure_own_ray()
