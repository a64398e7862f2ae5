"""The model registry on S3 over the real protocol (moto's server): create-if-absent is a
conditional PUT, so concurrent promotes from separate clients still form one chain."""

from __future__ import annotations

import threading

import pytest

from tasks import storage
from tasks.registry import Registry
from tests.registry.test_registry import make_folder, reports

pytestmark = pytest.mark.slow


def test_versions_and_concurrent_promotes_on_s3(s3_bucket, tmp_path):
    import s3fs

    url = f"{s3_bucket}/registry"
    n = 4
    folders = [make_folder(tmp_path, f"m{i}", f"weights-{i}".encode()) for i in range(n)]
    versions = [Registry(url).register(folders[i], reports(float(i), [f"s{i}"])) for i in range(n)]
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def promote(i: int) -> None:
        try:
            s3fs.S3FileSystem.clear_instance_cache()
            reg = Registry(url)
            barrier.wait(timeout=60)
            reg.promote(versions[i].version, f"client {i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    reg = Registry(url)
    history = reg.history()
    assert [e.seq for e in history] == list(range(1, n + 1))
    assert sorted(e.version for e in history) == sorted(v.version for v in versions)
    assert [e.previous for e in history[1:]] == [e.version for e in history[:-1]]
    assert reg.champion().version == history[-1].version
    assert storage.read_json(storage.join(url, "champion.json"))["seq"] == n  # current, or repaired by the read
    champ = reg.champion()
    index = {v.version: i for i, v in enumerate(versions)}[champ.version]
    assert storage.read_bytes(storage.join(champ.pipeline_url, "unet", "diffusion_pytorch_model.safetensors")) == \
        f"weights-{index}".encode()
