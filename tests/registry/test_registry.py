"""The model registry: immutable versions, an atomic champion pointer, history, the CLI."""

from __future__ import annotations

import json
import threading

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks import storage
from tasks.registry import Registry, RegistryError
from tasks.registry import store as store_mod
from tasks.registry.store import manifest_hash


def make_folder(root, name: str, payload: bytes) -> str:
    """A stand-in pipeline folder (model_index.json + one weights file whose bytes tell it apart)."""
    folder = root / name
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CnCPipeline", "name": name}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(payload)
    (folder / ".model_index.json.tmp-dead").write_text("a crashed writer's leftover")
    return str(folder)


def reports(fid: float, shards: list[str]) -> dict:
    return {"train_report": {"stage": "full", "steps": 10}, "metrics": {"fid": fid, "clip_score": 0.3},
            "data_manifest": {"kind": "cnc-triplets", "shards": shards}}


@pytest.fixture(params=["file", "memory"])
def registry(request, tmp_path, memory_url) -> Registry:
    return Registry(str(tmp_path / "registry") if request.param == "file" else f"{memory_url}/registry")


def test_register_copies_the_folder_and_reports_into_an_immutable_version(registry, tmp_path):
    v = registry.register(make_folder(tmp_path, "a", b"weights-A"), reports(30.0, ["s0"]))
    assert storage.read_bytes(storage.join(v.pipeline_url, "unet", "diffusion_pytorch_model.safetensors")) == b"weights-A"
    assert set(v.files) == {"pipeline/model_index.json", "pipeline/unet/diffusion_pytorch_model.safetensors"}
    assert v.data_manifest_hash == manifest_hash({"shards": ["s0"], "kind": "cnc-triplets"})  # key order irrelevant
    assert registry.report(v.version, "metrics") == {"fid": 30.0, "clip_score": 0.3}
    assert registry.get(v.version) == v
    assert registry.champion() is None  # registering is not promoting
    with pytest.raises(FileExistsError):  # a version's record is never overwritten
        store_mod.create_exclusive(storage.join(v.url, "version.json"), b"{}")


def test_promote_and_rollback_walk_the_champion_stack(registry, tmp_path):
    a = registry.register(make_folder(tmp_path, "a", b"A"), reports(30.0, ["s0"]))
    b = registry.register(make_folder(tmp_path, "b", b"B"), reports(25.0, ["s0", "s1"]))
    c = registry.register(make_folder(tmp_path, "c", b"C"), reports(20.0, ["s0", "s1", "s2"]))
    for v in (a, b, c):
        registry.promote(v.version, f"better fid {v.metrics['fid']}")
    assert registry.champion().version == c.version
    assert registry.rollback("c is broken").version == b.version
    assert registry.rollback("b is broken too").version == a.version  # a stack, not a toggle
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback("no further")
    assert registry.rollback("back to c", to=c.version).version == c.version
    assert [(e.seq, e.action, e.version, e.previous) for e in registry.history()] == [
        (1, "promote", a.version, None), (2, "promote", b.version, a.version), (3, "promote", c.version, b.version),
        (4, "rollback", b.version, c.version), (5, "rollback", a.version, b.version),
        (6, "rollback", c.version, a.version)]
    assert [v.version for v in registry.versions()] == [a.version, b.version, c.version]
    with pytest.raises(RegistryError, match="already the champion"):
        registry.promote(c.version, "again")


def test_a_crash_before_the_pointer_moves_leaves_the_old_champion(registry, tmp_path, monkeypatch):
    a = registry.register(make_folder(tmp_path, "a", b"A"), reports(30.0, ["s0"]))
    registry.promote(a.version, "first")
    b = registry.register(make_folder(tmp_path, "b", b"B"), reports(10.0, ["s0", "s1"]))

    def crash(url, data):
        raise RuntimeError("killed between writing the version and moving the pointer")

    monkeypatch.setattr(store_mod, "create_exclusive", crash)
    with pytest.raises(RuntimeError, match="killed"):
        registry.promote(b.version, "better")
    monkeypatch.undo()
    assert registry.champion().version == a.version
    assert Registry(registry.url).champion().version == a.version  # a fresh reader agrees
    assert [e.version for e in registry.history()] == [a.version]
    assert b.version in [v.version for v in registry.versions()]  # the version itself is kept


def test_a_crash_while_registering_leaves_no_promotable_version(registry, tmp_path, monkeypatch):
    a = registry.register(make_folder(tmp_path, "a", b"A"), reports(30.0, ["s0"]))
    registry.promote(a.version, "first")
    real_copy = store_mod._copy
    calls = []

    def copy_then_die(src_fs, src_path, dst_url):
        calls.append(dst_url)
        if len(calls) == 2:
            raise OSError("disk gone mid-copy")
        return real_copy(src_fs, src_path, dst_url)

    monkeypatch.setattr(store_mod, "_copy", copy_then_die)
    with pytest.raises(OSError):
        registry.register(make_folder(tmp_path, "b", b"B"), reports(10.0, ["s1"]))
    monkeypatch.undo()
    half = calls[0].split("/versions/")[1].split("/")[0]
    assert [v.version for v in registry.versions()] == [a.version]
    with pytest.raises(RegistryError, match="no complete version"):
        registry.promote(half, "must refuse a half-written version")
    assert registry.champion().version == a.version


def test_a_crash_after_the_event_before_the_pointer_write_is_repaired_on_read(registry, tmp_path, monkeypatch):
    a = registry.register(make_folder(tmp_path, "a", b"A"), reports(30.0, ["s0"]))
    b = registry.register(make_folder(tmp_path, "b", b"B"), reports(10.0, ["s1"]))
    registry.promote(a.version, "first")
    monkeypatch.setattr(Registry, "_write_pointer", lambda self, event: (_ for _ in ()).throw(OSError("died")))
    with pytest.raises(OSError):
        registry.promote(b.version, "better")
    monkeypatch.undo()
    assert storage.read_json(storage.join(registry.url, "champion.json"))["version"] == a.version  # stale
    assert registry.champion().version == b.version  # the event is the commit point
    assert storage.read_json(storage.join(registry.url, "champion.json"))["version"] == b.version  # repaired


def test_concurrent_promotes_lose_no_version_and_no_event(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    n = 8
    folders = [make_folder(tmp_path, f"m{i}", f"weights-{i}".encode()) for i in range(n)]
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            v = Registry(registry.url).register(folders[i], reports(float(i), [f"s{i}"]))
            barrier.wait(timeout=60)
            Registry(registry.url).promote(v.version, f"worker {i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    versions = registry.versions()
    assert len(versions) == n
    assert sorted(storage.read_bytes(storage.join(v.pipeline_url, "unet", "diffusion_pytorch_model.safetensors"))
                  for v in versions) == sorted(f"weights-{i}".encode() for i in range(n))
    history = registry.history()
    assert [e.seq for e in history] == list(range(1, n + 1))
    assert sorted(e.version for e in history) == sorted(v.version for v in versions)  # every promote recorded
    assert [e.previous for e in history[1:]] == [e.version for e in history[:-1]]  # one unbroken chain
    assert registry.champion().version == history[-1].version


def test_bad_requests_are_refused_with_one_clear_line(registry, tmp_path):
    with pytest.raises(RegistryError, match="not a version id"):
        registry.get("../../etc")
    with pytest.raises(RegistryError, match="reports lack metrics"):
        registry.register(make_folder(tmp_path, "a", b"A"), {"train_report": {}, "data_manifest": {}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no model_index.json"):
        registry.register(str(tmp_path / "empty"), reports(1.0, []))
    v = registry.register(make_folder(tmp_path, "b", b"B"), reports(1.0, []))
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.promote(v.version, " ")
    assert registry.versions() == [v]


def test_secrets_in_urls_never_reach_the_registry(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    rep = reports(1.0, ["s3://AKIAXX:se/cret@bucket/t/000000.tar?X-Amz-Signature=sig"])
    v = registry.register(make_folder(tmp_path, "a", b"A"), rep)
    written = b"".join(p.read_bytes() for p in (tmp_path / "registry").rglob("*.json"))
    assert b"AKIAXX" not in written and b"se/cret" not in written and b"X-Amz-Signature" not in written
    assert b"s3://REDACTED@bucket/t/000000.tar?REDACTED" in written
    assert v.version in written.decode()


def test_models_cli_register_promote_list_show_rollback(tmp_path):
    runner = CliRunner()
    reg = str(tmp_path / "registry")
    ids = []
    for name, fid in (("a", 30.0), ("b", 20.0)):
        for kind, obj in reports(fid, [name]).items():
            (tmp_path / f"{name}-{kind}.json").write_text(json.dumps(obj))
        out = runner.invoke(app, ["models", "register", make_folder(tmp_path, name, name.encode()), "--registry", reg,
                                  "--train-report", str(tmp_path / f"{name}-train_report.json"),
                                  "--metrics", str(tmp_path / f"{name}-metrics.json"),
                                  "--data-manifest", str(tmp_path / f"{name}-data_manifest.json")])
        assert out.exit_code == 0, out.output
        ids.append(out.output.strip())
    for v in ids:
        assert runner.invoke(app, ["models", "promote", v, "--reason", "test", "--registry", reg]).exit_code == 0
    listing = runner.invoke(app, ["models", "list", "--registry", reg]).output.splitlines()
    assert [ln.split()[:2] for ln in listing] == [[ids[0], listing[0].split()[1]], ["*", ids[1]]]
    shown = json.loads(runner.invoke(app, ["models", "show", "--registry", reg]).output)
    assert shown["version"] == ids[1] and shown["champion"] and [h["version"] for h in shown["history"]] == ids
    out = runner.invoke(app, ["models", "rollback", "--reason", "regression", "--registry", reg])
    assert out.exit_code == 0 and out.output.strip() == f"champion: {ids[0]} (was {ids[1]})"
    bad = runner.invoke(app, ["models", "promote", "v0-nope", "--reason", "x", "--registry", reg])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: ") and len(bad.output.splitlines()) == 1
