"""Self-checks of the ViViT (flax) and ViT-MSN (torch) reference fixtures.

Each reference is compared against a second, plain-numpy computation written
here, so a mistake would have to be made twice, in two styles, to slip through.
"""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.serialization  # noqa: E402
import jax  # noqa: E402
import torch  # noqa: E402

from converters.registry import get_variant  # noqa: E402
from fixtures import msn_original as msn  # noqa: E402
from fixtures import parity_vit_msn, parity_vivit  # noqa: E402
from fixtures import vivit_original as vivit  # noqa: E402

# The self-checks' own small sizes (the parity cases take theirs from the shrink rule).
VIVIT_TINY = vivit.ViViTHParams(image_size=32, num_frames=4, tubelet=(2, 8, 8), hidden_size=32,
                                num_layers=2, num_heads=2, mlp_dim=64, num_classes=5)
MSN_TINY = msn.MSNHParams(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                          mlp_dim=128, proj_hidden=48, proj_out=16, num_prototypes=10)


# ----------------------------------------------------------------------------- numpy helpers

def np_layernorm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_mhdpa(x, p):
    """flax MultiHeadDotProductAttention with (D,H,hd) / (H,hd,D) kernels."""
    q, k, v = (np.einsum('bnd,dhk->bnhk', x, p[n]['kernel']) + p[n]['bias']
               for n in ('query', 'key', 'value'))
    a = np_softmax(np.einsum('bqhk,bmhk->bhqm', q, k) / np.sqrt(q.shape[-1]))
    o = np.einsum('bhqm,bmhk->bqhk', a, v)
    return np.einsum('bqhk,hkd->bqd', o, p['out']['kernel']) + p['out']['bias']


def np_tubelets(video, tubelet):
    """(B,T,H,W,C) -> (B, t, h, w, ft*fh*fw*C), flattened in kernel order."""
    b, T, H, W, C = video.shape
    ft, fh, fw = tubelet
    x = video.reshape(b, T // ft, ft, H // fh, fh, W // fw, fw, C)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, T // ft, H // fh, W // fw, ft * fh * fw * C)


def to_np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------- ViViT

@pytest.fixture(scope='module')
def vv():
    hp = VIVIT_TINY
    module, params = vivit.build_reference(hp, seed=0)
    video = np.random.RandomState(1).standard_normal(
        (2, hp.num_frames, hp.image_size, hp.image_size, hp.channels)).astype(np.float32)
    return hp, module, params, video


@pytest.fixture(scope='module')
def vv_inter(vv):
    """Intermediate outputs of the module (one jitted capture: eager flax is slow)."""
    _, module, params, video = vv
    names = ('embedding', 'LayerNorm_0', 'MultiHeadDotProductAttention_0')
    run = jax.jit(lambda p, v: module.apply(
        {'params': p}, v, mutable='intermediates',
        capture_intermediates=lambda mdl, _: mdl.name in names)[1]['intermediates'])
    return jax.tree_util.tree_map(np.asarray, run(params, video))


def _shapes(tree):
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), tree)


@pytest.mark.slow
def test_vivit_full_size_tree():
    hp = parity_vivit.hparams(get_variant("vivit-b-16x2-kinetics400").config)
    assert (hp.image_size, hp.num_frames, hp.tubelet, hp.hidden_size, hp.num_layers,
            hp.num_heads, hp.mlp_dim, hp.num_classes) == (224, 32, (2, 16, 16), 768, 12, 12,
                                                          3072, 400)
    t = _shapes(vivit.abstract_params(hp))
    assert set(t) == {'cls', 'embedding', 'Transformer', 'output_projection'}  # no pre_logits
    assert t['cls'] == (1, 1, 768)
    assert t['embedding'] == {'kernel': (2, 16, 16, 3, 768), 'bias': (768,)}
    tr = t['Transformer']
    assert tr['posembed_input'] == {'pos_embedding': (1, 1 + 16 * 14 * 14, 768)}
    assert set(tr) == {'posembed_input', 'encoder_norm'} | {f'encoderblock_{i}' for i in range(12)}
    assert tr['encoder_norm'] == {'scale': (768,), 'bias': (768,)}
    blk = tr['encoderblock_11']
    assert set(blk) == {'LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0'}
    att = blk['MultiHeadDotProductAttention_0']
    for n in ('query', 'key', 'value'):
        assert att[n] == {'kernel': (768, 12, 64), 'bias': (12, 64)}
    assert att['out'] == {'kernel': (12, 64, 768), 'bias': (768,)}
    assert blk['MlpBlock_0'] == {'Dense_0': {'kernel': (768, 3072), 'bias': (3072,)},
                                 'Dense_1': {'kernel': (3072, 768), 'bias': (768,)}}
    assert t['output_projection'] == {'kernel': (768, 400), 'bias': (400,)}
    d, m, L = 768, 3072, 12
    per_block = 4 * d + 4 * (d * d + d) + 2 * d * m + m + d
    expect = d + (2 * 16 * 16 * 3 + 1) * d + 3137 * d + L * per_block + 2 * d + d * 400 + 400
    assert vivit.param_count(vivit.abstract_params(hp)) == expect == 88_954_000
    # optional pre_logits (off in the released config)
    t2 = _shapes(vivit.abstract_params(vivit.ViViTHParams(representation_size=768)))
    assert t2['pre_logits'] == {'kernel': (768, 768), 'bias': (768,)}


def test_vivit_params_deterministic_and_nontrivial(vv):
    hp, _, params, _ = vv
    _, again = vivit.build_reference(hp, seed=0)
    _, other = vivit.build_reference(hp, seed=1)
    for (path, a), (_, b), (_, c) in zip(*(vivit._flatten(t) for t in (params, again, other))):
        a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
        assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c), path
        assert a.std() > 1e-3, path
        if path[-1] == 'scale':
            assert abs(a.mean() - 1) < 0.1 and not np.allclose(a, 1), path


def test_vivit_embedding_conv_matches_patchify(vv, vv_inter):
    hp, module, params, video = vv
    got = vv_inter['embedding']['__call__'][0]
    k = np.asarray(params['embedding']['kernel'], np.float64)  # (ft,fh,fw,C,D)
    want = np_tubelets(video.astype(np.float64), hp.tubelet) @ k.reshape(-1, hp.hidden_size)
    want += np.asarray(params['embedding']['bias'])
    assert got.shape == (2, *hp.grid, hp.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_vivit_attention_matches_manual(vv, vv_inter):
    _, module, params, video = vv
    blk = vv_inter['Transformer']['encoderblock_1']
    x = blk['LayerNorm_0']['__call__'][0].astype(np.float64)
    got = blk['MultiHeadDotProductAttention_0']['__call__'][0]
    p = to_np(params['Transformer']['encoderblock_1']['MultiHeadDotProductAttention_0'])
    np.testing.assert_allclose(got, np_mhdpa(x, p), atol=1e-4, rtol=1e-4)


def test_vivit_mlp_uses_tanh_gelu(vv):
    hp, _, params, _ = vv
    p = params['Transformer']['encoderblock_0']['MlpBlock_0']
    x = 3 * np.random.RandomState(2).standard_normal((4, hp.hidden_size)).astype(np.float32)
    got = np.asarray(vivit.MlpBlock(hp.mlp_dim).apply({'params': p}, x), np.float64)
    q = to_np(p)
    h = x @ q['Dense_0']['kernel'] + q['Dense_0']['bias']
    tanh_out = np_gelu_tanh(h) @ q['Dense_1']['kernel'] + q['Dense_1']['bias']
    erf_out = np_gelu_erf(h) @ q['Dense_1']['kernel'] + q['Dense_1']['bias']
    np.testing.assert_allclose(got, tanh_out, atol=2e-5, rtol=1e-5)
    assert np.abs(got - erf_out).max() > 1e-4


@pytest.mark.slow
def test_vivit_full_forward_matches_numpy(vv):
    """cls before pos-emb, t-major tokens, pre-norm blocks, token-0 head."""
    hp, module, params, video = vv
    p = to_np(params)
    x = np_tubelets(video.astype(np.float64), hp.tubelet).reshape(2, hp.num_tokens, -1)
    x = x @ p['embedding']['kernel'].reshape(-1, hp.hidden_size) + p['embedding']['bias']
    x = np.concatenate([np.broadcast_to(p['cls'], (2, 1, hp.hidden_size)), x], 1)
    tr = p['Transformer']
    x = x + tr['posembed_input']['pos_embedding']
    for i in range(hp.num_layers):
        b = tr[f'encoderblock_{i}']
        x = x + np_mhdpa(np_layernorm(x, **b['LayerNorm_0']), b['MultiHeadDotProductAttention_0'])
        m = b['MlpBlock_0']
        h = np_layernorm(x, **b['LayerNorm_1']) @ m['Dense_0']['kernel'] + m['Dense_0']['bias']
        x = x + np_gelu_tanh(h) @ m['Dense_1']['kernel'] + m['Dense_1']['bias']
    hidden = np_layernorm(x, **tr['encoder_norm'])
    logits = hidden[:, 0] @ p['output_projection']['kernel'] + p['output_projection']['bias']
    np.testing.assert_allclose(vivit.forward_hidden(module, params, video), hidden, atol=1e-4)
    np.testing.assert_allclose(vivit.forward(module, params, video), logits, atol=1e-4)


def test_vivit_jit_cached(vv):
    hp, module, params, video = vv
    a = vivit.forward(module, params, video)
    b = vivit.forward(vivit.ViViT(hp), params, video)
    fn = vivit._jitted_apply(hp, False)
    assert fn is vivit._jitted_apply(hp, False)
    assert fn._cache_size() == 1  # one compilation for repeated calls
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('layout', ['optimizer_target', 'params'])
def test_vivit_checkpoint_roundtrip(vv, tmp_path, layout):
    _, _, params, _ = vv
    path = tmp_path / 'checkpoint_12345'
    data = vivit.save_checkpoint(params, path, layout=layout)
    assert path.read_bytes() == data
    state = flax.serialization.msgpack_restore(data)
    if layout == 'optimizer_target':
        assert set(state) == {'global_step', 'optimizer', 'model_state', 'rng', 'accum_train_time'}
        assert set(state['optimizer']) == {'target', 'state'}
        tree = state['optimizer']['target']
        assert 'momentum' in state['optimizer']['state']['param_states']['cls']
    else:
        assert set(state) == {'opt_state', 'params', 'global_step', 'model_state', 'rng', 'metadata'}
        tree = state['params']
    assert state['global_step'] == 12345
    src, got = list(vivit._flatten(params)), list(vivit._flatten(tree))
    assert [p for p, _ in src] == [p for p, _ in got]
    for (path_, a), (_, b) in zip(src, got):
        assert isinstance(b, np.ndarray) and b.dtype == np.float32, path_
        np.testing.assert_array_equal(np.asarray(a), b)
    assert jax.tree_util.tree_structure(vivit.load_params(path)) == jax.tree_util.tree_structure(
        vivit._to_numpy(params))


# ----------------------------------------------------------------------------- ViT-MSN

@pytest.fixture(scope='module')
def ms():
    hp = MSN_TINY
    model = msn.build_reference(hp, seed=0)
    images = torch.randn(2, 3, hp.image_size, hp.image_size,
                         generator=torch.Generator().manual_seed(3))
    return hp, model, images


@pytest.mark.parametrize('name,d,m,h,L,p', [  # deit_small / base / large (msn src/deit.py)
    ('vit-msn-small', 384, 1536, 6, 12, 16), ('vit-msn-base', 768, 3072, 12, 12, 16),
    ('vit-msn-large', 1024, 4096, 16, 24, 16), ('vit-msn-base-4', 768, 3072, 12, 12, 4),
    ('vit-msn-large-7', 1024, 4096, 16, 24, 7)])
def test_msn_full_size_meta(name, d, m, h, L, p):
    hp = parity_vit_msn.hparams(get_variant(name).config)
    assert (hp.hidden_size, hp.mlp_dim, hp.num_heads, hp.num_layers, hp.patch_size,
            hp.image_size) == (d, m, h, L, p, 224)
    model = msn.build_reference_meta(hp)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    n = (224 // p) ** 2
    last = f'blocks.{L - 1}.'
    expect = {
        'cls_token': (1, 1, d), 'pos_embed': (1, n + 1, d),
        'patch_embed.proj.weight': (d, 3, p, p), 'patch_embed.proj.bias': (d,),
        last + 'norm1.weight': (d,), last + 'attn.qkv.weight': (3 * d, d),
        last + 'attn.qkv.bias': (3 * d,), last + 'attn.proj.weight': (d, d),
        last + 'norm2.bias': (d,), last + 'mlp.fc1.weight': (m, d), last + 'mlp.fc2.weight': (d, m),
        'norm.weight': (d,), 'norm.bias': (d,),
        'fc.fc1.weight': (2048, d), 'fc.bn1.running_var': (2048,), 'fc.bn1.num_batches_tracked': (),
        'fc.fc2.weight': (2048, 2048), 'fc.bn2.running_mean': (2048,), 'fc.fc3.weight': (256, 2048),
        'fc.fc3.bias': (256,),
    }
    for k, s in expect.items():
        assert sd[k] == s, k
    assert f'blocks.{L}.norm1.weight' not in sd
    assert len(sd) == 4 + 12 * L + 2 + 16
    assert not any(k.startswith('head') for k in sd)


def test_msn_forward_deterministic_and_shape(ms):
    hp, model, images = ms
    tokens = msn.forward_tokens(model, images)
    assert tokens.shape == (2, hp.num_patches + 1, hp.hidden_size)
    again = msn.forward_tokens(msn.build_reference(hp, seed=0), images)
    assert torch.equal(tokens, again)
    assert torch.equal(msn.forward_cls(model, images), tokens[:, 0])
    assert msn.forward_projection(model, images).shape == (2, hp.proj_out)
    other = msn.forward_tokens(msn.build_reference(hp, seed=1), images)
    assert not torch.allclose(tokens, other)


def test_msn_forward_matches_numpy(ms):
    """qkv split [q;k;v] head-major, cls+pos order, exact GELU, eps 1e-6, eval BN head."""
    hp, model, images = ms
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    x = images.double().numpy()
    b, P, D, H = x.shape[0], hp.patch_size, hp.hidden_size, hp.num_heads
    g = hp.image_size // P
    patches = x.reshape(b, 3, g, P, g, P).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    t = patches @ sd['patch_embed.proj.weight'].reshape(D, -1).T + sd['patch_embed.proj.bias']
    t = np.concatenate([np.broadcast_to(sd['cls_token'], (b, 1, D)), t], 1) + sd['pos_embed']
    for i in range(hp.num_layers):
        w = lambda n: sd[f'blocks.{i}.{n}']  # noqa: E731
        y = np_layernorm(t, w('norm1.weight'), w('norm1.bias'))
        qkv = (y @ w('attn.qkv.weight').T + w('attn.qkv.bias')).reshape(b, -1, 3, H, D // H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = np_softmax(np.einsum('bqhk,bmhk->bhqm', q, k) * (D // H) ** -0.5)
        o = np.einsum('bhqm,bmhk->bqhk', a, v).reshape(b, -1, D)
        t = t + o @ w('attn.proj.weight').T + w('attn.proj.bias')
        y = np_layernorm(t, w('norm2.weight'), w('norm2.bias'))
        y = np_gelu_erf(y @ w('mlp.fc1.weight').T + w('mlp.fc1.bias'))
        t = t + y @ w('mlp.fc2.weight').T + w('mlp.fc2.bias')
    t = np_layernorm(t, sd['norm.weight'], sd['norm.bias'])
    np.testing.assert_allclose(msn.forward_tokens(model, images).numpy(), t, atol=1e-4)

    def bn(z, n):
        return ((z - sd[f'fc.{n}.running_mean']) / np.sqrt(sd[f'fc.{n}.running_var'] + 1e-5)
                * sd[f'fc.{n}.weight'] + sd[f'fc.{n}.bias'])
    z = t[:, 0]
    for lin, norm in (('fc1', 'bn1'), ('fc2', 'bn2')):
        z = np_gelu_erf(bn(z @ sd[f'fc.{lin}.weight'].T + sd[f'fc.{lin}.bias'], norm))
    z = z @ sd['fc.fc3.weight'].T + sd['fc.fc3.bias']
    np.testing.assert_allclose(msn.forward_projection(model, images).numpy(), z, atol=1e-4)


def test_msn_every_tensor_nontrivial(ms):
    _, model, _ = ms
    for k, v in model.state_dict().items():
        if k.endswith('num_batches_tracked'):
            assert v.item() > 0, k
        elif k.endswith('running_var') or (k.endswith('weight') and v.ndim == 1):
            assert not torch.allclose(v, torch.ones_like(v)), k
        else:
            assert v.std() > 1e-3, k


def test_msn_checkpoint_container(ms, tmp_path):
    hp, model, _ = ms
    path = tmp_path / 'vits16_800ep.pth.tar'
    msn.save_checkpoint(model, path)
    ck = torch.load(path, map_location='cpu', weights_only=True)
    assert set(ck) == {'encoder', 'opt', 'prototypes', 'target_encoder', 'epoch', 'loss',
                       'batch_size', 'world_size', 'lr', 'temperature'}
    ref = model.state_dict()
    for which in ('encoder', 'target_encoder'):
        assert list(ck[which]) == ['module.' + k for k in ref]
    for k, v in ref.items():  # target_encoder is the model; encoder differs everywhere
        assert torch.equal(ck['target_encoder']['module.' + k], v), k
        assert not torch.equal(ck['encoder']['module.' + k], v), k
    assert ck['prototypes'].shape == (hp.num_prototypes, hp.proj_out)
    groups = ck['opt']['param_groups']
    assert len(groups) == 3 and groups[1]['WD_exclude'] and groups[2]['LARS_exclude']
    n_params = len(list(model.parameters())) + 1
    assert sorted(i for g in groups for i in g['params']) == list(range(n_params))
    assert set(ck['opt']['state'][0]) == {'step', 'exp_avg', 'exp_avg_sq'}
