"""Self-checks of the X-CLIP original-framework reference (fixtures/xclip_original.py).

The structure checks spell the expected checkpoint layout out independently of the
reference code; the numerics checks recompute pieces by hand from raw parameters.
"""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from converters.registry import get_variant
from fixtures import xclip_original as X
from fixtures.parity_xclip import hparams


def tiny_hparams(**overrides) -> dict:
    """The self-checks' own few-thousand-parameter config (the parity cases take theirs from
    the shrink rule): every head split real, the text tower's single head included."""
    hp = dict(embed_dim=128, image_resolution=32, vision_layers=2, vision_width=128,
              vision_patch_size=16, context_length=8, vocab_size=50, transformer_width=64,
              transformer_heads=1, transformer_layers=2, T=3, droppath=0., mit_layers=1,
              prompts_alpha=0.1, prompts_layers=2, use_cache=False, use_checkpoint=False)
    hp.update(overrides)
    return hp


HP = tiny_hparams()  # embed 128, vision 128 (2 heads), text 64 (1 head), T=3, 32px/16
EOT = HP['vocab_size'] - 1
L_TOK = (HP['image_resolution'] // HP['vision_patch_size']) ** 2 + 1


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add sync overhead (3-4x slower on a busy box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def model():
    return X.build_reference(HP, seed=0)


def _inputs(b=2, eot_pos=(3, 5, 7, 2), seed=1):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, HP['T'], 3, HP['image_resolution'], HP['image_resolution'], generator=g)
    ids = torch.randint(1, EOT, (len(eot_pos), HP['context_length']), generator=g)
    for i, p in enumerate(eot_pos):
        ids[i, p] = EOT
        ids[i, p + 1:] = 0  # padding after the end token, as the CLIP tokenizer does
    return video, ids


# ---------------------------------------------------------------- structure (full size)

def _expected_shapes(hp):
    E, W, Wt = hp['embed_dim'], hp['vision_width'], hp['transformer_width']
    p, T = hp['vision_patch_size'], hp['T']
    grid = hp['image_resolution'] // p
    s = {}

    def ln(k, d):
        s[k + '.weight'], s[k + '.bias'] = (d,), (d,)

    def lin(k, i, o, bias=True):
        s[k + '.weight'] = (o, i)
        if bias:
            s[k + '.bias'] = (o,)

    def mha(k, d):
        s[k + '.in_proj_weight'], s[k + '.in_proj_bias'] = (3 * d, d), (3 * d,)
        lin(k + '.out_proj', d, d)

    def block(k, d):
        mha(k + '.attn', d)
        ln(k + '.ln_1', d)
        lin(k + '.mlp.c_fc', d, 4 * d)
        lin(k + '.mlp.c_proj', 4 * d, d)
        ln(k + '.ln_2', d)

    s['token_embedding.weight'] = (hp['vocab_size'], Wt)
    s['positional_embedding'] = (hp['context_length'], Wt)
    for i in range(hp['transformer_layers']):
        block(f'transformer.resblocks.{i}', Wt)
    ln('ln_final', Wt)
    s['text_projection'] = (Wt, E)
    s['logit_scale'] = ()
    s['visual.class_embedding'] = (W,)
    s['visual.positional_embedding'] = (grid * grid + 1, W)
    s['visual.conv1.weight'] = (W, 3, p, p)
    ln('visual.ln_pre', W)
    for i in range(hp['vision_layers']):
        k = f'visual.transformer.resblocks.{i}'
        block(k, W)
        lin(k + '.message_fc', W, W)
        ln(k + '.message_ln', W)
        mha(k + '.message_attn', W)
    ln('visual.ln_post', W)
    s['visual.proj'] = (W, E)
    s['mit.positional_embedding'] = (1, T, E)
    for i in range(hp['mit_layers']):
        block(f'mit.resblocks.{i}', E)
    ln('prompts_visual_ln', W)
    s['prompts_visual_proj'] = (W, E)
    s['prompts_generator.alpha'] = (E,)
    ln('prompts_generator.norm', E)
    for j in range(hp['prompts_layers']):
        k = f'prompts_generator.decoder.{j}'
        for n in 'qkv':
            lin(f'{k}.cross_attn.{n}_proj', E, E, bias=False)
        lin(k + '.cross_attn.proj', E, E)
        ln(k + '.norm1', E)
        ln(k + '.norm3', E)
        lin(k + '.mlp.0', E, 4 * E)
        lin(k + '.mlp.3', 4 * E, E)
    return s


def test_full_size_base_patch32_structure():
    hp = hparams(get_variant('xclip-base-patch32').config)
    m = X.build_reference_meta(hp)
    assert all(t.is_meta for t in m.state_dict().values())
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == _expected_shapes(hp)
    spot = {
        'token_embedding.weight': (49408, 512), 'positional_embedding': (77, 512),
        'transformer.resblocks.11.attn.in_proj_weight': (1536, 512),
        'text_projection': (512, 512), 'logit_scale': (),
        'visual.class_embedding': (768,), 'visual.positional_embedding': (50, 768),
        'visual.conv1.weight': (768, 3, 32, 32),
        'visual.transformer.resblocks.11.attn.in_proj_weight': (2304, 768),
        'visual.transformer.resblocks.0.message_attn.in_proj_weight': (2304, 768),
        'visual.transformer.resblocks.0.message_fc.weight': (768, 768),
        'visual.proj': (768, 512), 'prompts_visual_proj': (768, 512),
        'mit.positional_embedding': (1, 8, 512), 'mit.resblocks.0.mlp.c_fc.weight': (2048, 512),
        'prompts_generator.alpha': (512,),
        'prompts_generator.decoder.1.cross_attn.q_proj.weight': (512, 512),
        'prompts_generator.decoder.1.mlp.3.weight': (512, 2048),
    }
    for k, shape in spot.items():
        assert got[k] == shape, k
    for absent in ('prompts_generator.decoder.0.cross_attn.q_proj.bias',
                   'prompts_generator.decoder.0.cross_attn.k_proj.bias',
                   'prompts_generator.decoder.0.norm2.weight', 'visual.conv1.bias',
                   'mit.resblocks.1.ln_1.weight', 'prompts_generator.decoder.2.norm1.weight'):
        assert absent not in got
    assert not any('attn_mask' in k or 'position_ids' in k for k in got)  # masks are not buffers
    assert len(got) == 443
    assert X.param_count(m) == 196_585_729  # equals HF XCLIPModel's count for this config
    # heads are width // 64 everywhere
    blk = m.visual.transformer.resblocks[0]
    assert blk.attn.num_heads == blk.message_attn.num_heads == 12
    assert m.transformer.resblocks[0].attn.num_heads == 8
    assert m.mit.resblocks[0].attn.num_heads == 8
    assert m.prompts_generator.decoder[0].cross_attn.heads == 8


def test_full_size_large_patch14_structure():
    hp = hparams(get_variant('xclip-large-patch14').config)
    m = X.build_reference_meta(hp)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == _expected_shapes(hp)
    assert X.param_count(m) == 575_673_601
    assert m.visual.transformer.resblocks[0].attn.num_heads == 16
    assert m.transformer.resblocks[0].attn.num_heads == 12
    # the original derives 768 // 64 = 12 heads here (HF's converter config leaves 8)
    assert m.mit.resblocks[0].attn.num_heads == 12
    assert m.prompts_generator.decoder[0].cross_attn.heads == 12


@pytest.mark.parametrize('name, frames, res, patch, width, embed', [
    ('xclip-base-patch32', 8, 224, 32, 768, 512),
    ('xclip-base-patch32-16-frames', 16, 224, 32, 768, 512),
    ('xclip-base-patch16', 8, 224, 16, 768, 512),
    ('xclip-base-patch16-16-frames', 16, 224, 16, 768, 512),
    ('xclip-large-patch14', 8, 224, 14, 1024, 768),
    ('xclip-large-patch14-16-frames', 16, 336, 14, 1024, 768),
    ('xclip-base-patch16-kinetics-600', 8, 224, 16, 768, 512),
    ('xclip-base-patch16-kinetics-600-16-frames', 16, 224, 16, 768, 512),
    ('xclip-large-patch14-kinetics-600', 8, 224, 14, 1024, 768),
    ('xclip-base-patch16-hmdb-2-shot', 32, 224, 16, 768, 512),
    ('xclip-base-patch16-ucf-16-shot', 32, 224, 16, 768, 512),
    ('xclip-base-patch16-zero-shot', 32, 224, 16, 768, 512),
])
def test_full_size_hparams(name, frames, res, patch, width, embed):
    hp = hparams(get_variant(name).config)
    assert (hp['T'], hp['image_resolution'], hp['vision_patch_size']) == (frames, res, patch)
    assert (hp['vision_width'], hp['embed_dim']) == (width, embed)
    assert (hp['context_length'], hp['vocab_size'], hp['transformer_layers']) == (77, 49408, 12)
    assert hp['transformer_heads'] == hp['transformer_width'] // 64
    assert (hp['mit_layers'], hp['prompts_layers'], hp['prompts_alpha']) == (1, 2, 0.1)


def _first_seen(keys, depth, prefix=''):
    out = []
    for k in keys:
        if k.startswith(prefix):
            part = '.'.join(k[len(prefix):].split('.')[:depth])
            if part not in out:
                out.append(part)
    return out


def test_state_dict_order_follows_original_registration():
    # XCLIP.__init__ registers prompts_generator, mit, visual, transformer, ... and
    # state_dict lists a module's own parameters before its children
    keys = list(X.build_reference_meta(HP).state_dict())
    assert _first_seen(keys, 1) == [
        'positional_embedding', 'text_projection', 'logit_scale', 'prompts_visual_proj',
        'prompts_generator', 'mit', 'visual', 'transformer', 'token_embedding', 'ln_final',
        'prompts_visual_ln']
    assert _first_seen(keys, 1, 'visual.') == [
        'class_embedding', 'positional_embedding', 'proj', 'conv1', 'ln_pre', 'transformer',
        'ln_post']
    assert _first_seen(keys, 1, 'visual.transformer.resblocks.0.') == [
        'message_fc', 'message_ln', 'message_attn', 'attn', 'ln_1', 'mlp', 'ln_2']
    assert _first_seen(keys, 2, 'prompts_generator.') == ['alpha', 'norm.weight', 'norm.bias'] + [
        f'decoder.{j}' for j in range(HP['prompts_layers'])]
    assert keys[:4] == ['positional_embedding', 'text_projection', 'logit_scale',
                        'prompts_visual_proj']
    assert [k for k in keys if k.startswith('mit.resblocks.0.attn')] == [
        'mit.resblocks.0.attn.in_proj_weight', 'mit.resblocks.0.attn.in_proj_bias',
        'mit.resblocks.0.attn.out_proj.weight', 'mit.resblocks.0.attn.out_proj.bias']


# ---------------------------------------------------------------- init and forward

def test_init_deterministic_nontrivial_and_global_rng_untouched(model):
    rng = torch.random.get_rng_state()
    again = X.build_reference(HP, seed=0)
    other = X.build_reference(HP, seed=1)
    assert torch.equal(rng, torch.random.get_rng_state())
    sd, sd2, sd3 = model.state_dict(), again.state_dict(), other.state_dict()
    assert set(sd) == set(_expected_shapes(HP))
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
        assert not torch.equal(sd[k], sd3[k]), k
        if sd[k].numel() > 1:
            assert sd[k].std() > 1e-3, k  # nothing left constant (LN, bias, alpha...)
    assert abs(model.logit_scale.item() - math.log(1 / 0.07)) < 0.5
    assert not model.training


def test_forward_shapes_determinism_transpose(model):
    video, ids = _inputs()
    out = X.forward_outputs(model, video, ids)
    out2 = X.forward_outputs(X.build_reference(HP, seed=0), video, ids)
    b, n, E = 2, 4, HP['embed_dim']
    assert out['logits_per_video'].shape == (b, n)
    assert torch.equal(out['logits_per_text'], out['logits_per_video'].T)
    assert out['video_embeds'].shape == (b, E) and out['text_embeds'].shape == (b, n, E)
    for k in out:
        assert torch.equal(out[k], out2[k]), k
    assert torch.equal(model(video, ids), out['logits_per_video'])
    # logits = exp(logit_scale) * <v, t> with unit-norm embeddings
    assert torch.allclose(out['video_embeds'].norm(dim=-1), torch.ones(b))
    assert torch.allclose(out['text_embeds'].norm(dim=-1), torch.ones(b, n))
    manual = math.exp(model.logit_scale.item()) * (out['text_embeds'] @ out['video_embeds'][..., None])[..., 0]
    assert torch.allclose(manual, out['logits_per_video'], atol=1e-5)
    # the text embedding is video-specific: prompt added before normalising
    t = out['text_features'][None] + out['prompts']
    assert torch.allclose(t / t.norm(dim=-1, keepdim=True), out['text_embeds'], atol=1e-6)
    assert not torch.allclose(out['text_embeds'][0], out['text_embeds'][1])


def test_wrong_frame_count_rejected(model):
    video, ids = _inputs()
    with pytest.raises(ValueError):
        model(video[:, :2], ids)


# ---------------------------------------------------------------- hand checks

def _ln(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * mod.weight + mod.bias


def _qgelu(x):
    return x / (1 + torch.exp(-1.702 * x))


def _mha(q_in, kv_in, mha, heads):
    """Batch-first multi-head attention from the packed in_proj parameters."""
    W, bias = mha.in_proj_weight, mha.in_proj_bias
    D = q_in.shape[-1]
    q = q_in @ W[:D].T + bias[:D]
    k = kv_in @ W[D:2 * D].T + bias[D:2 * D]
    v = kv_in @ W[2 * D:].T + bias[2 * D:]
    hd = D // heads

    def split(t):
        return t.reshape(*t.shape[:-1], heads, hd).transpose(-2, -3)

    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd), dim=-1)
    o = (a @ split(v)).transpose(-2, -3).reshape(q_in.shape)
    return o @ mha.out_proj.weight.T + mha.out_proj.bias


def _mlp(x, mlp):
    return _qgelu(x @ mlp.c_fc.weight.T + mlp.c_fc.bias) @ mlp.c_proj.weight.T + mlp.c_proj.bias


def test_quick_gelu_definition(model):
    x = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    hand = torch.tensor([v / (1 + math.exp(-1.702 * v)) for v in x.tolist()])
    assert torch.allclose(X.QuickGELU()(x), hand, atol=1e-7)
    assert abs(X.QuickGELU()(torch.tensor(1.0)).item() - 0.8457957) < 1e-6
    assert abs(F.gelu(torch.tensor(1.0)).item() - 0.8457957) > 1e-3  # not exact GELU
    blk = model.transformer.resblocks[0]
    assert isinstance(blk.mlp.gelu, X.QuickGELU)
    h = torch.randn(5, HP['transformer_width'])
    with torch.no_grad():
        assert torch.allclose(blk.mlp(h), _mlp(h, blk.mlp), atol=1e-5)


def test_causal_mask_and_argmax_end_token(model):
    _, ids = _inputs()
    with torch.no_grad():
        base = model.encode_text(ids)
        after = ids.clone()
        after[0, 4:] = torch.tensor([7, 8, 9, 10])  # row 0 ends at 3; still < EOT
        assert torch.equal(model.encode_text(after)[0], base[0])
        before = ids.clone()
        before[0, 1] = (before[0, 1] % 40) + 1
        assert not torch.allclose(model.encode_text(before)[0], base[0])
        moved = ids.clone()
        moved[0, 3], moved[0, 4] = 5, EOT  # end token moves: a different position is read
        assert not torch.allclose(model.encode_text(moved)[0], base[0])
        # row 3 ends at position 2: its embedding = ln_final(token 2) @ text_projection
        x = model.token_embedding(ids) + model.positional_embedding
        xs = x.transpose(0, 1)
        for blk in model.transformer.resblocks:
            h = blk.ln_1(xs)
            xs = xs + blk.attn(h, h, h, need_weights=False, attn_mask=model.causal_mask())[0]
            xs = xs + blk.mlp(blk.ln_2(xs))
        hand = _ln(xs[2, 3], model.ln_final) @ model.text_projection
        assert torch.allclose(hand, base[3], atol=1e-5)


def test_cross_frame_block_by_hand(model):
    """Message token: message_fc(cls) -> attention across the T frames -> appended as
    the last token for the spatial attention -> dropped before the MLP."""
    blk = model.visual.transformer.resblocks[0]
    b, T, L, D = 2, HP['T'], L_TOK, HP['vision_width']
    heads = D // 64
    x = torch.randn(b, T, L, D, generator=torch.Generator().manual_seed(5))
    seen = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a: seen.__setitem__('attn', a[0].shape)),
             blk.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__('mlp', a[0].shape))]
    with torch.no_grad():
        got = blk(x.reshape(b * T, L, D).transpose(0, 1))
        msg = x[:, :, 0] @ blk.message_fc.weight.T + blk.message_fc.bias       # (b, T, D)
        m = _ln(msg, blk.message_ln)
        msg = msg + _mha(m, m, blk.message_attn, heads)
        h = torch.cat([x, msg[:, :, None]], dim=2)                             # (b, T, L+1, D)
        y = _ln(h, blk.ln_1)
        h = h + _mha(y, y, blk.attn, heads)
        h = h[:, :, :L]
        hand = h + _mlp(_ln(h, blk.ln_2), blk.mlp)
    for hk in hooks:
        hk.remove()
    assert seen['attn'] == (L + 1, b * T, D) and seen['mlp'] == (L, b * T, D)
    assert got.shape == (L, b * T, D)
    assert torch.allclose(got.transpose(0, 1).reshape(b, T, L, D), hand, atol=1e-5)


def test_mit_and_prompt_generator_by_hand(model):
    video, ids = _inputs()
    out = X.forward_outputs(model, video, ids)
    E = HP['embed_dim']
    heads = E // 64
    with torch.no_grad():
        # MIT: residual around the whole stack (input without pos-emb), mean over frames
        f = out['frame_embeds']
        h = f + model.mit.positional_embedding
        blk = model.mit.resblocks[0]
        y = _ln(h, blk.ln_1)
        h = h + _mha(y, y, blk.attn, heads)
        h = h + _mlp(_ln(h, blk.ln_2), blk.mlp)
        assert torch.allclose((h + f).mean(1), out['video_features'], atol=1e-5)
        # prompt generator: alpha scales the WHOLE decoder stream (text included)
        pg = model.prompts_generator
        vis = _ln(out['prompt_visual_tokens'], pg.norm)
        t = out['text_features'][None].expand(video.shape[0], -1, -1)
        for layer in pg.decoder:
            ca = layer.cross_attn
            q = _ln(t, layer.norm1) @ ca.q_proj.weight.T
            k, v = vis @ ca.k_proj.weight.T, vis @ ca.v_proj.weight.T
            hd = E // heads
            sp = lambda z: z.reshape(*z.shape[:2], heads, hd).transpose(1, 2)
            a = torch.softmax(sp(q) @ sp(k).transpose(-1, -2) * hd ** -0.5, dim=-1)
            o = (a @ sp(v)).transpose(1, 2).reshape(t.shape)
            t = t + o @ ca.proj.weight.T + ca.proj.bias
            n3 = _ln(t, layer.norm3)
            t = t + _qgelu(n3 @ layer.mlp[0].weight.T + layer.mlp[0].bias) @ layer.mlp[3].weight.T + layer.mlp[3].bias
        assert torch.allclose(pg.alpha * t, out['prompts'], atol=1e-5)
        # the prompt tokens are the patch tokens (no ln_post), frame-averaged
        b, T = video.shape[:2]
        _, patches = model.visual(video.reshape(b * T, *video.shape[2:]))
        pv = (model.prompts_visual_ln(patches) @ model.prompts_visual_proj).reshape(b, T, L_TOK - 1, E)
        assert torch.allclose(pv.mean(1), out['prompt_visual_tokens'], atol=1e-6)


def test_use_cache_reproduces_stale_text_features():
    m = X.build_reference(dict(HP, use_cache=True), seed=0)
    video, ids = _inputs()
    first = X.forward_outputs(m, video, ids)['text_features']
    second = X.forward_outputs(m, video, ids.flip(0))['text_features']
    assert torch.equal(first, second)  # the original reuses the first call's features


# ---------------------------------------------------------------- checkpoint container

def test_checkpoint_container_roundtrip(model, tmp_path):
    path = tmp_path / 'ckpt_epoch_3.pth'
    X.save_checkpoint(model, path, epoch=3, max_accuracy=55.5)
    ck = torch.load(path, map_location='cpu', weights_only=False)
    assert list(ck) == ['model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config']
    sd = model.state_dict()
    assert list(ck['model']) == list(sd)
    for k in sd:
        assert torch.equal(ck['model'][k], sd[k]), k
    assert ck['epoch'] == 3 and isinstance(ck['epoch'], int)
    assert ck['max_accuracy'] == 55.5 and isinstance(ck['max_accuracy'], float)
    cfg = ck['config']
    assert type(cfg) is CfgNode and cfg.is_frozen()  # the yacs config X-CLIP's main.py trains with
    assert cfg.MODEL.FIX_TEXT is True and cfg.DATA.NUM_FRAMES == HP['T']
    opt = ck['optimizer']
    assert set(opt) == {'state', 'param_groups'}
    n_trainable = sum(1 for k in sd if k.startswith(('visual.', 'mit', 'prompts')))
    assert sum(len(g['params']) for g in opt['param_groups']) == n_trainable  # text frozen
    assert all(torch.is_tensor(s['exp_avg']) for s in opt['state'].values())
    assert ck['lr_scheduler']['base_values']
    # a fresh module loads the weights strictly and reproduces the logits
    fresh = X.build_reference(HP, seed=7)
    fresh.load_state_dict(ck['model'], strict=True)
    video, ids = _inputs()
    assert torch.equal(fresh(video, ids), model(video, ids))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location='cpu', weights_only=True)


def test_checkpoint_config_construction_is_observable(model, tmp_path):
    path = tmp_path / 'probe.pth'
    X.save_checkpoint(model, path, config=X.ConstructionProbe('xclip-probe'))
    n = len(X.PROBE_LOG)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location='cpu', weights_only=True)
    assert len(X.PROBE_LOG) == n
    ck = torch.load(path, map_location='cpu', weights_only=False)
    assert X.PROBE_LOG[n:] == ['xclip-probe'] and isinstance(ck['config'], X.ConstructionProbe)
