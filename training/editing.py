"""Zero-shot image editing with diffusion and consistency models (docs/editing.md).

Song et al. 2023, "Consistency Models", Algorithm 4 and §5: an edit is a fixed orthogonal transform A of
the image and a known/unknown split of A's coefficients. At every noise level the sampler's denoised
estimate keeps its unknown coefficients and takes the known ones from the reference y,

    x <- A^T [ (A y) * k + (A x) * (1 - k) ]      (k = 1 - Omega: 1 where the coefficient is known),

so that every sampler of generate_images.py edits when it is given the replacing denoiser: the student's
multistep sampler with fresh noise (Alg. 1, i.e. Alg. 4 on the student's S-node Karras grid) and EDM's
Heun sampler of the teacher (the replacement applied to both of its denoiser evaluations per step).
Optionally the estimate first follows reconstruction guidance (Ho et al. 2022) and every evaluation is
resampled (Lugmayr et al. 2022), so that the generated part agrees with the known one.
Interpolation moves along a great circle between two seeds' initial noises (slerp) and samples normally.

Images are the network's tensors [N, C, H, W] (pixels in [-1, 1] for pixel-space models). Arithmetic of
the transforms is float64; results take the input's dtype.
"""

import inspect

import torch

#----------------------------------------------------------------------------
# Orthogonal transforms acting on groups of n values: the channels of one pixel, or one channel's pixels
# in a factor x factor block (after pixel_unshuffle, as [N, groups, n, H/factor, W/factor]).

def orthogonal_with_first_row(u):
    """The Householder reflection H = I - 2 w w^T, w = (e_1 - u) / |e_1 - u|, for a unit vector u != e_1: an
    orthogonal, symmetric matrix whose first row is u (float64)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    w = -u
    w[0] += 1
    w = w / w.norm()
    return torch.eye(len(u), dtype=torch.float64) - 2 * torch.outer(w, w)


class Replacement:
    """An edit's linear operator: coefficients A x of the image (A orthogonal, so its inverse is A^T) and the
    known ones (`known`, bool, broadcasting against [N, groups, n, H/factor, W/factor])."""

    def __init__(self, matrix, known, factor=1):
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64)
        self.known = torch.as_tensor(known, dtype=torch.bool)
        self.factor = int(factor)

    def coefficients(self, x):
        """A x, float64 [N, groups, n, H/factor, W/factor]."""
        blocks = torch.nn.functional.pixel_unshuffle(x.to(torch.float64), self.factor)
        groups = blocks.reshape(x.shape[0], -1, self.matrix.shape[0], *blocks.shape[2:])
        return torch.einsum('ij,ngjhw->ngihw', self.matrix.to(x.device), groups)

    def image(self, coefficients, like):
        """A^T c as an image shaped and typed like `like`."""
        groups = torch.einsum('ji,ngjhw->ngihw', self.matrix.to(like.device), coefficients)
        blocks = groups.reshape(like.shape[0], -1, *groups.shape[3:])
        return torch.nn.functional.pixel_shuffle(blocks, self.factor).to(like.dtype)

    def replace(self, x, reference):
        """A^T [(A y) k + (A x) (1 - k)]: x with the known coefficients of `reference` (Alg. 4's replacement)."""
        known = self.known.to(x.device)
        return self.image(torch.where(known, self.coefficients(reference), self.coefficients(x)), x)

    def known_residual(self, x, reference):
        """k (A x - A y): how far the known coefficients of x are from the reference's (float64; 0 where unknown)."""
        known = self.known.to(x.device)
        return torch.where(known, self.coefficients(x) - self.coefficients(reference), 0)

    def known_part(self, reference):
        """A^T [(A y) k]: the reference with its unknown coefficients set to 0 (Alg. 4's first line)."""
        return self.replace(torch.zeros_like(reference), reference)

    def degraded(self, reference):
        """What the edit is given, as an image: the reference's known part (grey holes, flat blocks)."""
        return self.known_part(reference)


def inpainting(hole):
    """A = I; the pixels where the bool mask `hole` ([N or 1, 1, H, W]) is False are known."""
    return Replacement(torch.ones([1, 1]), ~torch.as_tensor(hole, dtype=torch.bool)[:, :, None])


LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


class Colorization(Replacement):
    """A = the orthogonal colour transform whose first row is the unit luminance direction (Song et al. 2023,
    §5); per pixel, the luminance coefficient is known and the two colour coefficients are not."""

    def __init__(self):
        u = torch.tensor(LUMINANCE, dtype=torch.float64)
        super().__init__(orthogonal_with_first_row(u / u.norm()), torch.tensor([True, False, False])[:, None, None])

    def degraded(self, reference):
        """Grey pixels with the reference's luminance coefficient: (u . y) / (u . 1) in every channel."""
        luminance = self.coefficients(reference)[:, 0, :1]
        return (luminance / self.matrix[0].sum()).expand_as(reference).to(reference.dtype)


def superresolution(factor):
    """A = per factor x factor block of each channel, the orthogonal transform whose first row is the uniform
    1/factor; the first coefficient (factor times the block mean) is known, the rest are not."""
    n = factor * factor
    known = torch.zeros([n, 1, 1], dtype=torch.bool)
    known[0] = True
    return Replacement(orthogonal_with_first_row(torch.full([n], 1 / factor, dtype=torch.float64)), known, factor)


def latent_hole(hole, latent_resolution):
    """A pixel hole mask [N, 1, R, R] shrunk to latents of latent_resolution by max-pooling: a latent cell is known
    only when every pixel of its block is (latents are only roughly local to their block)."""
    factor = hole.shape[-1] // latent_resolution
    return torch.nn.functional.max_pool2d(hole.to(torch.float32), factor) > 0

#----------------------------------------------------------------------------
# Editing and interpolation with any sampler of generate_images.py (sampler_fn(net, noise, labels, ...)).

def replacing_denoiser(net, operator, reference, guidance=0, resample=1, randn_like=torch.randn_like):
    """D'(x; sigma) = replace(D~(x; sigma), y): the denoiser whose estimate has the reference's known part.

    guidance = 0 gives D~ = D (Alg. 4's plain replacement). guidance = w > 0 adds reconstruction guidance
    (Ho et al. 2022, "Video Diffusion Models", eq. 7, with alpha = 1 in EDM's x = x_0 + sigma n):
    D~ = D - (w / 2) grad_x |k * (A D(x; sigma) - A y)|^2, which also moves the unknown part with what the
    network makes of the known one; the replacement alone leaves the two parts to agree by chance.
    resample = R > 1 denoises R times at the same sigma, re-noising the replaced estimate in between
    (x <- D'(x) + sigma z, the resampling of Lugmayr et al. 2022, "RePaint"), so that the parts can settle.
    """
    def denoise_once(x, sigma, class_labels):
        if guidance == 0:
            return operator.replace(net(x, sigma, class_labels), reference)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            denoised = net(x, sigma, class_labels)
            gradient, = torch.autograd.grad(operator.known_residual(denoised, reference).square().sum(), x)
        return operator.replace(denoised.detach() - guidance / 2 * gradient, reference)

    def denoise(x, sigma, class_labels=None):
        denoised = denoise_once(x, sigma, class_labels)
        if resample > 1:  # every sampler calls this per evaluation: nothing extra without resampling
            noise_level = torch.as_tensor(sigma, dtype=denoised.dtype, device=denoised.device).reshape(-1, 1, 1, 1)
            for _ in range(resample - 1):
                denoised = denoise_once(denoised + noise_level * randn_like(denoised), sigma, class_labels)
        return denoised
    return denoise


def edit(sampler_fn, net, noise, operator, reference, labels=None, guidance=0, resample=1, **sampler_kwargs):
    """Sample with the replacing denoiser (reconstruction guidance weight `guidance`, `resample` denoisings per
    evaluation) from x = A^T[(A y) k] + sigma_max z (Alg. 4's start; the samplers start from sigma_max times
    their `noise`). The result's known part is the reference's (the last step of every sampler returns a
    replaced estimate). Resampling draws its noise from the sampler's `randn_like`."""
    sigma_max = sampler_kwargs.get('sigma_max', inspect.signature(sampler_fn).parameters['sigma_max'].default)
    start = noise + operator.known_part(reference).to(noise.dtype) / sigma_max
    denoiser = replacing_denoiser(net, operator, reference, guidance, resample,
                                  sampler_kwargs.get('randn_like', torch.randn_like))
    return sampler_fn(net=denoiser, noise=start, labels=labels, **sampler_kwargs)


def slerp(z0, z1, t):
    """Spherical linear interpolation of each sample pair z0[i] -> z1[i] at t[i] (Shoemake 1985), which Song
    et al. 2023 (§5) use between initial noises: sin((1-t) theta)/sin(theta) z0 + sin(t theta)/sin(theta) z1,
    cos(theta) = <z0, z1> / (|z0| |z1|). t = 0 and 1 return z0 and z1 exactly; equal directions interpolate linearly."""
    a, b = z0.flatten(1).to(torch.float64), z1.flatten(1).to(torch.float64)
    theta = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1).acos()[:, None]
    t = torch.as_tensor(t, dtype=torch.float64, device=z0.device).reshape(-1, 1)
    curved = theta.sin() > 1e-12
    w0 = torch.where(curved, ((1 - t) * theta).sin() / theta.sin(), 1 - t)
    w1 = torch.where(curved, (t * theta).sin() / theta.sin(), t)
    return (w0 * a + w1 * b).reshape(z0.shape).to(z0.dtype)


def frame_times(num_frames):
    """num_frames equally spaced interpolation times from 0 to 1 (both included; one frame is t = 0)."""
    return [i / max(num_frames - 1, 1) for i in range(num_frames)]


def lerp_labels(labels0, labels1, t):
    """Labels moved linearly along with the noise; t = 0 and 1 give each seed's own label vector."""
    if labels0 is None:
        return None
    t = torch.as_tensor(t, dtype=labels0.dtype, device=labels0.device).reshape(-1, 1)
    return (1 - t) * labels0 + t * labels1

#----------------------------------------------------------------------------
