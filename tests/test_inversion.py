import pytest
import torch

from fti4cir import InversionConfig, InversionNetwork
from fti4cir.official import official_copy


def make_net(**overrides):
    torch.manual_seed(0)
    return InversionNetwork(InversionConfig(embed_dim=32, token_dim=48, patch_dim=40, **overrides)).eval()


def inputs(batch=6, patches=50):
    torch.manual_seed(1)
    return torch.randn(batch, 32), torch.randn(batch, patches, 40)


def test_shapes_and_official_architecture():
    net = make_net()
    g, p = inputs()
    out = net(g, p, return_attention=True)
    assert out.subject.shape == (6, 48) and out.attributes.shape == (6, 12, 48)
    assert out.selection.relevance.shape == (6, 24)
    torch.testing.assert_close(out.selection.relevance.sum(1), torch.ones(6))
    assert len(out.selection.attention) == 3 and out.selection.attention[0].shape == (6, 1, 24, 24 + 50)
    torch.testing.assert_close(out.selection.attention[0].sum(-1), torch.ones(6, 1, 24))
    mapper = net.subject_mapper
    assert [m.out_features for m in mapper if isinstance(m, torch.nn.Linear)] == [128, 128, 48]
    assert [m.p for m in mapper if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    block = net.attribute_encoder[0]
    assert block.attn.q_proj.bias is None and block.attn.kv_proj.bias is None and block.attn.out_proj.bias is not None
    assert block.mlp[0].out_features == 80 and isinstance(block.mlp[1], torch.nn.ReLU)
    assert isinstance(net.attribute_head[1], torch.nn.Sigmoid)


@pytest.mark.parametrize("epsilon, expected", [(1.0, 1), (0.0, 12)])
def test_kept_count_bounds(epsilon, expected):
    net = make_net(epsilon=epsilon)
    sel = net.select_attributes(*inputs())
    assert sel.num_kept.tolist() == [expected] * 6


def test_selection_order_kept_by_query_index_then_rest_by_relevance():
    net = make_net(epsilon=0.04)
    g, p = inputs(batch=16)
    sel = net.select_attributes(g, p)
    assert 1 <= sel.num_kept.min() and sel.num_kept.max() <= 12
    assert len(set(sel.num_kept.tolist())) > 1, "want rows with different r to exercise the batching"
    for row, r in zip(range(16), sel.num_kept.tolist()):
        idx = sel.indices[row]
        rel = sel.relevance[row]
        assert torch.all(idx[:r][1:] > idx[:r][:-1])  # kept: original query order
        assert (rel[idx[:r]] > 0.04).all()
        assert torch.all(rel[idx[r:]][1:] <= rel[idx[r:]][:-1])  # the rest: by relevance
        assert set(idx.tolist()) == set(torch.argsort(rel, descending=True)[:12].tolist())
    torch.testing.assert_close(sel.features.norm(dim=-1), torch.ones(16, 12))


def test_batched_selection_equals_official_per_sample_loop():
    net = make_net(epsilon=0.04)
    official = official_copy(net)
    g, p = inputs(batch=16)
    with torch.no_grad():
        sel = net.select_attributes(g, p)
        ref_feats, ref_counts = official.select(g, p)
        torch.testing.assert_close(sel.features, ref_feats)
        assert sel.num_kept.tolist() == ref_counts
        out = net(g, p)
        torch.testing.assert_close(out.subject, official.phi_s(g))
        torch.testing.assert_close(out.attributes, official.phi_a(ref_feats))


def test_last_block_query_rows_only_equals_full_block():
    """attribute_latents skips the last block's patch rows; the query rows must equal a full pass."""
    net = make_net()
    g, p = inputs()
    with torch.no_grad():
        fast, fast_maps = net.attribute_latents(p, return_attention=True)
        x = torch.cat([net.attribute_queries.expand(6, -1, -1), p], dim=1)
        full_maps = []
        for block in net.attribute_encoder:
            x, attn = block(x)
            full_maps.append(attn[:, :, :24])
        full = net.attribute_head(x[:, :24])
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-6)
    for a, b in zip(fast_maps, full_maps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
