import io
import pickle

import numpy as np
import pytest
import torch

from helpers import run_script
from torch_utils import persistence
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder

#----------------------------------------------------------------------------
# The tiny random VAE that conftest.py's tiny_vae_dir saves, loaded directly with diffusers.

@pytest.fixture(scope='module')
def tiny_vae(tiny_vae_dir):
    import diffusers
    return diffusers.models.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()

def random_pixels(count, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, [count, 3, size, size], dtype=torch.uint8, generator=generator)

CUSTOM = dict(raw_mean=[1.0, -2.0, 0.5, 3.0], raw_std=[2.0, 0.5, 4.0, 1.0], final_mean=0.25, final_std=0.75)

def custom_affine():
    """Per-channel (scale, bias) that map raw_mean/raw_std to final_mean/final_std, in float64."""
    raw_mean, raw_std = np.array(CUSTOM['raw_mean']), np.array(CUSTOM['raw_std'])
    scale = CUSTOM['final_std'] / raw_std
    bias = CUSTOM['final_mean'] - raw_mean * scale
    return torch.tensor(scale).reshape(1, -1, 1, 1), torch.tensor(bias).reshape(1, -1, 1, 1)

#----------------------------------------------------------------------------

def test_rgb_encoder_round_trip():
    encoder = StandardRGBEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 3, 1, 1)
    assert torch.equal(encoder.encode_pixels(pixels), pixels)
    latents = encoder.encode(pixels)
    assert latents.dtype == torch.float32
    assert latents.min() == -1 and latents.max() == 1
    assert torch.allclose(latents[0, 0, 7, 15], torch.tensor(127.0 / 127.5 - 1))
    decoded = encoder.decode(latents)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, pixels)

def test_rgb_decode_rounds_half_up_and_clips():
    encoder = StandardRGBEncoder()
    targets = [-300.0, 0.0, 100.4, 100.6, 127.5, 191.25, 255.0, 400.0] # values of x*127.5+127.5
    expected = [0, 0, 100, 101, 128, 191, 255, 255]
    x = (torch.tensor(targets) - 127.5) / 127.5
    assert encoder.decode(x).tolist() == expected

def test_rgb_encoder_pickles_as_persistent_object():
    encoder = StandardRGBEncoder()
    assert persistence.is_persistent(encoder)
    data = pickle.dumps(encoder)
    assert b'_reconstruct_persistent_obj' in data
    clone = pickle.loads(data)
    assert type(clone).__name__ == 'StandardRGBEncoder'
    pixels = random_pixels(2, size=4)
    assert torch.equal(clone.encode(pixels), encoder.encode(pixels))

def test_vae_default_scaling():
    encoder = StabilityVAEEncoder()
    assert encoder.vae_name == 'stabilityai/sd-vae-ft-mse' and encoder.batch_size == 8
    assert encoder.scale.dtype == np.float32 and encoder.bias.dtype == np.float32
    np.testing.assert_allclose(encoder.scale, [0.119904, 0.108225, 0.134771, 0.152439], atol=1e-6)
    np.testing.assert_allclose(encoder.bias, [-0.696643, -0.351732, -0.016173, 0.327744], atol=1e-6)

def test_vae_encode_pixels_matches_vae_posterior(tiny_vae_dir, tiny_vae):
    encoder = StabilityVAEEncoder(vae_name=tiny_vae_dir, batch_size=2)
    pixels = random_pixels(3)
    moments = encoder.encode_pixels(pixels)
    assert moments.shape == (3, 8, 2, 2) and moments.dtype == torch.float32
    with torch.no_grad():
        posterior = tiny_vae.encode(pixels.to(torch.float32) / 255).latent_dist
    torch.testing.assert_close(moments[:, :4], posterior.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moments[:, 4:], posterior.std, atol=1e-5, rtol=1e-5)
    final = encoder.encode(pixels)
    assert final.shape == (3, 4, 2, 2) and final.dtype == torch.float32

def test_vae_encode_latents_normalises_to_final_statistics():
    encoder = StabilityVAEEncoder(**CUSTOM)
    z = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    raw_mean = torch.tensor(CUSTOM['raw_mean'], dtype=torch.float64).reshape(1, -1, 1, 1)
    raw_std = torch.tensor(CUSTOM['raw_std'], dtype=torch.float64).reshape(1, -1, 1, 1)
    # A deterministic posterior at raw_mean + raw_std * z must map to final_mean + final_std * z.
    deterministic = torch.cat([raw_mean + raw_std * z, torch.zeros_like(z)], dim=1)
    expected = CUSTOM['final_mean'] + CUSTOM['final_std'] * z
    torch.testing.assert_close(encoder.encode_latents(deterministic).double(), expected, atol=1e-5, rtol=1e-5)

def test_vae_encode_latents_samples_the_posterior():
    encoder = StabilityVAEEncoder(**CUSTOM)
    mean = torch.randn(2, 4, 3, 3)
    std = torch.rand(2, 4, 3, 3) + 0.1
    torch.manual_seed(123)
    result = encoder.encode_latents(torch.cat([mean, std], dim=1))
    torch.manual_seed(123)
    sample = mean.double() + torch.randn(2, 4, 3, 3).double() * std.double()
    scale, bias = custom_affine()
    torch.testing.assert_close(result.double(), sample * scale + bias, atol=1e-5, rtol=1e-5)

def test_vae_decode_undoes_the_affine(tiny_vae_dir, tiny_vae):
    encoder = StabilityVAEEncoder(vae_name=tiny_vae_dir, batch_size=3, **CUSTOM)
    final = torch.randn(4, 4, 2, 2)
    pixels = encoder.decode(final)
    assert pixels.shape == (4, 3, 16, 16) and pixels.dtype == torch.uint8
    scale, bias = custom_affine()
    raw = ((final.double() - bias) / scale).float()
    with torch.no_grad():
        expected = (tiny_vae.decode(raw).sample.clamp(0, 1) * 255).to(torch.uint8)
    assert (pixels.int() - expected.int()).abs().max() <= 1 # float32 rounding at truncation boundaries

def test_vae_is_not_pickled(tiny_vae_dir, tiny_vae):
    encoder = StabilityVAEEncoder(vae_name=tiny_vae_dir)
    assert persistence.is_persistent(encoder)
    pixels = random_pixels(2)
    moments = encoder.encode_pixels(pixels)
    assert encoder._vae is not None
    data = pickle.dumps(encoder)
    vae_bytes = sum(p.numel() * p.element_size() for p in tiny_vae.parameters())
    assert len(data) < vae_bytes / 4
    clone = pickle.loads(data)
    assert clone._vae is None and encoder._vae is not None
    assert clone.vae_name == tiny_vae_dir and clone.batch_size == 8
    np.testing.assert_array_equal(clone.scale, encoder.scale)
    np.testing.assert_array_equal(clone.bias, encoder.bias)
    torch.testing.assert_close(clone.encode_pixels(pixels), moments)

class MetaCapturingUnpickler(pickle.Unpickler):
    """Returns the persistence meta dict instead of rebuilding the object."""
    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return lambda meta: meta
        return super().find_class(module, name)

def test_vae_encoder_pickle_layout():
    encoder = StabilityVAEEncoder(batch_size=4)
    meta = MetaCapturingUnpickler(io.BytesIO(pickle.dumps(encoder))).load()
    assert meta['type'] == 'class' and meta['version'] == 6 and meta['class_name'] == 'StabilityVAEEncoder'
    assert 'class StabilityVAEEncoder' in meta['module_src']
    state = meta['state']
    assert {'vae_name', 'scale', 'bias', 'batch_size', '_vae'} <= set(state)
    assert state['_vae'] is None and state['batch_size'] == 4
    assert state['scale'].dtype == np.float32 and state['scale'].shape == (4,)

def test_encoders_unpickle_without_training_package(tmp_path):
    path = tmp_path / 'encoders.pkl'
    path.write_bytes(pickle.dumps(dict(rgb=StandardRGBEncoder(), vae=StabilityVAEEncoder(final_std=0.25))))
    script = (
        'import pickle, sys\n'
        f'objs = pickle.load(open({str(path)!r}, "rb"))\n'
        'assert "training" not in sys.modules and "training.encoders" not in sys.modules\n'
        'print(type(objs["rgb"]).__name__, type(objs["vae"]).__name__, objs["vae"].scale[0])\n'
    )
    result = run_script('-c', script)
    rgb_name, vae_name, scale0 = result.stdout.split()
    assert (rgb_name, vae_name) == ('StandardRGBEncoder', 'StabilityVAEEncoder')
    assert float(scale0) == pytest.approx(0.25 / 4.17, rel=1e-6)

def test_missing_local_vae_directory(tmp_path):
    missing = str(tmp_path / 'no_such_vae')
    encoder = StabilityVAEEncoder(vae_name=missing)
    with pytest.raises(FileNotFoundError, match='no_such_vae'):
        encoder.init(torch.device('cpu'))

#----------------------------------------------------------------------------
