"""Self-checks of the Perceiver IO (Haiku) reference fixture.

The Haiku reference is compared against plain-numpy computations written here in a
different style (explicit loops, float64), so a mistake has to be made twice to pass.
"""
import math
import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from converters import perceiver  # noqa: E402
from fixtures import parity_perceiver  # noqa: E402
from fixtures import perceiver_original as P  # noqa: E402

# One xdist worker runs this module, so the module-scoped `tiny` fixture (six compiles)
# is built once per run rather than once per worker.
pytestmark = pytest.mark.xdist_group('perceiver-reference')

# The self-checks' own tiny sizes (the parity cases take theirs from the shrink rule). They keep
# every structural feature (num_blocks > 1 so weight sharing matters,
# > 1 self-attend, several heads) and keep the constants the transformers port hard-codes
# (MLM decoder qk 256 / 8 heads; learned-pos 256 channels; fourier 64 bands at
# (224,224) / (56,56); flow 64 bands + 64 patch channels; multimodal 192/32 bands,
# padding 4) so that a tiny checkpoint stays convertible.
_TINY_ENCODER = dict(num_latents=6, d_latents=32, num_blocks=2, num_self_attends_per_block=2,
                     num_self_attend_heads=4, num_cross_attend_heads=1, qk_channels=None,
                     v_channels=None, cross_attend_widening_factor=1,
                     self_attend_widening_factor=1)
_TINY = {
    'mlm': dict(_TINY_ENCODER, vocab_size=262, d_model=16, seq_len=12, d_latents=24,
                num_cross_attend_heads=2, num_self_attend_heads=2, qk_channels=8, v_channels=24,
                decoder_num_heads=8, decoder_qk_channels=256),
    'image_learned': dict(_TINY_ENCODER, image_size=(16, 16), num_classes=10,
                          decoder_query_channels=32, decoder_num_heads=1, conv_channels=256,
                          pos_channels=256, project_pos_dim=256, decoder_query_residual=False),
    'image_fourier': dict(_TINY_ENCODER, image_size=(16, 16), num_classes=10,
                          decoder_query_channels=32, decoder_num_heads=1, num_bands=64,
                          max_resolution=(224, 224), decoder_query_residual=True),
    'image_conv': dict(_TINY_ENCODER, image_size=(16, 16), num_classes=10,
                       decoder_query_channels=32, decoder_num_heads=1, conv_channels=64,
                       bn_eps=1e-5, num_bands=64, max_resolution=(56, 56),
                       decoder_query_residual=True),
    'optical_flow': dict(_TINY_ENCODER, image_size=(6, 8), max_resolution=(6, 8), num_bands=64,
                         patches_channels=64, decoder_num_heads=1, rescale_factor=100.0,
                         flow_scale_factor=20.0),
    'multimodal': dict(_TINY_ENCODER, num_frames=2, image_size=(8, 8), patch_size=4,
                       audio_samples_per_frame=32, samples_per_patch=16, num_classes=7,
                       audio_num_bands=192, audio_max_resolution=(2 * 32,), image_num_bands=32,
                       image_max_resolution=(2, 2, 2), preprocessor_min_padding=4,
                       decoder_min_padding=2,
                       mask_probs=(('audio', 0.0), ('image', 0.0), ('label', 1.0)),
                       label_query_channels=32, output_num_channels=16, decoder_num_heads=1,
                       num_chunks=2, chunk_index=1),
}


def tiny_hparams(arch):
    return dict(_TINY[arch], batch_size=2)


# The released file of each architecture, from the registry.
RELEASED_FILE = {parity_perceiver.ARCHS[v.config["model_class"]].original: v.source.filename
                 for v in perceiver.VARIANTS}


# ----------------------------------------------------------------------------- numpy helpers

def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def np_ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p['scale'] + p['offset']


def np_lin(x, p):
    return x @ p['w'] + p['b']


def np_attention(params, pre, xq, xkv, heads, mask=None):
    q = np_lin(xq, params[pre + '/linear'])
    k = np_lin(xkv, params[pre + '/linear_1'])
    v = np_lin(xkv, params[pre + '/linear_2'])
    b, n, _ = q.shape
    dq, dv = q.shape[-1] // heads, v.shape[-1] // heads
    out = np.zeros((b, n, heads * dv))
    for bi in range(b):
        for h in range(heads):
            qh, kh, vh = (q[bi, :, h * dq:(h + 1) * dq], k[bi, :, h * dq:(h + 1) * dq],
                          v[bi, :, h * dv:(h + 1) * dv])
            logits = qh @ kh.T / np.sqrt(dq)
            if mask is not None:
                logits = np.where(mask[bi] > 0, logits, -1e30)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            o = w @ vh
            if mask is not None:
                o[(mask[bi] == 0).all(-1)] = 0.0
            out[bi, :, h * dv:(h + 1) * dv] = o
    return np_lin(out, params[pre + '/linear_3'])


def np_mlp(params, pre, x):
    return np_lin(np_gelu_tanh(np_lin(x, params[pre + '/linear'])), params[pre + '/linear_1'])


def np_cross(params, pre, xq, xkv, heads, residual, mask=None):
    a = np_attention(params, pre + '/attention', np_ln(xq, params[pre + '/layer_norm']),
                     np_ln(xkv, params[pre + '/layer_norm_1']), heads, mask)
    x = xq + a if residual else a
    return x + np_mlp(params, pre + '/mlp', np_ln(x, params[pre + '/layer_norm_2']))


def np_self(params, pre, x, heads):
    y = np_ln(x, params[pre + '/layer_norm'])
    x = x + np_attention(params, pre + '/attention', y, y, heads)
    return x + np_mlp(params, pre + '/mlp', np_ln(x, params[pre + '/layer_norm_1']))


def np_encoder(params, hp, x, input_mask=None, pre='perceiver_encoder'):
    b = x.shape[0]
    z = np.broadcast_to(params[pre + '/~/trainable_position_encoding']['pos_embs'],
                        (b, hp['num_latents'], hp['d_latents']))
    mask = None
    if input_mask is not None:
        mask = np.ones((b, hp['num_latents'], 1)) * input_mask[:, None, :]
    z = np_cross(params, pre + '/~/cross_attention', z, x, hp['num_cross_attend_heads'], True, mask)
    for _ in range(hp['num_blocks']):
        for i in range(hp['num_self_attends_per_block']):
            name = pre + '/~/self_attention' + (f'_{i}' if i else '')
            z = np_self(params, name, z, hp['num_self_attend_heads'])
    return z


def np_fourier(index_dims, num_bands, max_res):
    """Features of the linspace(-1,1) grid, built channel by channel."""
    axes = [np.linspace(-1, 1, n) for n in index_dims]
    grid = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, len(index_dims))
    cols = [grid[:, d] for d in range(len(index_dims))]
    for fn in (np.sin, np.cos):
        for d in range(len(index_dims)):
            for f in np.linspace(1, max_res[d] / 2, num_bands):
                cols.append(fn(np.pi * f * grid[:, d]))
    return np.stack(cols, -1)


def f64(params):
    return {m: {k: np.asarray(v, np.float64) for k, v in leaves.items()}
            for m, leaves in params.items()}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def tiny():
    """arch -> (hparams, params, state, inputs, outputs), each forward run once."""
    out = {}
    for arch in P.ARCHITECTURES:
        hp = tiny_hparams(arch)
        params, state = P.build_reference(arch, hp, seed=0)
        inputs = P.make_inputs(arch, hp, seed=0)
        out[arch] = (hp, params, state, inputs, P.forward(arch, hp, params, state, inputs))
    return out


# ----------------------------------------------------------------------------- full size

FULL_SPOT = {
    'mlm': {
        'embed': ('embeddings', (262, 768)),
        'trainable_position_encoding': ('pos_embs', (2048, 768)),
        'perceiver_encoder/~/trainable_position_encoding': ('pos_embs', (256, 1280)),
        'perceiver_encoder/~/cross_attention/attention/linear': ('w', (1280, 256)),
        'perceiver_encoder/~/cross_attention/attention/linear_2': ('w', (768, 1280)),
        'perceiver_encoder/~/cross_attention/layer_norm_1': ('scale', (768,)),
        'perceiver_encoder/~/self_attention_25/attention/linear_3': ('w', (1280, 1280)),
        'basic_decoder/~/trainable_position_encoding': ('pos_embs', (2048, 768)),
        'basic_decoder/cross_attention/attention/linear': ('w', (768, 256)),
        'basic_decoder/cross_attention/attention/linear_2': ('w', (1280, 768)),
        'embedding_decoder': ('bias', (262,)),
    },
    'image_learned': {
        'image_preprocessor/~/conv2_d': ('w', (1, 1, 3, 256)),
        'image_preprocessor/~_build_network_inputs/trainable_position_encoding':
            ('pos_embs', (50176, 256)),
        'image_preprocessor/~_build_network_inputs/position_encoding_projector/linear':
            ('w', (256, 256)),
        'perceiver_encoder/~/cross_attention/attention/linear_1': ('w', (512, 512)),
        'perceiver_encoder/~/self_attention_5/mlp/linear': ('w', (1024, 1024)),
        'classification_decoder/~/basic_decoder/~/trainable_position_encoding':
            ('pos_embs', (1, 1024)),
        'classification_decoder/~/basic_decoder/output': ('w', (1024, 1000)),
    },
    'image_fourier': {
        'perceiver_encoder/~/cross_attention/layer_norm_1': ('scale', (261,)),
        'perceiver_encoder/~/cross_attention/attention/linear_1': ('w', (261, 261)),
        'perceiver_encoder/~/trainable_position_encoding': ('pos_embs', (512, 1024)),
        'classification_decoder/~/basic_decoder/output': ('b', (1000,)),
    },
    'image_conv': {
        'image_preprocessor/~/conv2_d_downsample/~/conv': ('w', (7, 7, 3, 64)),
        'image_preprocessor/~/conv2_d_downsample/~/batchnorm': ('scale', (1, 1, 1, 64)),
        'perceiver_encoder/~/cross_attention/attention/linear_1': ('w', (322, 322)),
    },
    'optical_flow': {
        'image_preprocessor/patches_linear': ('w', (54, 64)),
        'perceiver_encoder/~/trainable_position_encoding': ('pos_embs', (2048, 512)),
        'perceiver_encoder/~/cross_attention/attention/linear_1': ('w', (322, 322)),
        'perceiver_encoder/~/self_attention_23/attention/linear': ('w', (512, 512)),
        'flow_decoder/~/basic_decoder/cross_attention/attention/linear': ('w', (322, 512)),
        'flow_decoder/~/basic_decoder/output': ('w', (322, 2)),
    },
    'multimodal': {
        'multimodal_preprocessor/audio_padding': ('pos_embs', (1, 303)),
        'multimodal_preprocessor/image_padding': ('pos_embs', (1, 461)),
        'multimodal_preprocessor/label_padding': ('pos_embs', (1, 4)),
        'multimodal_preprocessor/label_mask_token': ('pos_embs', (1, 704)),
        'encoder/~/trainable_position_encoding': ('pos_embs', (784, 512)),
        'encoder/~/cross_attention/attention/linear_1': ('w', (704, 704)),
        'encoder/~/self_attention_7/layer_norm': ('offset', (512,)),
        'classification_decoder/~/basic_decoder/~/trainable_position_encoding':
            ('pos_embs', (1, 1024)),
        'multimodal_decoder/~decoder_query/audio_padding': ('pos_embs', (1, 641)),
        'multimodal_decoder/~decoder_query/image_padding': ('pos_embs', (1, 831)),
        'multimodal_decoder/~decoder_query/label_padding': ('pos_embs', (1, 2)),
        'multimodal_decoder/~/basic_decoder/cross_attention/mlp/linear': ('w', (1026, 1026)),
        'multimodal_decoder/~/basic_decoder/output': ('w', (1026, 512)),
        'audio_postprocessor/linear': ('w', (512, 16)),
        'projection_postprocessor/linear': ('w', (512, 3)),
        'classification_postprocessor/linear': ('w', (512, 700)),
    },
}

FULL_COUNTS = {'mlm': 201108230, 'image_learned': 62255848, 'image_fourier': 48440627,
               'image_conv': 48646522, 'optical_flow': 41057134, 'multimodal': 19858855}


@pytest.mark.parametrize('arch', P.ARCHITECTURES)
def test_full_size_keys(arch):
    hp = P.full_size_hparams(arch)
    params, state = P.abstract_params(arch, hp)
    for module, (leaf, shape) in FULL_SPOT[arch].items():
        assert params[module][leaf].shape == shape, (module, leaf)
    enc = 'encoder' if arch == 'multimodal' else 'perceiver_encoder'
    n_self = {m.split('/')[2] for m in params if m.startswith(enc + '/~/self_attention')}
    assert len(n_self) == hp['num_self_attends_per_block']   # shared, not x num_blocks
    n = P.param_count(params)
    print(f'\n{arch}: {n:,} parameters (+{P.param_count(state)} state)')
    assert n == FULL_COUNTS[arch]
    if arch.startswith('image_'):
        # colab: only the learned-position model decodes without a query residual
        assert hp['decoder_query_residual'] is (arch != 'image_learned')
    if arch == 'image_conv':
        bn = 'image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/'
        assert set(state) == {bn + 'mean_ema', bn + 'var_ema'}
        assert set(state[bn + 'var_ema']) == {'average', 'hidden', 'counter'}
    else:
        assert state == {}


# ----------------------------------------------------------------------------- tiny forward

EXPECTED_SHAPES = {
    'mlm': {'logits': (2, 12, 262)},
    'image_learned': {'logits': (2, 10)},
    'image_fourier': {'logits': (2, 10)},
    'image_conv': {'logits': (2, 10)},
    'optical_flow': {'logits': (2, 6, 8, 2), 'flow': (2, 6, 8, 2)},
    'multimodal': {'audio': (2, 2 * 16), 'image': (2, 64, 3), 'label': (2, 7)},
}


@pytest.mark.parametrize('arch', P.ARCHITECTURES)
def test_tiny_forward(tiny, arch):
    hp, params, state, inputs, out = tiny[arch]
    assert {k: v.shape for k, v in out.items()} == EXPECTED_SHAPES[arch]
    for v in out.values():
        assert np.isfinite(v).all() and v.std() > 1e-3
    # deterministic: rebuilt params/inputs, another rng (dropout is off) -> same numbers
    params2, state2 = P.build_reference(arch, hp, seed=0)
    again = P.forward(arch, hp, params2, state2, P.make_inputs(arch, hp, seed=0), rng_seed=7)
    for k in out:
        np.testing.assert_array_equal(out[k], again[k])
    # every leaf is non-trivial
    for leaves in list(params.values()) + list(state.values()):
        for v in leaves.values():
            assert v.ndim == 0 or np.unique(v).size > 1


def test_tiny_params_differ_by_seed():
    hp = tiny_hparams('image_conv')
    (p0, s0), (p1, _) = P.build_reference('image_conv', hp, 0), P.build_reference('image_conv', hp, 1)
    bn = 'image_preprocessor/~/conv2_d_downsample/~/batchnorm'
    assert not np.array_equal(p0[bn]['scale'], p1[bn]['scale'])
    assert (s0[bn + '/~/var_ema']['average'] > 0).all()
    assert abs(float(p0[bn]['scale'].mean()) - 1) < 0.1   # scale ~ 1 + noise


def test_mlm_matches_numpy(tiny):
    hp, params, _, inputs, out = tiny['mlm']
    p = f64(params)
    ids, mask = inputs['inputs'], inputs['input_mask']
    b = ids.shape[0]
    x = p['embed']['embeddings'][ids] + p['trainable_position_encoding']['pos_embs'][None]
    z = np_encoder(p, hp, x, input_mask=mask)
    q = np.broadcast_to(p['basic_decoder/~/trainable_position_encoding']['pos_embs'],
                        (b,) + x.shape[1:])
    dmask = mask[:, :, None] * np.ones((1, 1, hp['num_latents']))
    y = np_cross(p, 'basic_decoder/cross_attention', q, z, hp['decoder_num_heads'], False, dmask)
    logits = y @ p['embed']['embeddings'].T + p['embedding_decoder']['bias']
    np.testing.assert_allclose(out['logits'], logits, rtol=1e-4, atol=1e-4)
    # masked query rows see zeros out of attention (then the output bias / MLP)
    assert (mask == 0).any()


def test_image_fourier_matches_numpy(tiny):
    hp, params, _, inputs, out = tiny['image_fourier']
    p = f64(params)
    img = inputs['images'].astype(np.float64)
    b, h, w, c = img.shape
    pos = np_fourier((h, w), hp['num_bands'], hp['max_resolution'])
    assert pos.shape[-1] == 2 + 2 * 2 * 64
    x = np.concatenate([img.reshape(b, h * w, c), np.broadcast_to(pos, (b,) + pos.shape)], -1)
    z = np_encoder(p, hp, x)
    dec = 'classification_decoder/~/basic_decoder'
    q = np.broadcast_to(p[dec + '/~/trainable_position_encoding']['pos_embs'], (b, 1, hp['d_latents']))
    y = np_cross(p, dec + '/cross_attention', q, z, 1, hp['decoder_query_residual'])
    logits = np_lin(y, p[dec + '/output'])[:, 0]
    np.testing.assert_allclose(out['logits'], logits, rtol=1e-4, atol=1e-4)


def test_flow_scale_and_query(tiny):
    hp, params, state, inputs, out = tiny['optical_flow']
    np.testing.assert_allclose(out['flow'], out['logits'] * 20, rtol=1e-6)
    # patches: 3x3 neighbourhood of two frames -> 54 channels, (row, col, c) order
    imgs = inputs['images']
    s2d = np.asarray(jax.jit(lambda x: P.space_to_depth(P.flow_patches(x), 2, 1))(imgs))[:, 0]
    assert s2d.shape[-1] == 54
    r, cc = 2, 3
    expected = []
    for t in range(2):
        padded = np.pad(imgs[0, t], ((1, 1), (1, 1), (0, 0)))
        expected.append(padded[r:r + 3, cc:cc + 3].reshape(-1))
    np.testing.assert_array_equal(s2d[0, r, cc], np.concatenate(expected))


def test_multimodal_label_is_masked_and_chunk_matters(tiny):
    hp, params, state, inputs, out = tiny['multimodal']
    # mask probability 1 for the label: the label input cannot influence the output
    other = dict(inputs, label=np.roll(inputs['label'], 1, axis=1) * 3.0)
    again = P.forward('multimodal', hp, params, state, other)
    for k in out:
        np.testing.assert_allclose(out[k], again[k], rtol=1e-6, atol=1e-6)
    # another chunk of output points gives other image/audio outputs, same label
    shifted = dict(inputs, image_subsampling=inputs['image_subsampling'] - 64,
                   audio_subsampling=inputs['audio_subsampling'] - 2)
    chunk0 = P.forward('multimodal', hp, params, state, shifted)
    assert not np.allclose(chunk0['image'], out['image'])
    np.testing.assert_allclose(chunk0['label'], out['label'], rtol=1e-5, atol=1e-5)


def test_subsampled_positions_do_not_reach_one():
    pos = np.asarray(jax.jit(lambda i: P.subsampled_positions(i, (2, 3)))(np.arange(6)))
    np.testing.assert_allclose(pos, [[-1, -1], [-1, -1 / 3], [-1, 1 / 3],
                                     [0, -1], [0, -1 / 3], [0, 1 / 3]], atol=1e-6)


# ----------------------------------------------------------------------------- building blocks

def _conv_stem_apply(params, state, x):
    f = hk.transform_with_state(lambda x: P.Conv2DDownsample(64, name='conv2_d_downsample')(x, False))
    sub = {k.split('image_preprocessor/~/')[1]: v for k, v in params.items()
           if k.startswith('image_preprocessor/~/conv2_d_downsample')}
    subs = {k.split('image_preprocessor/~/')[1]: v for k, v in state.items()}
    return np.asarray(jax.jit(f.apply)(sub, subs, None, x)[0])


def np_maxpool_same(x, k=3, s=2):
    b, h, w, c = x.shape
    oh, ow = -(-h // s), -(-w // s)
    ph = max((oh - 1) * s + k - h, 0)
    pw = max((ow - 1) * s + k - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
                constant_values=-np.inf)
    out = np.empty((b, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = xp[:, i * s:i * s + k, j * s:j * s + k].max(axis=(1, 2))
    return out


def test_conv_stem_tf_same(tiny):
    hp, params, state, inputs, _ = tiny['image_conv']
    x = inputs['images']                                # 16x16: even input
    got = _conv_stem_apply(params, state, x)
    pre = 'image_preprocessor/~/conv2_d_downsample/~/'
    w = params[pre + 'conv']['w']

    def stem(pads):
        y = np.asarray(jax.lax.conv_general_dilated(
            x, w, (2, 2), (pads, pads), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            precision=jax.lax.Precision.HIGHEST))
        mean = state[pre + 'batchnorm/~/mean_ema']['average']
        var = state[pre + 'batchnorm/~/var_ema']['average']
        bn = params[pre + 'batchnorm']
        y = (y - mean) / np.sqrt(var + 1e-5) * bn['scale'] + bn['offset']
        return np_maxpool_same(np.maximum(y, 0))

    np.testing.assert_allclose(got, stem((2, 3)), rtol=1e-4, atol=1e-4)   # TF SAME: (2, 3)
    assert np.abs(got - stem((3, 3))).max() > 1e-2                       # not PyTorch's (3, 3)
    assert got.shape == (2, 4, 4, 64)


def test_conv_stem_output_size():
    f = hk.transform_with_state(lambda x: P.Conv2DDownsample(64)(x, True))
    params, state = jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    out = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x)[0], params, state,
                         jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert out.shape == (1, 56, 56, 64)
    # analytically: 224 -> conv ceil(224/2) = 112 -> SAME pool ceil(112/2) = 56, while an
    # unpadded 3x3/2 pool gives floor((112-3)/2)+1 = 55; check the pool on a small example
    x = np.random.default_rng(0).standard_normal((1, 10, 10, 2)).astype(np.float32)
    pooled = np.asarray(hk.max_pool(x, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME'))
    assert pooled.shape[1] == math.ceil(10 / 2) == 5 != (10 - 3) // 2 + 1
    np.testing.assert_array_equal(pooled, np_maxpool_same(x))
    assert math.ceil(112 / 2) == 56 and (112 - 3) // 2 + 1 == 55


def test_gelu_is_tanh_approximation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 8)).astype(np.float32) * 3
    f = hk.transform(lambda x: P.MLP(2)(x))
    params = jax.tree_util.tree_map(
        lambda a: rng.standard_normal(a.shape).astype(np.float32) * 0.5,
        jax.eval_shape(f.init, jax.random.PRNGKey(0), x))
    got = np.asarray(jax.jit(f.apply)(params, None, x))
    h = x.astype(np.float64) @ params['mlp/linear']['w'] + params['mlp/linear']['b']
    ref = np_gelu_tanh(h) @ params['mlp/linear_1']['w'] + params['mlp/linear_1']['b']
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    erf = np_gelu_erf(h) @ params['mlp/linear_1']['w'] + params['mlp/linear_1']['b']
    assert np.abs(got - erf).max() > 1e-4


def test_fourier_features_layout():
    got = np.asarray(jax.jit(lambda: P.fourier_features(P.linear_positions((3, 5)), 4, (7, 9)))())
    np.testing.assert_allclose(got, np_fourier((3, 5), 4, (7, 9)), rtol=1e-5, atol=1e-5)
    assert got.shape == (15, 2 + 2 * 2 * 4)
    # [pos | sin: dim0 f1..fK, dim1 f1..fK | cos: ...]; f_K = res/2 (Nyquist)
    y = np.linspace(-1, 1, 3)[2]
    assert got[14, 0] == pytest.approx(y)
    assert got[14, 2 + 3] == pytest.approx(np.sin(np.pi * 3.5 * y), abs=1e-5)
    assert got[14, 2 + 8 + 4] == pytest.approx(np.cos(np.pi * 1.0 * 1.0), abs=1e-5)


def test_attention_mask_and_scale():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 3, 2, 4)), rng.standard_normal((1, 5, 2, 4)),
               rng.standard_normal((1, 5, 2, 6)))
    mask = np.ones((1, 3, 5), np.int32)
    mask[0, 0, 3:] = 0
    mask[0, 2] = 0                                     # a fully masked query row
    got = np.asarray(jax.jit(P._attend)(*(a.astype(np.float32) for a in (q, k, v)), mask))
    ref = np.zeros((1, 3, 12))
    for h in range(2):
        logits = q[0, :, h] @ k[0, :, h].T / 2.0      # sqrt(head_dim=4)
        logits = np.where(mask[0] > 0, logits, -1e30)
        wts = np.exp(logits - logits.max(-1, keepdims=True))
        wts /= wts.sum(-1, keepdims=True)
        ref[0, :, h * 6:(h + 1) * 6] = wts @ v[0, :, h]
    ref[0, 2] = 0.0
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_self_attention_weights_shared_across_blocks(tiny):
    hp, params, state, inputs, out = tiny['mlm']
    assert hp['num_blocks'] == 2
    hp1 = dict(hp, num_blocks=1)
    abs1, abs2 = P.abstract_params('mlm', hp1)[0], P.abstract_params('mlm', hp)[0]
    shapes = lambda t: {(m, k): v.shape for m, leaves in t.items() for k, v in leaves.items()}
    assert shapes(abs1) == shapes(abs2)
    assert P.param_count(abs1) == P.param_count(abs2)
    one = P.forward('mlm', hp1, params, state, inputs)['logits']
    assert np.abs(one - out['logits']).max() > 1e-3


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize('arch', P.ARCHITECTURES)
def test_save_checkpoint_roundtrip(tiny, tmp_path, arch):
    hp, params, state, _, _ = tiny[arch]
    path = tmp_path / RELEASED_FILE[arch]
    P.save_checkpoint(arch, params, state, path)
    with open(path, 'rb') as f:
        obj = pickle.load(f)
    assert type(obj) is dict
    if arch in P.IMAGE_ARCHS:
        assert set(obj) == {'params', 'state'}
        got_p, got_s = obj['params'], obj['state']
        assert (got_s == {}) == (arch != 'image_conv')
    else:
        assert 'params' not in obj          # the params mapping itself
        got_p, got_s = obj, {}
    for tree, ref in ((got_p, params), (got_s, state if arch in P.IMAGE_ARCHS else {})):
        assert set(tree) == set(ref)
        for m in ref:
            assert type(tree[m]) is dict and set(tree[m]) == set(ref[m])
            for k in ref[m]:
                assert isinstance(tree[m][k], np.ndarray)
                assert tree[m][k].dtype == np.asarray(ref[m][k]).dtype
                np.testing.assert_array_equal(tree[m][k], ref[m][k])
    p2, s2 = P.load_checkpoint(path)
    assert set(p2) == set(params)


# ----------------------------------------------------------------------------- options for the parity tests

def test_conv_stem_padding_option(tiny):
    """conv_padding/pool_padding build the stem with the HF port's paddings ((3, 3) and an
    unpadded pool), for the HF conv model's labelled weights check only; the defaults are
    the original's TF SAME (test_conv_stem_tf_same)."""
    hp, params, state, inputs, _ = tiny['image_conv']
    pre = 'image_preprocessor/~/conv2_d_downsample/~/'
    f = hk.transform_with_state(lambda x: P.Conv2DDownsample(
        64, conv_padding=((3, 3), (3, 3)), pool_padding='VALID', name='conv2_d_downsample')(x, False))
    sub = {k.split('image_preprocessor/~/')[1]: v for k, v in params.items() if k.startswith(pre[:-3])}
    subs = {k.split('image_preprocessor/~/')[1]: v for k, v in state.items()}
    got = np.asarray(jax.jit(f.apply)(sub, subs, None, inputs['images'])[0])
    y = np.asarray(jax.lax.conv_general_dilated(
        inputs['images'], params[pre + 'conv']['w'], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST))
    mean, var = state[pre + 'batchnorm/~/mean_ema']['average'], state[pre + 'batchnorm/~/var_ema']['average']
    bn = params[pre + 'batchnorm']
    y = np.maximum((y - mean) / np.sqrt(var + 1e-5) * bn['scale'] + bn['offset'], 0)
    want = np.stack([np.stack([y[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(3)], 1)
                     for i in range(3)], 1)   # 8x8 -> 3x3, no padding
    assert got.shape == (2, 3, 3, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_flatmapping_container_is_haikus_pre_2022_format(tiny, tmp_path):
    """container='flatmapping' pickles every Haiku mapping by reference to
    haiku._src.data_structures.FlatMapping, as Haiku's own pre-2022 test pickles do;
    today's Haiku restores them as plain dicts."""
    import pickletools

    hp, params, state, _, _ = tiny['image_conv']
    path = P.save_checkpoint('image_conv', params, state, tmp_path / 'c.pystate', container='flatmapping')
    data = path.read_bytes()
    names = [arg for op, arg, _ in pickletools.genops(data) if op.name in ('SHORT_BINUNICODE', 'BINUNICODE')]
    assert 'haiku._src.data_structures' in names and 'FlatMapping' in names
    assert max(op.proto for op, _, _ in pickletools.genops(data)) <= 4   # protocol 4 by default
    p2, s2 = P.load_checkpoint(path)
    assert type(p2) is dict and all(type(v) is dict for v in p2.values())
    for m in params:
        for k in params[m]:
            np.testing.assert_array_equal(p2[m][k], params[m][k])
    assert set(s2) == set(state)
    with pytest.raises(ValueError, match='unknown container'):
        P.save_checkpoint('mlm', params, state, tmp_path / 'x', container='npz')
