"""Real photos that ship inside scikit-image, written out as a captioned folder source.

They are public domain / CC0 (see skimage/data/README.txt) and let the demo, the tests and the
benchmarks run on real photographs with no download.
"""

from __future__ import annotations

from pathlib import Path

from tasks import storage

# file in skimage/data -> caption
SAMPLE_PHOTOS: dict[str, str] = {
    "astronaut.png": "an astronaut in a spacesuit in front of the american flag",
    "chelsea.png": "a tabby cat looking to the side",
    "coffee.png": "a cup of coffee on a saucer with a spoon",
    "rocket.jpg": "a rocket on its launch pad under a blue sky",
    "motorcycle_left.png": "a red motorcycle parked in a garage",
    "hubble_deep_field.jpg": "distant galaxies in a deep field photograph of space",
}


def skimage_data_dir() -> Path:
    try:
        import skimage
    except ImportError as exc:  # pragma: no cover - skimage is a dev/samples dependency
        raise RuntimeError("the sample photos ship with scikit-image: pip install scikit-image") from exc
    return Path(skimage.__file__).parent / "data"


def sample_photo_bytes(name: str) -> bytes:
    return (skimage_data_dir() / name).read_bytes()


def write_sample_folder(url: str, names: list[str] | None = None) -> list[str]:
    """Write the sample photos (and ``.txt`` captions) under ``url``; returns the image URLs."""
    out = []
    for name in names or list(SAMPLE_PHOTOS):
        image_url = storage.join(url, name)
        if not storage.exists(image_url):
            storage.write_bytes(image_url, sample_photo_bytes(name))
        stem = name.rsplit(".", 1)[0]
        storage.write_bytes(storage.join(url, f"{stem}.txt"), SAMPLE_PHOTOS[name].encode())
        out.append(image_url)
    return out
