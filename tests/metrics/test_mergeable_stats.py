"""Mergeable metric statistics: merged partitions == all at once; FID agrees with torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnc_model.metrics import FrechetStats, InceptionScoreStats, MeanStats, clip_scores, frechet_distance, split_of
from cnc_model.metrics import stats_io
from cnc_model.metrics.feature_nets import TinyFeatureNet, load_feature_net


def _features(seed: int, n: int = 60, dim: int = 8, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim))
    return rng.normal(size=(n, dim)) @ mix + shift


def _partitions(n: int) -> list[slice]:
    return [slice(0, 7), slice(7, 31), slice(31, n)]  # uneven, as workers' shards are


def test_fid_from_three_merged_partitions_equals_all_at_once():
    real, fake = _features(0), _features(1, shift=0.5)
    whole = frechet_distance(FrechetStats.from_features(real), FrechetStats.from_features(fake))
    merged_real = FrechetStats.empty(8)
    for part in _partitions(len(real)):
        merged_real = merged_real + FrechetStats.from_features(real[part])
    merged_fake = FrechetStats.empty(8)
    for part in reversed(_partitions(len(fake))):  # merge order does not matter
        merged_fake.update(fake[part])
    assert merged_real.n == merged_fake.n == 60
    assert frechet_distance(merged_real, merged_fake) == pytest.approx(whole, rel=1e-6)
    # and the mean/cov are numpy's
    mean, cov = merged_real.mean_cov()
    np.testing.assert_allclose(mean, real.mean(0), rtol=1e-10)
    np.testing.assert_allclose(cov, np.cov(real, rowvar=False), rtol=1e-8, atol=1e-10)


def test_fid_of_a_set_with_itself_is_zero_and_is_not_symmetric_by_accident():
    real, fake = _features(0), _features(1, shift=0.5)
    stats = FrechetStats.from_features(real)
    assert abs(frechet_distance(stats, stats)) < 1e-6
    forward = frechet_distance(stats, FrechetStats.from_features(fake))
    assert forward > 1.0
    assert frechet_distance(FrechetStats.from_features(fake), stats) == pytest.approx(forward, rel=1e-6)


def test_fid_agrees_with_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = TinyFeatureNet(seed=3)

    class Pool(torch.nn.Module):
        num_features = net.num_features

        def forward(self, x):
            return net(x)["pool"]

    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 3, 48, 48), dtype=torch.uint8, generator=gen)
    fake = (real.float() * 0.5 + 60).round().to(torch.uint8)  # darker, lower contrast: a real distance
    reference = FrechetInceptionDistance(feature=Pool(), sync_on_compute=False)
    ours_real, ours_fake = FrechetStats.empty(net.num_features), FrechetStats.empty(net.num_features)
    for start in range(0, 40, 16):
        reference.update(real[start:start + 16], real=True)
        reference.update(fake[start:start + 16], real=False)
        ours_real.update(net(real[start:start + 16])["pool"])
        ours_fake.update(net(fake[start:start + 16])["pool"])
    expected = float(reference.compute())
    assert expected > 1e-3
    assert frechet_distance(ours_real, ours_fake) == pytest.approx(expected, rel=1e-5)


def test_fid_refuses_fewer_than_two_samples_and_mismatched_dims():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(FrechetStats.from_features(_features(0, n=1)), FrechetStats.from_features(_features(1)))
    with pytest.raises(ValueError, match="8-d and 4-d"):
        FrechetStats.empty(8).merge(FrechetStats.empty(4))
    with pytest.raises(ValueError, match="NaN"):
        FrechetStats.from_features(np.full((3, 2), np.nan))


def _reference_inception_score(logits: torch.Tensor, keys: list[str], splits: int) -> tuple[float, float]:
    """torchmetrics' formula, on the splits chosen by key instead of a random permutation."""
    idx = torch.tensor([split_of(k, splits) for k in keys])
    scores = []
    for s in range(splits):
        group = logits[idx == s].double()
        if len(group) == 0:
            continue
        p, log_p = group.softmax(1), group.log_softmax(1)
        scores.append((p * (log_p - p.mean(0, keepdim=True).log())).sum(1).mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std())


def test_inception_score_merged_equals_all_at_once_and_the_reference_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(90, 12, generator=gen) * 3
    keys = [f"img-{i:04d}" for i in range(90)]
    whole = InceptionScoreStats.from_logits(logits, keys, splits=4)
    merged = InceptionScoreStats.empty(12, splits=4)
    for part in _partitions(90):
        merged = merged + InceptionScoreStats.from_logits(logits[part], keys[part], splits=4)
    assert merged.n == 90 and merged.count.tolist() == whole.count.tolist()
    mean, std = merged.score()
    assert (mean, std) == pytest.approx(whole.score(), rel=1e-9)
    assert (mean, std) == pytest.approx(_reference_inception_score(logits, keys, 4), rel=1e-6)
    assert mean > 1.5  # confident, varied logits score well above 1


def test_inception_score_split_follows_the_key_not_the_partition():
    assert split_of("img-0001", 10) == split_of("img-0001", 10)
    assert len({split_of(f"k{i}", 10) for i in range(200)}) == 10
    uniform = InceptionScoreStats.from_logits(torch.zeros(20, 5), [f"k{i}" for i in range(20)], splits=2)
    assert uniform.score()[0] == pytest.approx(1.0, abs=1e-12)  # identical predictions: IS is 1


def test_clip_score_and_means_merge_exactly():
    gen = torch.Generator().manual_seed(1)
    image, text = torch.randn(30, 6, generator=gen), torch.randn(30, 6, generator=gen)
    scores = clip_scores(image, text)
    expected = (100 * torch.nn.functional.cosine_similarity(image, text).clamp_min(0)).double()
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
    merged = MeanStats()
    for part in _partitions(30):
        merged = merged + MeanStats.from_values(scores[part])
    whole = MeanStats.from_values(scores)
    assert merged.count == 30
    assert merged.mean() == pytest.approx(float(scores.mean()), rel=1e-12)
    assert merged.std() == pytest.approx(whole.std(), rel=1e-9)
    assert np.isnan(MeanStats().mean())


def test_statistics_round_trip_through_npz_bytes_without_pickle():
    fid = FrechetStats.from_features(_features(0))
    inc = InceptionScoreStats.from_logits(torch.randn(10, 5), [str(i) for i in range(10)], splits=3)
    mean = MeanStats.from_values([1.0, 2.0, 4.0])
    data = stats_io.dump({**stats_io.prefixed("fid", fid.state()), **stats_io.prefixed("is", inc.state()),
                          **stats_io.prefixed("clip", mean.state())})
    arrays = stats_io.load(data)
    fid2 = FrechetStats.from_state(stats_io.under("fid", arrays))
    assert fid2.n == fid.n and np.array_equal(fid2.outer_sum, fid.outer_sum)
    assert InceptionScoreStats.from_state(stats_io.under("is", arrays)).score() == inc.score()
    assert MeanStats.from_state(stats_io.under("clip", arrays)).mean() == pytest.approx(7 / 3)
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)
    import zipfile

    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("x.npy", buffer.getvalue())
    with pytest.raises(ValueError, match="pickle"):
        stats_io.load(evil.getvalue())


def test_feature_nets_tiny_is_seeded_and_inception_names_the_missing_file(tmp_path):
    images = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = load_feature_net("tiny")(images), load_feature_net("tiny")(images)
    assert a["pool"].shape == (2, 16) and a["logits"].shape == (2, 10)
    assert torch.equal(a["pool"], b["pool"])
    assert not torch.equal(a["pool"][0], a["pool"][1])
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_feature_net(missing)
    with pytest.raises(ValueError, match="uint8"):
        load_feature_net("tiny")(images.float())
