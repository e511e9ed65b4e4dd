"""Tests for training/networks_edm2.py: EDM2 layout, magnitude preservation, hand-derived formulas,
forced weight normalisation and its suppression, dropout placement, persistence."""

import copy
import os
import pickle

import numpy as np
import pytest
import torch

from helpers import FIXTURES
from torch_utils import persistence
from training import networks_edm2 as nets

# SMALL (and make_net) stay this file's own: the layout fixture precond_small_state_dict.txt and the
# parameter counts below are those of this configuration, not of the tests' other tiny networks.
SMALL = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[8])


pytestmark = pytest.mark.usefixtures('single_thread')


def make_net(seed=0, **overrides):
    """The small EDM2 config in eval mode, with non-zero gains so that every branch matters."""
    torch.manual_seed(seed)
    net = nets.Precond(**{**SMALL, **overrides})
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim == 0:
                param.copy_(torch.rand([]) + 0.5)
    return net.eval()


def make_inputs(batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, 3, 16, 16], generator=gen)
    sigma = torch.tensor([0.3, 4.0, 1.0, 20.0][:batch])
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()
    return x, sigma, labels


def mpconvs(net):
    return [m for m in net.modules() if isinstance(m, nets.MPConv)]


def row_rms(weight):
    return weight.double().flatten(1).square().mean(dim=1).sqrt()

#----------------------------------------------------------------------------
# Layout.

def read_state_dict_fixture():
    entries = []
    with open(os.path.join(FIXTURES, 'precond_small_state_dict.txt')) as f:
        for line in f:
            if line.strip() and not line.startswith('#'):
                name, shape, kind = line.split()
                entries.append((name, [int(s) for s in shape.strip('[]').split(',') if s], kind))
    return entries


def test_state_dict_matches_edm2_layout():
    expected = read_state_dict_fixture()
    assert len(expected) == 63
    net = nets.Precond(**SMALL)
    assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == [(n, s) for n, s, _ in expected]
    assert [n for n, _ in net.named_buffers()] == [n for n, _, kind in expected if kind == 'buffer']
    assert [n for n, _ in net.named_parameters()] == [n for n, _, kind in expected if kind == 'param']
    assert sum(p.numel() for p in net.parameters()) == 723691
    assert sum(b.numel() for b in net.buffers()) == 320
    # Strict loading into a freshly built twin (what loading an official state dict requires).
    nets.Precond(**SMALL).load_state_dict(net.state_dict(), strict=True)


def test_official_size_layout():
    cond = nets.Precond(img_resolution=64, img_channels=4, label_dim=1000, model_channels=32)
    uncond = nets.Precond(img_resolution=64, img_channels=4, label_dim=0, model_channels=32)
    assert len(cond.state_dict()) == 203
    assert len(uncond.state_dict()) == 202
    assert 'unet.emb_label.weight' not in uncond.state_dict()
    assert uncond.unet.emb_label is None
    assert list(cond.unet.enc.keys()) == ['64x64_conv', '64x64_block0', '64x64_block1', '64x64_block2',
        '32x32_down', '32x32_block0', '32x32_block1', '32x32_block2', '16x16_down', '16x16_block0',
        '16x16_block1', '16x16_block2', '8x8_down', '8x8_block0', '8x8_block1', '8x8_block2']
    assert list(cond.unet.dec.keys()) == ['8x8_in0', '8x8_in1'] + [f'8x8_block{i}' for i in range(4)] + [
        f'{r}x{r}_{n}' for r in (16, 32, 64) for n in ['up'] + [f'block{i}' for i in range(4)]]


def test_attention_heads():
    unet = nets.Precond(**SMALL).unet
    assert unet.dec['8x8_in0'].num_heads == 1         # always requests attention
    assert unet.dec['8x8_in1'].num_heads == 0
    assert unet.enc['8x8_block0'].num_heads == 1
    assert unet.enc['16x16_block0'].num_heads == 0
    narrow = nets.Block(32, 32, 8, attention=True)     # fewer channels than one head: no layers
    assert narrow.num_heads == 0 and narrow.attn_qkv is None and narrow.attn_proj is None
    with pytest.raises(ValueError, match='flavor'):
        nets.Block(8, 8, 8, flavor='middle')

#----------------------------------------------------------------------------
# Magnitude-preserving primitives.

def test_normalize_gives_unit_rms():
    x = torch.randn([3, 5, 4, 4]) * torch.tensor([0.1, 2.0, 30.0])[:, None, None, None]
    per_sample = nets.normalize(x)
    rms = x.double().square().mean(dim=[1, 2, 3], keepdim=True).sqrt()
    assert torch.allclose(per_sample.double(), x.double() / (1e-4 + rms), atol=1e-6)
    assert torch.allclose(per_sample.square().mean(dim=[1, 2, 3]).sqrt(), torch.ones(3), atol=2e-3)
    per_pixel = nets.normalize(x, dim=1)
    rms = x.double().square().mean(dim=1, keepdim=True).sqrt()
    assert torch.allclose(per_pixel.double(), x.double() / (1e-4 + rms), atol=1e-6)
    assert nets.normalize(x.half()).dtype == torch.float16
    # eps keeps zero input finite.
    assert nets.normalize(torch.zeros([2, 3])).abs().max() == 0


@pytest.mark.parametrize('t', [0.3, 0.5, 0.8])
def test_mp_sum_and_mp_silu_preserve_magnitude(t):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn([400000], generator=gen, dtype=torch.float64)
    b = torch.randn([400000], generator=gen, dtype=torch.float64)
    assert abs(nets.mp_sum(a, b, t=t).std().item() - 1) < 0.01
    assert abs(nets.mp_silu(a).square().mean().sqrt().item() - 1) < 0.01
    assert torch.allclose(nets.mp_sum(a, b, t=0), a)


def test_mp_cat_magnitude_and_order():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn([64, 6, 32, 32], generator=gen)
    b = torch.randn([64, 2, 32, 32], generator=gen)
    t = 0.3
    out = nets.mp_cat(a, b, t=t)
    assert out.shape == (64, 8, 32, 32)
    assert abs(out.square().mean().item() - 1) < 0.01
    # a comes first; b's share of the energy is t^2 / ((1-t)^2 + t^2).
    ratio_a = (out[:, :6] / a).flatten()
    assert torch.allclose(ratio_a, ratio_a[0].expand_as(ratio_a))
    energy_b = out[:, 6:].square().sum() / out.square().sum()
    assert abs(energy_b.item() - t ** 2 / ((1 - t) ** 2 + t ** 2)) < 0.01


def test_resample_modes():
    x = torch.randn([2, 3, 8, 8])
    assert nets.resample(x) is x
    assert torch.allclose(nets.resample(x, mode='down'), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    up = nets.resample(x, mode='up')
    assert torch.allclose(up, torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest'), atol=1e-6)
    with pytest.raises(ValueError, match='mode'):
        nets.resample(x, mode='sideways')
    with pytest.raises(ValueError, match='filter'):
        nets.resample(x, f=[1, 2, 1], mode='down')


def test_mp_fourier_formula_and_magnitude():
    torch.manual_seed(0)
    fourier = nets.MPFourier(256)
    x = torch.randn([100])
    out = fourier(x)
    expected = np.sqrt(2) * torch.cos(x.double()[:, None] * fourier.freqs.double() + fourier.phases.double())
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert abs(out.square().mean().sqrt().item() - 1) < 0.05
    assert fourier(x.half()).dtype == torch.float16


@pytest.mark.parametrize('kernel', [[], [1, 1], [3, 3]])
def test_mp_conv_formula_and_magnitude(kernel):
    torch.manual_seed(0)
    conv = nets.MPConv(48, 16, kernel).eval()
    with torch.no_grad():
        conv.weight.mul_(torch.rand([16] + [1] * (conv.weight.ndim - 1)) * 3)  # rows far from unit norm
    x = torch.randn([8, 48] + ([32, 32] if kernel else []))
    gain = 0.7
    out = conv(x, gain=gain)
    # Direct: each output row scaled to unit RMS (plus eps), times gain / sqrt(fan_in).
    w = conv.weight.double()
    fan_in = w[0].numel()
    w = w / (1e-4 + row_rms(w).reshape([-1] + [1] * (w.ndim - 1))) * (gain / np.sqrt(fan_in))
    expected = x.double() @ w.t() if not kernel else torch.nn.functional.conv2d(x.double(), w, padding=kernel[0] // 2)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    if kernel != [3, 3]:  # no zero padding at the borders: exact variance preservation
        assert abs((out / gain).std().item() - 1) < 0.05

#----------------------------------------------------------------------------
# Hand-derived Block reference (EDM2-COMPAT section 2.4), in float64 and with explicit head loops.

def reference_block(block, x, emb):
    x, emb = x.double(), emb.double()
    silu = lambda v: torch.nn.functional.silu(v) / 0.596
    mix = lambda a, b, t: ((1 - t) * a + t * b) / np.sqrt((1 - t) ** 2 + t ** 2)
    pixnorm = lambda v: v / (1e-4 + v.square().mean(dim=1, keepdim=True).sqrt())

    def apply(conv, v, gain=1.0):
        w = conv.weight.double()
        w = w / (1e-4 + row_rms(w).reshape([-1] + [1] * (w.ndim - 1))) * (gain / np.sqrt(w[0].numel()))
        return v @ w.t() if w.ndim == 2 else torch.nn.functional.conv2d(v, w, padding=w.shape[-1] // 2)

    if block.resample_mode == 'down':
        x = torch.nn.functional.avg_pool2d(x, 2)
    elif block.resample_mode == 'up':
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
    if block.flavor == 'enc':
        if block.conv_skip is not None:
            x = apply(block.conv_skip, x)
        x = pixnorm(x)
    scale = apply(block.emb_linear, emb, block.emb_gain.item()) + 1
    y = silu(apply(block.conv_res0, silu(x)) * scale[:, :, None, None])
    y = apply(block.conv_res1, y)
    if block.flavor == 'dec' and block.conv_skip is not None:
        x = apply(block.conv_skip, x)
    x = mix(x, y, block.res_balance)

    if block.num_heads:
        n, c, h, w = x.shape
        cph = c // block.num_heads
        qkv = apply(block.attn_qkv, x).reshape(n, 3 * c, h * w)
        out = torch.zeros(n, c, h * w, dtype=torch.float64)
        for head in range(block.num_heads):
            q, k, v = [qkv[:, [(head * cph + ch) * 3 + j for ch in range(cph)]] for j in range(3)]
            q, k, v = [u / (1e-4 + u.square().mean(dim=1, keepdim=True).sqrt()) for u in (q, k, v)]
            weights = torch.softmax(torch.einsum('ncp,ncr->npr', q, k) / np.sqrt(cph), dim=2)
            out[:, head * cph:(head + 1) * cph] = torch.einsum('npr,ncr->ncp', weights, v)
        x = mix(x, apply(block.attn_proj, out.reshape(n, c, h, w)), block.attn_balance)
    return x.clamp(-block.clip_act, block.clip_act)


@pytest.mark.parametrize('cin, cout, flavor, mode', [
    (64, 64, 'enc', 'keep'), (32, 64, 'enc', 'down'), (96, 64, 'dec', 'keep'), (64, 64, 'dec', 'up')])
def test_block_matches_hand_derived_reference(cin, cout, flavor, mode):
    torch.manual_seed(0)
    block = nets.Block(cin, cout, 24, flavor=flavor, resample_mode=mode, attention=True, channels_per_head=32)
    assert block.num_heads == 2
    with torch.no_grad():
        block.emb_gain.fill_(0.8)
    block.eval()
    x = torch.randn([2, cin, 8, 8]) * 3
    emb = torch.randn([2, 24])
    out = block(x, emb)
    assert out.shape == (2, cout) + {'keep': (8, 8), 'down': (4, 4), 'up': (16, 16)}[mode]
    assert torch.allclose(out.double(), reference_block(block, x, emb), atol=1e-5)


def test_attention_uses_interleaved_qkv():
    # Permuting qkv rows into [q | k | v] blocks must change the result (guards the layout).
    torch.manual_seed(0)
    block = nets.Block(64, 64, 8, attention=True, channels_per_head=32).eval()
    x, emb = torch.randn([1, 64, 4, 4]), torch.randn([1, 8])
    reference = block(x, emb)
    blocks_layout = torch.arange(192).reshape(64, 3).t().flatten()
    with torch.no_grad():
        block.attn_qkv.weight.copy_(block.attn_qkv.weight[blocks_layout])
    assert not torch.allclose(block(x, emb), reference, atol=1e-3)


def test_unet_composition_rules():
    # Embedding path, constant input channel and mp_cat order (main path first), from the spec.
    net = make_net()
    unet = net.unet
    x = torch.randn([2, 3, 16, 16])
    noise = torch.tensor([-0.5, 0.7])
    labels = torch.nn.functional.one_hot(torch.tensor([2, 7]), 10).float()
    emb = unet.emb_noise(unet.emb_fourier(noise))
    emb = nets.mp_silu(nets.mp_sum(emb, unet.emb_label(labels * np.sqrt(10)), t=0.5))
    h = unet.enc['16x16_conv'](torch.cat([x, torch.ones([2, 1, 16, 16])], dim=1))
    skips = [h]
    for name in ['16x16_block0', '8x8_down', '8x8_block0']:
        h = unet.enc[name](h, emb)
        skips.append(h)
    h = unet.dec['8x8_in1'](unet.dec['8x8_in0'](h, emb), emb)
    for name in ['8x8_block0', '8x8_block1', '16x16_up', '16x16_block0', '16x16_block1']:
        if 'block' in name:
            skip = skips.pop()
            na, nb = h.shape[1], skip.shape[1]
            total = np.sqrt((na + nb) / 0.5)
            h = torch.cat([h * (0.5 * total / np.sqrt(na)), skip * (0.5 * total / np.sqrt(nb))], dim=1)
        h = unet.dec[name](h, emb)
    assert not skips
    expected = unet.out_conv(h, gain=unet.out_gain)
    assert torch.allclose(unet(x, noise, labels), expected, atol=1e-5)

#----------------------------------------------------------------------------
# Precond.

def test_forward_is_finite_and_deterministic():
    net = make_net()
    x, sigma, labels = make_inputs(batch=4)
    out = net(x, sigma, labels)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, net(x, sigma, labels))
    assert not torch.allclose(out, make_net(seed=1)(x, sigma, labels), atol=1e-3)
    # Rows do not interact.
    assert torch.allclose(out[2:3], net(x[2:3], sigma[2:3], labels[2:3]), atol=1e-5)


def test_preconditioning_formula_and_logvar():
    net = make_net()
    x, sigma, labels = make_inputs(batch=3)
    out, logvar = net(x, sigma, labels, return_logvar=True)
    s = sigma.double().reshape(-1, 1, 1, 1)
    sd = 0.5
    F = net.unet((x.double() / (s ** 2 + sd ** 2).sqrt()).float(), (s.flatten().log() / 4).float(), labels)
    expected = sd ** 2 / (s ** 2 + sd ** 2) * x.double() + s * sd / (s ** 2 + sd ** 2).sqrt() * F.double()
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert logvar.shape == (3, 1, 1, 1)
    assert torch.allclose(logvar.flatten(), net.logvar_linear(net.logvar_fourier(sigma.log() / 4)).flatten())
    # A scalar sigma (tensor or number) broadcasts over the batch.
    out_scalar, logvar_scalar = net(x, torch.tensor(1.5), labels, return_logvar=True)
    assert logvar_scalar.shape == (1, 1, 1, 1)
    assert torch.allclose(out_scalar, net(x, torch.full([3], 1.5), labels), atol=1e-6)
    assert torch.allclose(out_scalar, net(x, 1.5, labels), atol=1e-6)


def test_missing_labels_mean_zero_vector():
    net = make_net()
    x, sigma, labels = make_inputs(batch=3)
    no_labels = net(x, sigma)
    assert torch.equal(no_labels, net(x, sigma, torch.zeros([3, 10])))
    assert not torch.allclose(no_labels, net(x, sigma, labels), atol=1e-4)
    uncond = make_net(label_dim=0)
    assert torch.equal(uncond(x, sigma), uncond(x, sigma, labels))


def test_fp16_weights_and_cpu_fp32_compute():
    net = make_net()
    x, sigma, labels = make_inputs(batch=2)
    # Official pickles hold float16 parameters and buffers; on CPU the body still runs in float32.
    # Only the scalar gains stay float16 (gain / sqrt(fan_in) keeps the 0-dim tensor's dtype), as in
    # EDM2, so the result matches float32 weights up to float16 rounding of those factors.
    half = copy.deepcopy(net).half()
    rounded = copy.deepcopy(half).float()
    out_half = half(x, sigma, labels)
    assert out_half.dtype == torch.float32
    assert torch.allclose(out_half, rounded(x, sigma, labels), atol=2e-3)
    assert torch.equal(net(x, sigma, labels), net(x, sigma, labels, force_fp32=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='float16 compute only happens on CUDA')
def test_fp16_compute_on_cuda():
    net = make_net().cuda()
    x, sigma, labels = [t.cuda() for t in make_inputs(batch=2)]
    out16 = net(x, sigma, labels)
    out32 = net(x, sigma, labels, force_fp32=True)
    assert out16.dtype == torch.float32
    assert (out16 - out32).abs().max() < 1e-2
    assert not torch.equal(out16, out32)


def test_sigma_range_and_rounding():
    net = make_net()
    assert net.sigma_min == 0 and net.sigma_max == float('inf')
    rounded = net.round_sigma([0.002, 1.5, 80.0])
    assert isinstance(rounded, torch.Tensor)
    assert torch.equal(rounded, torch.tensor([0.002, 1.5, 80.0]))
    assert torch.equal(net.round_sigma(torch.tensor(3.25)), torch.tensor(3.25))


def test_unexpected_forward_kwargs_are_rejected():
    net = make_net()
    x, sigma, labels = make_inputs()
    with pytest.raises(TypeError):
        net(x, sigma, labels, augment_labels=None)

#----------------------------------------------------------------------------
# Forced weight normalisation and its suppression.

def test_train_forward_normalises_weights_in_place():
    net = make_net()
    with torch.no_grad():
        for conv in mpconvs(net):
            conv.weight.mul_(2.5)
    x, sigma, labels = make_inputs()
    before = copy.deepcopy(net.state_dict())
    net(x, sigma, labels)                     # eval: no change
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net.train()
    net(x, sigma, labels, return_logvar=True)
    for conv in mpconvs(net):
        assert torch.allclose(row_rms(conv.weight), torch.ones(conv.weight.shape[0], dtype=torch.float64), atol=2e-4)
    assert not torch.allclose(before['unet.out_conv.weight'], net.state_dict()['unet.out_conv.weight'])


def test_suppressed_train_forward_keeps_weights_and_output():
    net = make_net().train()
    x, sigma, labels = make_inputs()
    first = net(x, sigma, labels)            # normalises the weights in place
    weights = copy.deepcopy(net.state_dict())
    with nets.suppress_inplace_weight_norm(net):
        second = net(x, sigma, labels)
    assert torch.equal(first, second)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    # Versions unchanged too: no in-place write happened at all.
    conv = net.unet.out_conv
    version = conv.weight._version
    with nets.suppress_inplace_weight_norm(net):
        net(x, sigma, labels)
    assert conv.weight._version == version
    net(x, sigma, labels)
    assert conv.weight._version > version


def test_second_train_forward_before_backward():
    x, sigma, labels = make_inputs()
    net = make_net().train()
    loss = net(x, sigma, labels).square().sum()
    with nets.suppress_inplace_weight_norm(net), torch.no_grad():
        net(x + 1, sigma, labels)
    loss.backward()
    # Gradients equal those of a run without the extra forward.
    twin = make_net().train()
    twin(x, sigma, labels).square().sum().backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        if name.startswith('logvar_'):
            assert p.grad is None and q.grad is None    # the log-variance head is not in this loss
        else:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name

    loss = net(x, sigma, labels).square().sum()
    with torch.no_grad():
        net(x + 1, sigma, labels)              # in-place weight update under the saved graph
    with pytest.raises(RuntimeError, match='inplace'):
        loss.backward()


def test_suppression_restores_nests_and_survives_errors():
    net = make_net()
    conv = net.unet.out_conv
    conv.inplace_weight_norm = True           # an instance value that must come back
    with nets.suppress_inplace_weight_norm(net):
        assert not any(c.inplace_weight_norm for c in mpconvs(net))
        with nets.suppress_inplace_weight_norm(net):
            assert not any(c.inplace_weight_norm for c in mpconvs(net))
        assert not any(c.inplace_weight_norm for c in mpconvs(net))
    assert all(c.inplace_weight_norm for c in mpconvs(net))
    assert conv.__dict__['inplace_weight_norm'] is True
    other = net.unet.emb_noise
    assert 'inplace_weight_norm' not in other.__dict__  # class default, no instance attribute left
    with pytest.raises(KeyError):
        with nets.suppress_inplace_weight_norm(net):
            raise KeyError('boom')
    assert all(c.inplace_weight_norm for c in mpconvs(net))
    assert 'inplace_weight_norm' not in other.__dict__

#----------------------------------------------------------------------------
# Dropout placement.

def capture_block_inputs(net, x, sigma, labels):
    """Run net once and record the (x, emb) each Block received."""
    inputs = {}
    blocks = {f'{part}.{name}': block for part in ('enc', 'dec') for name, block in net.unet.get_submodule(part).items()
        if isinstance(block, nets.Block)}
    hooks = [block.register_forward_pre_hook(lambda m, args, key=key: inputs.__setitem__(key, (m, args)))
        for key, block in blocks.items()]
    with torch.no_grad():
        net(x, sigma, labels)
    for hook in hooks:
        hook.remove()
    return inputs


@pytest.mark.parametrize('dout_resolutions', [None, [8], [16], []])
def test_dropout_only_at_dout_resolutions(dout_resolutions):
    net = make_net(dropout=0.5, dout_resolutions=dout_resolutions)
    x, sigma, labels = make_inputs()
    inputs = capture_block_inputs(net, x, sigma, labels)
    assert len(inputs) == 10
    net.train()
    for key, (block, (block_x, emb)) in inputs.items():
        res = int(key.split('.')[1].split('x')[0])
        active = dout_resolutions is None or res in dout_resolutions
        assert block.dropout == (0.5 if active else 0), key
        outputs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            with nets.suppress_inplace_weight_norm(net), torch.no_grad():
                outputs.append(block(block_x, emb))
        assert torch.equal(outputs[0], outputs[1]) != active, key
        block.eval()
        assert torch.equal(block(block_x, emb), block(block_x, emb))
        block.train()

#----------------------------------------------------------------------------
# Persistence.

def test_pickle_round_trip_reproduces_outputs():
    net = make_net()
    x, sigma, labels = make_inputs()
    expected = net(x, sigma, labels, return_logvar=True)
    loaded = pickle.loads(pickle.dumps(net))
    assert persistence.is_persistent(loaded)
    assert type(loaded).__name__ == 'Precond'
    assert loaded.init_kwargs['model_channels'] == 32
    for got, want in zip(loaded(x, sigma, labels, return_logvar=True), expected):
        assert torch.equal(got, want)
    # The suppression finds MPConv layers of the re-created classes too.
    loaded.train()
    loaded(x, sigma, labels)
    weights = copy.deepcopy(loaded.state_dict())
    with nets.suppress_inplace_weight_norm(loaded):
        loaded(x + 1, sigma, labels)
    assert all(torch.equal(weights[k], v) for k, v in loaded.state_dict().items())


def test_frozen_layers_reuse_normalised_weights_and_notice_changes():
    net = make_net()
    x, sigma, labels = make_inputs()
    expected = net(x, sigma, labels)  # eval mode but trainable: normalises on every call, keeps nothing
    assert not any(layer in nets._frozen_weights for layer in mpconvs(net))
    net.requires_grad_(False)
    assert torch.equal(net(x, sigma, labels), expected)
    used = [layer for layer in mpconvs(net) if layer is not net.logvar_linear]  # the uncertainty head is not run
    assert used and all(layer in nets._frozen_weights for layer in used)
    with torch.inference_mode():
        assert torch.equal(net(x, sigma, labels), expected)
    # The kept weights are ordinary tensors: a gradient can flow through the frozen network to its input.
    x_grad = x.clone().requires_grad_(True)
    net(x_grad, sigma, labels).square().sum().backward()
    assert x_grad.grad is not None and torch.isfinite(x_grad.grad).all()

    # An in-place change of a weight (e.g. loading other weights) is noticed.
    other = make_net(seed=5)
    net.load_state_dict(other.state_dict())  # copies in place, into the same tensors
    assert torch.equal(net(x, sigma, labels), other(x, sigma, labels))
    # Neither pickles nor copies carry the kept weights.
    assert len(pickle.dumps(net)) == len(pickle.dumps(other.requires_grad_(False)))
    assert not any(layer in nets._frozen_weights for layer in mpconvs(copy.deepcopy(net)))
