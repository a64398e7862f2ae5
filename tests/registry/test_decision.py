"""The promotion decision: direction, margin, missing values, and the comparison table."""

from __future__ import annotations

import math

import pytest

from tasks.registry import decide_promotion


def test_lower_is_better_metric_needs_to_beat_the_margin():
    champion = {"fid": 30.0, "clip_score": 0.30}
    assert decide_promotion({"fid": 27.0, "clip_score": 0.25}, champion, "fid", margin=2.0).promote
    kept = decide_promotion({"fid": 28.5, "clip_score": 0.35}, champion, "fid", margin=2.0)
    assert not kept.promote and "champion kept" in kept.reason and kept.improvement == pytest.approx(1.5)
    worse = decide_promotion({"fid": 31.0}, champion, "fid")
    assert not worse.promote and worse.improvement == pytest.approx(-1.0)


def test_higher_is_better_and_relative_margin():
    champion = {"clip_score": 0.30}
    assert decide_promotion({"clip_score": 0.34}, champion, "clip_score", margin=0.1, relative=True).promote
    assert not decide_promotion({"clip_score": 0.32}, champion, "clip_score", margin=0.1, relative=True).promote
    # the caller may override the direction read from the name
    assert decide_promotion({"score": 0.2}, {"score": 0.3}, "score", higher_is_better=False).promote


def test_swapping_candidate_and_champion_flips_the_verdict():
    a, b = {"fid": 20.0}, {"fid": 25.0}
    assert decide_promotion(a, b, "fid", margin=1.0).promote
    assert not decide_promotion(b, a, "fid", margin=1.0).promote


def test_first_model_missing_or_nan_values():
    assert decide_promotion({"fid": 40.0}, None, "fid").promote
    assert not decide_promotion({"fid": math.nan}, {"fid": 30.0}, "fid").promote
    assert not decide_promotion({"clip_score": 0.3}, {"fid": 30.0}, "fid").promote
    no_champ_metric = decide_promotion({"fid": 10.0}, {"clip_score": 0.3}, "fid")
    assert not no_champ_metric.promote and "cannot compare" in no_champ_metric.reason
    with pytest.raises(ValueError):
        decide_promotion({"fid": 1.0}, {"fid": 2.0}, "fid", margin=-1)


def test_table_puts_the_deciding_metric_first_and_names_the_winner_per_metric():
    d = decide_promotion({"fid": 20.0, "clip_score": 0.25, "val_loss": 0.1},
                         {"fid": 25.0, "clip_score": 0.30, "val_loss": 0.1}, "fid", margin=1.0)
    assert [(r["metric"], r["decides"], r["better"]) for r in d.table] == [
        ("fid", True, "candidate"), ("clip_score", False, "champion"), ("val_loss", False, "tie")]
    assert d.table[0]["champion"] == 25.0 and d.table[0]["candidate"] == 20.0 and d.table[0]["delta"] == -5.0
