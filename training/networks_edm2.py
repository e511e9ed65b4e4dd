"""The EDM2 denoiser: a magnitude-preserving U-Net (Karras et al., "Analyzing and Improving the
Training Dynamics of Diffusion Models", CVPR 2024) wrapped in EDM preconditioning.

Parameter names, shapes and registration order follow the official EDM2 networks, so their state
dicts load here with strict=True and give the same outputs.
"""

import contextlib
import weakref

import numpy as np
import torch
from torch_utils import persistence
from torch_utils import misc

#----------------------------------------------------------------------------
# Magnitude-preserving primitives. Each keeps unit-variance inputs at unit variance.

def normalize(x, dim=None, eps=1e-4):
    """Divide x by its RMS over `dim` (all dims but the first when None), plus eps."""
    reduce_dims = list(range(1, x.ndim)) if dim is None else dim
    l2 = torch.linalg.vector_norm(x, dim=reduce_dims, keepdim=True, dtype=torch.float32)
    rms = l2 * np.sqrt(l2.numel() / x.numel())
    return x / (eps + rms).to(x.dtype)


def mp_silu(x):
    # 0.596 is the RMS of silu(z) for z ~ N(0, 1).
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Blend a -> b by t, rescaled so that independent unit-variance inputs stay unit variance."""
    return a.lerp(b, t) / np.hypot(1 - t, t)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenate [a, b] along dim, weighting b's share of the total magnitude by t."""
    size_a = a.shape[dim]
    size_b = b.shape[dim]
    total = np.sqrt((size_a + size_b) / ((1 - t) ** 2 + t ** 2))
    scaled_a = a * (total * (1 - t) / np.sqrt(size_a))
    scaled_b = b * (total * t / np.sqrt(size_b))
    return torch.cat([scaled_a, scaled_b], dim=dim)


def resample(x, f=[1, 1], mode='keep'):
    """Depthwise 2x down- or upsampling of NCHW x with the separable FIR filter f."""
    if mode == 'keep':
        return x
    taps = np.asarray(f, dtype=np.float32)
    if taps.ndim != 1 or len(taps) % 2 != 0:
        raise ValueError(f'resample: filter must be 1-D with an even number of taps, got {f!r}')
    taps = taps / taps.sum()
    channels = x.shape[1]
    kernel = misc.const_like(x, np.outer(taps, taps)[None, None]).tile([channels, 1, 1, 1])
    padding = (len(taps) - 1) // 2
    if mode == 'down':
        return torch.nn.functional.conv2d(x, kernel, stride=2, padding=padding, groups=channels)
    if mode == 'up':
        # Each input pixel feeds 4 outputs; scaling by 4 keeps the filter's DC gain at 1.
        return torch.nn.functional.conv_transpose2d(x, kernel * 4, stride=2, padding=padding, groups=channels)
    raise ValueError(f"resample: mode must be 'keep', 'down' or 'up', got {mode!r}")

#----------------------------------------------------------------------------
# Random Fourier features of a scalar per sample (noise level embedding).

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        angular_freqs = torch.randn(num_channels) * (2 * np.pi * bandwidth)
        phase_offsets = torch.rand(num_channels) * (2 * np.pi)
        self.register_buffer('freqs', angular_freqs)
        self.register_buffer('phases', phase_offsets)

    def forward(self, x):
        freqs = self.freqs.to(torch.float32)
        phases = self.phases.to(torch.float32)
        features = torch.outer(x.to(torch.float32), freqs) + phases
        return (features.cos() * np.sqrt(2)).to(x.dtype)

#----------------------------------------------------------------------------
# Bias-free convolution (kernel [k, k]) or linear layer (kernel []) with weight normalisation.

@persistence.persistent_class
class MPConv(torch.nn.Module):
    # Instances may shadow this (see suppress_inplace_weight_norm below).
    inplace_weight_norm = True

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, *kernel]))
        self.out_channels = out_channels

    def forward(self, x, gain=1):
        w = self.weight.float()  # Aliases the parameter when it is already float32.
        if self.training and self.inplace_weight_norm:
            # Forced weight normalisation: keep the stored weights on the unit sphere.
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        fan_in = w[0].numel()
        w = (self._normalized(w) * (gain / np.sqrt(fan_in))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)

    def _normalized(self, w):
        """normalize(w), kept for frozen layers (eval mode, no gradient: a teacher or guide), which would
        otherwise renormalise the same weights on every call. The key notices in-place and device changes."""
        if self.training or self.weight.requires_grad:
            return normalize(w)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device, w.dtype)
        cached = _frozen_weights.get(self)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode too
                cached = (key, normalize(w))
            _frozen_weights[self] = cached
        return cached[1]


# normalize() of frozen MPConv weights, per layer; outside the modules so that pickles and copies never hold it.
_frozen_weights = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def suppress_inplace_weight_norm(net):
    """Within this context, training-mode forwards of `net` leave its MPConv weights untouched.

    Outputs are unchanged because the normalisation inside the graph still runs. This lets a second
    training-mode forward run before backward() of the first. Layers are found by their
    `inplace_weight_norm` attribute, so networks rebuilt from a pickle's embedded source qualify.
    """
    layers = [m for m in net.modules() if hasattr(m, 'inplace_weight_norm')]
    missing = object()
    previous = [m.__dict__.get('inplace_weight_norm', missing) for m in layers]
    for layer in layers:
        layer.inplace_weight_norm = False
    try:
        yield net
    finally:
        for layer, value in zip(layers, previous):
            if value is missing:
                del layer.inplace_weight_norm
            else:
                layer.inplace_weight_norm = value

#----------------------------------------------------------------------------
# Residual U-Net block with optional resampling and self-attention.

@persistence.persistent_class
class Block(torch.nn.Module):
    """One U-Net block: optional 2x resampling, a modulated residual branch, optional attention.

    flavor='enc' projects (if the width changes) and pixel-normalises the input before the residual
    branch; flavor='dec' projects after it. num_heads = out_channels // channels_per_head when
    attention is requested, and no attention layers exist when that is 0. dropout acts between the
    two residual convolutions; res_balance and attn_balance are the mp_sum weights of the branches;
    activations are clamped to +-clip_act unless it is None.
    """

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
            resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0,
            res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise ValueError(f"Block: flavor must be 'enc' or 'dec', got {flavor!r}")
        heads = out_channels // channels_per_head if attention else 0
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_mode, self.resample_filter = resample_mode, resample_filter
        self.res_balance, self.attn_balance = res_balance, attn_balance
        self.num_heads, self.dropout, self.clip_act = heads, dropout, clip_act

        # Registration order fixes the state-dict and parameter order; keep it.
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        res0_in = out_channels if flavor == 'enc' else in_channels
        self.conv_res0 = MPConv(res0_in, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        projects = in_channels != out_channels
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if projects else None
        self.attn_qkv = MPConv(out_channels, 3 * out_channels, kernel=[1, 1]) if heads > 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if heads > 0 else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            x = normalize(self.project(x), dim=1)

        modulation = self.emb_linear(emb, gain=self.emb_gain) + 1
        h = self.conv_res0(mp_silu(x))
        h = mp_silu(h * modulation[:, :, None, None].to(h.dtype))
        if self.training and self.dropout != 0:
            h = torch.nn.functional.dropout(h, p=self.dropout, training=True)
        h = self.conv_res1(h)

        if self.flavor == 'dec':
            x = self.project(x)
        x = mp_sum(x, h, t=self.res_balance)

        if self.num_heads > 0:
            x = mp_sum(x, self.self_attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp_(-self.clip_act, self.clip_act)
        return x

    def project(self, x):
        """Match the skip path to out_channels (a 1x1 convolution) when the width changes."""
        return x if self.conv_skip is None else self.conv_skip(x)

    def self_attention(self, x):
        """Multi-head self-attention over the H*W positions of x, before the output mix."""
        batch, channels, height, width = x.shape
        head_dim = channels // self.num_heads
        # The qkv channels are ordered (head, channel within head, q/k/v).
        qkv = self.attn_qkv(x).reshape(batch, self.num_heads, head_dim, 3, height * width)
        q, k, v = normalize(qkv, dim=2).unbind(dim=3)
        logits = q.transpose(2, 3) @ (k / np.sqrt(head_dim))      # [batch, heads, query, key]
        out = v @ logits.softmax(dim=3).transpose(2, 3)           # [batch, heads, head_dim, query]
        return self.attn_proj(out.reshape(batch, channels, height, width))

#----------------------------------------------------------------------------
# The EDM2 U-Net.

def unet_resolution_problem(img_resolution, channel_mult):
    """Why a U-Net with len(channel_mult) levels cannot run at img_resolution, or None if it can.

    Each level below the first halves the feature maps, and the decoder doubles them back, so the
    resolution must be divisible by 2 ** (levels - 1).
    """
    divisor = 1 << (len(channel_mult) - 1)
    if img_resolution >= divisor and img_resolution % divisor == 0:
        return None
    return (f'{img_resolution}x{img_resolution} cannot be halved {len(channel_mult) - 1} times, as the '
        f'{len(channel_mult)} levels of channel_mult {list(channel_mult)} need: the resolution must be a '
        f'multiple of {divisor} (e.g. {divisor}, {2 * divisor} or {4 * divisor}), or the network needs fewer levels')

@persistence.persistent_class
class UNet(torch.nn.Module):
    """The EDM2 U-Net on img_resolution x img_channels inputs.

    Level i runs at img_resolution >> i with model_channels * channel_mult[i] channels; the encoder
    has num_blocks blocks per level and the decoder one more. Blocks at attn_resolutions (and the
    first decoder block) get self-attention. label_dim = 0 makes the net unconditional. dropout
    applies at the resolutions in dout_resolutions (None: everywhere). Other keyword arguments go
    to every Block.
    """

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192,
            channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None, num_blocks=3,
            attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5, dropout=0,
            dout_resolutions=None, **block_kwargs):
        super().__init__()
        problem = unet_resolution_problem(img_resolution, channel_mult)
        if problem is not None:
            raise ValueError(f'UNet: {problem}')
        widths = [model_channels * mult for mult in channel_mult]
        noise_channels = widths[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        emb_channels = max(widths) if channel_mult_emb is None else model_channels * channel_mult_emb
        self.label_balance = label_balance
        self.concat_balance = concat_balance

        def make_block(cin, cout, res, **kwargs):
            block_dropout = dropout if dout_resolutions is None or res in dout_resolutions else 0
            return Block(cin, cout, emb_channels, dropout=block_dropout, **block_kwargs, **kwargs)

        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim != 0 else None

        # Encoder; the extra input channel is a constant 1 appended in forward().
        self.enc = torch.nn.ModuleDict()
        width = img_channels + 1
        for level, level_width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = MPConv(width, level_width, kernel=[3, 3])
                width = level_width
            else:
                self.enc[f'{res}x{res}_down'] = make_block(width, width, res, flavor='enc', resample_mode='down')
            for index in range(num_blocks):
                self.enc[f'{res}x{res}_block{index}'] = make_block(width, level_width, res,
                    flavor='enc', attention=(res in attn_resolutions))
                width = level_width
        skip_widths = [layer.out_channels for layer in self.enc.values()]

        # Decoder, from the lowest resolution up; each block consumes one encoder output.
        self.dec = torch.nn.ModuleDict()
        for level in reversed(range(len(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f'{res}x{res}_in0'] = make_block(width, width, res, flavor='dec', attention=True)
                self.dec[f'{res}x{res}_in1'] = make_block(width, width, res, flavor='dec')
            else:
                self.dec[f'{res}x{res}_up'] = make_block(width, width, res, flavor='dec', resample_mode='up')
            for index in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{index}'] = make_block(width + skip_widths.pop(), widths[level], res,
                    flavor='dec', attention=(res in attn_resolutions))
                width = widths[level]
        self.out_conv = MPConv(width, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            label_emb = self.emb_label(class_labels * np.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label_emb, t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith('_conv') else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)

#----------------------------------------------------------------------------
# EDM preconditioning around the U-Net, plus the uncertainty (log-variance) head.

@persistence.persistent_class
class Precond(torch.nn.Module):
    """EDM preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around the U-Net.

    use_fp16 runs the U-Net body in float16 on CUDA (never on CPU); sigma_data is the data standard
    deviation assumed by the preconditioning; logvar_channels sizes the log-variance head used by
    the EDM2 loss. Other keyword arguments go to UNet.
    """

    sigma_min = 0               # The network accepts any sigma in (0, inf).
    sigma_max = float('inf')

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=True, sigma_data=0.5,
            logvar_channels=128, **unet_kwargs):
        super().__init__()
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.sigma_data = label_dim, sigma_data
        self.use_fp16 = use_fp16

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        labels = self.prepare_labels(class_labels, x.device)
        half = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        dtype = torch.float16 if half else torch.float32

        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x, logvar

    def prepare_labels(self, class_labels, device):
        """Float32 labels of shape [N or 1, label_dim]; None for unconditional networks."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            # No labels on a conditional net: a zero vector (this is not classifier-free dropping).
            return torch.zeros([1, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def round_sigma(self, sigma):
        # EDM2 accepts continuous noise levels, so rounding is the identity.
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
