"""Mappings between uint8 pixels [N, 3, H, W] and the tensors a diffusion network is trained on.

Encoders are persistent classes, so that network snapshots carry them like EDM2's do.
"""

import os

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Interface. Pixels: uint8 [N, 3, H, W]. Raw latents: what a dataset stores.
# Final latents: what the network sees.

@persistence.persistent_class
class Encoder:
    """Common interface; subclasses define the three conversions."""
    def __init__(self):
        pass

    def init(self, device):
        """Load heavy resources onto the device now rather than on first use."""

    def __getstate__(self):
        return self.__dict__

    def encode(self, x):
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x):
        """uint8 pixels -> raw latents (the form a dataset stores)."""
        raise NotImplementedError

    def encode_latents(self, x):
        """Raw latents -> final latents (the form the network sees)."""
        raise NotImplementedError

    def decode(self, x):
        """Final latents -> uint8 pixels."""
        raise NotImplementedError

#----------------------------------------------------------------------------

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixel-space models: the dataset stores pixels, the network sees them mapped to [-1, 1]."""
    def __init__(self):
        super().__init__()

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        pixels = x.to(torch.float32) * 127.5 + 128 # +128 rather than +127.5: the truncating cast then rounds to nearest
        return pixels.clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Latent-space models on Stable Diffusion's KL autoencoder (diffusers AutoencoderKL).

    Raw latents hold the posterior mean and std (8 channels at 1/8 resolution). Final latents
    are one posterior sample, normalised per channel from raw_mean/raw_std (statistics of the
    unscaled latents of [0, 1] images) to final_mean/final_std. vae_name is a Hugging Face
    model name or a local save_pretrained() directory; batch_size is the number of images per
    VAE call. The VAE itself is loaded on first use and never pickled.
    """
    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[5.81, 3.25, 0.12, -2.15], raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8):
        super().__init__()
        raw_mean = np.asarray(raw_mean, dtype=np.float32)
        raw_std = np.asarray(raw_std, dtype=np.float32)
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / raw_std
        self.bias = np.float32(final_mean) - raw_mean * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def __getstate__(self):
        return dict(self.__dict__, _vae=None)

    def init(self, device):
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device)
        else:
            self._vae.to(device)

    def _scale_and_bias(self, x):
        scale = torch.as_tensor(self.scale, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        bias = torch.as_tensor(self.bias, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        return scale, bias

    @torch.no_grad()
    def encode_pixels(self, x):
        self.init(x.device)
        x = x.to(torch.float32) / 255 # the VAE statistics above refer to inputs in [0, 1]
        moments = []
        for chunk in x.split(self.batch_size):
            posterior = self._vae.encode(chunk)['latent_dist']
            moments.append(torch.cat([posterior.mean, posterior.std], dim=1))
        return torch.cat(moments)

    def encode_latents(self, x):
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        sample = mean + torch.randn_like(mean) * std
        scale, bias = self._scale_and_bias(sample)
        return sample * scale + bias

    @torch.no_grad()
    def decode(self, x):
        self.init(x.device)
        scale, bias = self._scale_and_bias(x)
        latents = (x.to(torch.float32) - bias) / scale
        pixels = torch.cat([self._vae.decode(chunk)['sample'] for chunk in latents.split(self.batch_size)])
        return (pixels.clamp(0, 1) * 255).to(torch.uint8)

#----------------------------------------------------------------------------
# A local directory is loaded directly; a Hugging Face name goes through the dnnlib cache,
# trying the cached copy first and downloading only when it is missing.

def load_stability_vae(vae_name, device):
    import diffusers
    if os.path.isdir(vae_name):
        vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, local_files_only=True)
    elif os.path.isabs(vae_name) or vae_name.startswith('.'):
        raise FileNotFoundError(f'VAE directory {vae_name} does not exist (expected a diffusers save_pretrained() directory or a Hugging Face model name)')
    else:
        import dnnlib
        cache_dir = dnnlib.make_cache_dir_path('diffusers')
        os.environ.update(HF_HOME=cache_dir, HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_DISABLE_SYMLINKS_WARNING='1')
        try:
            vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir, local_files_only=True)
        except Exception:
            try:
                vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir)
            except Exception as err:
                raise RuntimeError(f'Cannot load the VAE {vae_name!r} from Hugging Face or the cache {cache_dir}: {err}') from err
    return vae.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------
