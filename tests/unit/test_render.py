"""Renderer: analytic cases on CPU, gradients, Gaussian decoder; gsplat agreement on GPU."""
from __future__ import annotations

import math

import pytest
import torch

from atoken.cameras import hammersley_sphere, intrinsics, look_at, sphere_cameras
from atoken.render import render

pytestmark = pytest.mark.unit


def _front_camera(size=64, fov=40.0):
    return look_at(torch.tensor([[0.0, 0.0, -2.0]]), up=(0, -1, 0)), intrinsics(fov, size, size)


def test_one_isotropic_gaussian_value_and_alpha_at_centre():
    vm, K = _front_camera()
    s, o = 0.1, 0.8
    out = render(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), s), torch.tensor([o]),
                 torch.tensor([[1.0, 0.5, 0.25]]), vm, K, 64, 64)
    f = K[0, 0, 0].item()
    var = (s * f / 2.0) ** 2 + 0.3  # projected variance in px^2 plus gsplat's eps2d
    expected_alpha = o * math.exp(-0.5 * (0.5 ** 2 + 0.5 ** 2) / var)  # pixel centre is 0.5 px off
    assert out.alpha[0, 32, 32, 0].item() == pytest.approx(expected_alpha, rel=1e-4)
    torch.testing.assert_close(out.rgb[0, 32, 32], torch.tensor([1.0, 0.5, 0.25]) * expected_alpha)
    assert out.depth[0, 32, 32, 0].item() == pytest.approx(2.0, rel=1e-4)
    assert out.alpha[0, 0, 0, 0] == 0  # far corner untouched (culled by the 3.33 sigma radius)


def test_two_overlapping_gaussians_respect_depth_order():
    vm, K = _front_camera()
    means = torch.tensor([[0.0, 0, 0.3], [0.0, 0, -0.3]])  # second is nearer to the camera at z=-2
    colors = torch.tensor([[1.0, 0, 0], [0.0, 0, 1]])
    args = (torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.2), torch.tensor([0.9, 0.9]))
    out = render(means, args[0], args[1], args[2], colors, vm, K, 64, 64)
    c = out.rgb[0, 32, 32]
    assert c[2] > 0.8 and c[0] < 0.15  # blue (front) occludes red
    swapped = render(means.flip(0), args[0], args[1], args[2], colors, vm, K, 64, 64).rgb[0, 32, 32]
    assert swapped[0] > 0.8 and swapped[2] < 0.15
    # with the camera behind, the order flips
    back = look_at(torch.tensor([[0.0, 0.0, 2.0]]), up=(0, -1, 0))
    assert render(means, args[0], args[1], args[2], colors, back, K, 64, 64).rgb[0, 32, 32, 0] > 0.8


def test_transmittance_stops_compositing():
    vm, K = _front_camera()
    n = 30  # a stack of nearly opaque Gaussians: those behind the first few must not contribute
    means = torch.zeros(n, 3)
    means[:, 2] = torch.linspace(-0.5, 0.5, n)
    colors = torch.zeros(n, 3)
    colors[:5, 1] = 1.0
    colors[5:, 0] = 1.0
    out = render(means, torch.tensor([[1.0, 0, 0, 0]] * n), torch.full((n, 3), 0.3), torch.full((n,), 0.99),
                 colors, vm, K, 64, 64)
    assert out.rgb[0, 32, 32, 0].item() == 0.0 and out.rgb[0, 32, 32, 1] > 0.99


def test_render_is_differentiable():
    vm, K = sphere_cameras(3, 2.0, 40, 32, 32)
    means = (torch.rand(20, 3) - 0.5).requires_grad_()
    colors = torch.rand(20, 3).requires_grad_()
    scales = torch.full((20, 3), 0.05, requires_grad=True)
    out = render(means, torch.tensor([[1.0, 0, 0, 0]]).repeat(20, 1), scales, torch.full((20,), 0.7), colors, vm, K, 32, 32)
    (out.rgb.sum() + out.alpha.sum()).backward()
    assert means.grad.abs().sum() > 0 and colors.grad.abs().sum() > 0 and scales.grad.abs().sum() > 0


def test_hammersley_cameras_cover_the_sphere_and_look_at_origin():
    yp = hammersley_sphere(64)
    assert yp[:, 1].min() < -0.5 and yp[:, 1].max() > 0.5  # both hemispheres
    vm, K = sphere_cameras(16, 2.0, 40, 64, 64)
    origin_cam = vm[:, :3, 3]  # origin in camera coords
    torch.testing.assert_close(origin_cam[:, :2], torch.zeros(16, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(origin_cam[:, 2], torch.full((16,), 2.0), atol=1e-5, rtol=0)


def test_gaussian_decoder_renders_voxels_in_place():
    from atoken.gaussian import GaussianDecoder, GaussianDecoderConfig

    dec = GaussianDecoder(GaussianDecoderConfig(model_channels=32, num_blocks=1, num_heads=2, mlp_channels=64,
                                                gaussians_per_voxel=2, resolution=16))
    coords = torch.tensor([[0, 1, 8, 8, 8], [0, 1, 2, 3, 4], [1, 1, 15, 0, 7]])
    g = dec(torch.randn(3, 768), coords)
    assert g.means.shape == (6, 3) and g.sample.tolist() == [0, 0, 0, 0, 1, 1]
    centre = (coords[:, 2:].float() + 0.5) / 16 - 0.5
    dist = (g.means.view(3, 2, 3) - centre[:, None]).abs().max()
    assert dist <= 0.5 * 1.5 / 16 + 1e-6  # offsets bounded by tanh to the voxel neighbourhood
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(6))
    assert (g.scales > 0).all() and ((g.opacities > 0) & (g.opacities < 1)).all()
    vm, K = sphere_cameras(2, 2.0, 40, 32, 32)
    out = dec.render(g.select(0), vm, K, 32, 32)
    out.rgb.sum().backward()
    assert dec.out_layer.weight.grad.abs().sum() > 0  # zero-initialised output layer learns first


@pytest.mark.gpu
def test_gsplat_cuda_and_cpu_renderer_agree():
    torch.manual_seed(0)
    n = 2000
    means = (torch.rand(n, 3) - 0.5) * 0.8
    quats = torch.nn.functional.normalize(torch.randn(n, 4), dim=-1)
    scales = torch.rand(n, 3) * 0.02 + 0.005
    opac, colors = torch.rand(n) * 0.9 + 0.05, torch.rand(n, 3)
    vm, K = sphere_cameras(4, 2.0, 40, 128, 128)
    tensors = [t.clone().requires_grad_() for t in (means, scales, colors)]
    cpu = render(tensors[0], quats, tensors[1], opac, tensors[2], vm, K, 128, 128, backend="torch")
    cpu.rgb.sum().backward()
    gpu_t = [t.detach().cuda().requires_grad_() for t in (means, scales, colors)]
    gpu = render(gpu_t[0], quats.cuda(), gpu_t[1], opac.cuda(), gpu_t[2], vm.cuda(), K.cuda(), 128, 128, backend="gsplat")
    gpu.rgb.sum().backward()
    assert (gpu.rgb.cpu() - cpu.rgb.detach()).abs().mean() < 1e-3
    assert (gpu.alpha.cpu() - cpu.alpha.detach()).abs().mean() < 1e-3
    for a, b in zip(tensors, gpu_t):
        cos = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.cpu().flatten(), dim=0)
        assert cos > 0.99
