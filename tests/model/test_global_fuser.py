"""Global fuser: token layout, the reference's layer sizes, projection, dropout only in training."""

from __future__ import annotations

import torch

from cnc_model.cnc.global_fuser import GlobalFuser


def test_four_tokens_per_exemplar_of_the_cross_attention_width():
    fuser = GlobalFuser(cross_attention_dim=32, image_embed_dim=32).eval()
    fg, bg = fuser(torch.randn(3, 32), torch.randn(3, 32))
    assert fg.shape == bg.shape == (3, 4, 32)
    assert fuser.proj_in is None


def test_layer_sizes_follow_the_reference():
    d = 24
    stream = GlobalFuser(cross_attention_dim=d, image_embed_dim=d).fg_stream
    # GEGLU d -> 2d with inner width 4d (proj emits value and gate), then 2d -> 4d with inner 8d
    assert stream.ff1.net[0].proj.weight.shape == (2 * 4 * d, d)
    assert stream.ff1.net[2].weight.shape == (2 * d, 4 * d)
    assert stream.ff2.net[0].proj.weight.shape == (2 * 8 * d, 2 * d)
    assert stream.ff2.net[2].weight.shape == (4 * d, 8 * d)
    assert (stream.ff1.net[1].p, stream.ff2.net[1].p) == (0.1, 0.3)
    assert stream.norm1.normalized_shape == (d,) and stream.norm2.normalized_shape == (2 * d,)


def test_streams_are_independent_and_tokens_are_reshaped_in_order():
    torch.manual_seed(0)
    fuser = GlobalFuser(cross_attention_dim=8, image_embed_dim=8).eval()
    e1, e2 = torch.randn(1, 8), torch.randn(1, 8)
    fg_a, bg_a = fuser(e1, e2)
    fg_b, bg_b = fuser(e1, e1)
    assert torch.equal(fg_a, fg_b) and not torch.equal(bg_a, bg_b)
    flat = fuser.fg_stream.ff2(fuser.fg_stream.norm2(fuser.fg_stream.ff1(fuser.fg_stream.norm1(e1))))
    assert torch.equal(fg_a[0, 1], flat[0, 8:16])


def test_projection_when_the_image_embedding_width_differs():
    fuser = GlobalFuser(cross_attention_dim=32, image_embed_dim=48).eval()
    fg, _ = fuser(torch.randn(2, 48), torch.randn(2, 48))
    assert fg.shape == (2, 4, 32) and fuser.proj_in.weight.shape == (32, 48)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    fuser = GlobalFuser(cross_attention_dim=16, image_embed_dim=16)
    x = torch.randn(2, 16)
    fuser.train()
    assert not torch.equal(fuser(x, x)[0], fuser(x, x)[0])
    fuser.eval()
    assert torch.equal(fuser(x, x)[0], fuser(x, x)[0])
