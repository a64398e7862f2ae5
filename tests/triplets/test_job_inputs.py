"""build-triplets' reading side: a malformed ingest sample is a reject row, not a crashed job; an
ingest output with failed shards is refused with the shards named."""

from __future__ import annotations

import pytest

from tasks import storage
from tasks.triplets.job import MALFORMED, TripletsInputError, _ingest_row, run_triplets


def test_well_formed_and_malformed_ingest_samples_become_rows():
    good = _ingest_row(3, {"__key__": "k1", "jpg": b"JPEG", "txt": b"a cat", "json": b'{"source_id": "cat.jpg"}'})
    assert good == {"shard": 3, "key": "k1", "source_id": "cat.jpg", "jpg": b"JPEG", "txt": "a cat", "mask_png": b"",
                    "reject": ""}
    no_image = _ingest_row(3, {"__key__": "k2", "txt": b"a dog", "json": b'{"source_id": "dog.jpg"}'})
    assert no_image["reject"] == f"{MALFORMED}: KeyError" and no_image["source_id"] == "dog.jpg"
    bad_json = _ingest_row(3, {"__key__": "k3", "jpg": b"JPEG", "json": b"{not json"})
    assert bad_json["reject"] == f"{MALFORMED}: JSONDecodeError" and bad_json["source_id"] == "k3"
    bad_caption = _ingest_row(3, {"__key__": "k4", "jpg": b"JPEG", "txt": b"\xff\xfe", "json": b"{}"})
    assert bad_caption["reject"] == f"{MALFORMED}: UnicodeDecodeError"


def test_an_ingest_output_with_failed_shards_is_refused(memory_url):
    storage.write_json(f"{memory_url}/ingest/manifest.json",
                       {"kind": "cnc-ingest", "shards": [], "counts": {}, "config": {},
                        "failed_shards": [{"shard": 4, "inputs": 2, "error": "OSError: gone"}]})
    with pytest.raises(TripletsInputError, match=r"failed shards: 4\); rerun the ingest with --resume"):
        run_triplets(f"{memory_url}/ingest", f"{memory_url}/triplets", executor="local")
    assert not storage.exists(f"{memory_url}/triplets/_config.json")
