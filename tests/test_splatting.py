"""The Gaussian rasterizer: the CPU backends (torch, native) against a dense float64
reference written here from gsplat's classic-mode definition, gradients, CUDA backends,
errors."""
import math

import pytest
import torch

from voxelsplat.splatting import BackendUnavailableError, rasterize_gaussians, resolve_backend

CUDA = torch.cuda.is_available()
# the backends that run on CPU: both are held to the dense reference
CPU_BACKENDS = ["torch", "native"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Small tensors: thread start-up costs more than it saves on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Independent dense reference: every (camera, pixel, Gaussian) triple, one Gaussian at a time in
# depth order, exactly as gsplat's per-pixel loop reads.
# ---------------------------------------------------------------------------------------------
def _rotation_from_quaternion(q):
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return torch.stack([
        torch.stack([w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z], -1),
    ], dim=-2)


def dense_reference(means, quats, scales, opacities, features, viewmats, Ks, width, height,
                    near_plane=0.01, far_plane=1e10, eps2d=0.3, stats=None):
    """(C,H,W,D) features, (C,H,W) alphas, (C,H,W) accumulated depths; float64, differentiable."""
    num_cams = viewmats.shape[0]
    rotation = _rotation_from_quaternion(quats)
    covariance = rotation @ torch.diag_embed(scales ** 2) @ rotation.transpose(1, 2)
    jj, ii = torch.meshgrid(torch.arange(width, dtype=means.dtype), torch.arange(height, dtype=means.dtype), indexing="xy")
    pixel_centres = torch.stack([jj + 0.5, ii + 0.5], -1).reshape(-1, 2)  # (P, 2)
    out_f, out_a, out_d = [], [], []
    for c in range(num_cams):
        R, t, K = viewmats[c, :3, :3], viewmats[c, :3, 3], Ks[c]
        cam_points = means @ R.T + t
        cam_cov = R @ covariance @ R.T
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        feats = features[c] if features.dim() == 3 else features
        colour = torch.zeros(pixel_centres.shape[0], feats.shape[1], dtype=means.dtype)
        depth_acc = torch.zeros(pixel_centres.shape[0], dtype=means.dtype)
        T = torch.ones(pixel_centres.shape[0], dtype=means.dtype)
        done = torch.zeros(pixel_centres.shape[0], dtype=torch.bool)
        order = sorted(range(means.shape[0]), key=lambda n: (float(cam_points[n, 2].detach()), n))
        for n in order:
            x, y, z = cam_points[n]
            if not (near_plane <= float(z.detach()) <= far_plane):
                continue
            # Jacobian at the mean with x/z, y/z clamped to the field of view widened by 0.3 tan(fov/2).
            xz = torch.clamp(x / z, min=-(cx / fx + 0.3 * 0.5 * width / fx), max=(width - cx) / fx + 0.3 * 0.5 * width / fx)
            yz = torch.clamp(y / z, min=-(cy / fy + 0.3 * 0.5 * height / fy), max=(height - cy) / fy + 0.3 * 0.5 * height / fy)
            zero = torch.zeros((), dtype=means.dtype)
            J = torch.stack([torch.stack([fx / z, zero, -fx * xz / z]), torch.stack([zero, fy / z, -fy * yz / z])])
            cov2d = J @ cam_cov[n] @ J.T + eps2d * torch.eye(2, dtype=means.dtype)
            if float(torch.det(cov2d.detach())) <= 0:
                continue
            precision = torch.linalg.inv(cov2d)
            centre = torch.stack([fx * x / z + cx, fy * y / z + cy])
            delta = pixel_centres - centre
            sigma = 0.5 * torch.einsum("pi,ij,pj->p", delta, precision, delta)
            alpha = torch.clamp(opacities[n] * torch.exp(-sigma), max=0.999)
            use = (sigma >= 0) & (alpha >= 1.0 / 255.0) & ~done
            next_T = T * (1 - alpha)
            stop = use & (next_T <= 1e-4)
            done = done | stop
            use = use & ~stop
            if stats is not None:
                stats["stopped"] += int(stop.sum())
                stats["skipped_low_alpha"] += int(((alpha < 1.0 / 255.0) & (alpha > 0)).sum())
                stats["clamped_alpha"] += int((use & (opacities[n] * torch.exp(-sigma) > 0.999)).sum())
            weight = torch.where(use, alpha * T, torch.zeros_like(alpha))
            colour = colour + weight[:, None] * feats[n]
            depth_acc = depth_acc + weight * z
            T = torch.where(use, next_T, T)
        out_f.append(colour.reshape(height, width, -1))
        out_a.append((1 - T).reshape(height, width))
        out_d.append(depth_acc.reshape(height, width))
    return torch.stack(out_f), torch.stack(out_a), torch.stack(out_d)


# ---------------------------------------------------------------------------------------------
# Random scenes
# ---------------------------------------------------------------------------------------------
def look_at_viewmat(eye, target):
    """World->camera (OpenCV: x right, y down, z forward) for a camera at ``eye`` looking at ``target``
    with world +z up."""
    forward = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward])  # rows: camera axes in world
    viewmat = torch.eye(4, dtype=eye.dtype)
    viewmat[:3, :3] = rotation
    viewmat[:3, 3] = -rotation @ eye
    return viewmat


def random_scene(seed, num_gaussians=60, num_cams=2, channels=4, width=37, height=29, per_camera_features=False,
                 dense_cluster=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    means = randn(num_gaussians, 3) * torch.tensor([1.5, 1.5, 0.8], dtype=dtype)
    if dense_cluster:
        # A column of opaque Gaussians on the optical axis of camera 0: their pixels saturate.
        means[: num_gaussians // 3, :2] = randn(num_gaussians // 3, 2) * 0.1
        means[: num_gaussians // 3, 2] = torch.linspace(-1.0, 1.0, num_gaussians // 3, dtype=dtype)
    quats = randn(num_gaussians, 4)
    scales = rand(num_gaussians, 3) * 0.5 + 0.05
    opacities = rand(num_gaussians) * 0.95 + 0.02
    if dense_cluster:
        opacities[: num_gaussians // 3] = 0.9 + 0.09 * rand(num_gaussians // 3)
    opacities[:3] = torch.tensor([0.002, 0.0035, 0.5], dtype=dtype)[:3]  # below / near the 1/255 alpha threshold
    features = randn(num_cams, num_gaussians, channels) if per_camera_features else randn(num_gaussians, channels)
    viewmats, Ks = [], []
    for c in range(num_cams):
        angle = 2 * math.pi * c / num_cams + float(rand(1)) * 0.5
        eye = torch.tensor([6 * math.cos(angle), 6 * math.sin(angle), 0.0], dtype=dtype) + randn(3) * 0.3
        if dense_cluster and c == 0:
            eye = torch.tensor([0.0, 0.0, 7.0], dtype=dtype)
            viewmat = torch.eye(4, dtype=dtype)
            viewmat[:3, :3] = torch.tensor([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]], dtype=dtype)  # looking down -z
            viewmat[:3, 3] = -viewmat[:3, :3] @ eye
        else:
            viewmat = look_at_viewmat(eye, randn(3) * 0.3)
        viewmats.append(viewmat)
        f = 20 + 15 * float(rand(1))
        Ks.append(torch.tensor([[f, 0, width * (0.4 + 0.2 * float(rand(1)))],
                                [0, f * (0.9 + 0.2 * float(rand(1))), height * (0.4 + 0.2 * float(rand(1)))],
                                [0, 0, 1]], dtype=dtype))
    if dense_cluster:
        # The nearest Gaussian seen by camera 0 sits exactly on a pixel centre with opacity
        # 0.9999: its alpha there is capped at 0.999.
        K0, depth = Ks[0], 7.0 - 1.2
        centre_pixel = torch.floor(K0[:2, 2]) + 0.5
        means[num_gaussians // 3 - 1] = torch.tensor([float((centre_pixel[0] - K0[0, 2]) * depth / K0[0, 0]),
                                                      -float((centre_pixel[1] - K0[1, 2]) * depth / K0[1, 1]), 1.2],
                                                     dtype=dtype)
        opacities[num_gaussians // 3 - 1] = 0.9999
    if num_gaussians < 8:
        return dict(means=means, quats=quats, scales=scales, opacities=opacities, features=features,
                    viewmats=torch.stack(viewmats), Ks=torch.stack(Ks), width=width, height=height)
    # One Gaussian behind camera 0 and one beyond the far plane used below.
    means[3] = viewmats[0][:3, :3].T @ (torch.tensor([0.0, 0.0, -2.0], dtype=dtype) - viewmats[0][:3, 3])
    means[4] = viewmats[0][:3, :3].T @ (torch.tensor([0.3, 0.0, 60.0], dtype=dtype) - viewmats[0][:3, 3])
    # A big Gaussian far outside camera 0's field of view that still reaches into it (Jacobian clamp).
    means[5] = viewmats[0][:3, :3].T @ (torch.tensor([9.0, 1.0, 4.0], dtype=dtype) - viewmats[0][:3, 3])
    scales[5] = torch.tensor([3.0, 2.5, 2.0], dtype=dtype)
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, features=features,
                viewmats=torch.stack(viewmats), Ks=torch.stack(Ks), width=width, height=height)


def _render(scene, fn=rasterize_gaussians, **kwargs):
    return fn(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["features"],
              scene["viewmats"], scene["Ks"], scene["width"], scene["height"], **kwargs)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed,per_camera,dense", [(0, False, False), (1, True, False), (2, False, True), (3, True, True)])
def test_backend_matches_dense_reference(seed, per_camera, dense, backend):
    scene = random_scene(seed, per_camera_features=per_camera, dense_cluster=dense)
    stats = {"stopped": 0, "skipped_low_alpha": 0, "clamped_alpha": 0}
    ref = dense_reference(**scene, far_plane=50.0, stats=stats)
    out = _render(scene, backend=backend, far_plane=50.0)
    assert stats["skipped_low_alpha"] > 0
    if dense:
        assert stats["stopped"] > 0, "the scene must exercise the transmittance cut-off"
        assert stats["clamped_alpha"] > 0, "the scene must exercise the 0.999 alpha cap"
    assert float(ref[1].max()) > 0.5 and float(ref[0].abs().max()) > 0.1
    for got, want, name in zip(out, ref, ("features", "alphas", "depths")):
        assert got.shape == want.shape, name
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_gradients_match_dense_reference(backend):
    scene = random_scene(5, num_gaussians=40, per_camera_features=True, dense_cluster=True, width=23, height=19)
    names = ("means", "quats", "scales", "opacities", "features")
    weights = [torch.randn(s, generator=torch.Generator().manual_seed(9 + i), dtype=torch.float64)
               for i, s in enumerate([(2, 19, 23, 4), (2, 19, 23), (2, 19, 23)])]

    def grads(fn):
        leaves = {k: scene[k].clone().requires_grad_(True) for k in names}
        outputs = fn({**scene, **leaves})
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        return [o.detach() for o in outputs], torch.autograd.grad(loss, [leaves[k] for k in names])

    (our_out, ours), (ref_out, ref) = (grads(lambda s: _render(s, backend=backend, far_plane=50.0)),
                                       grads(lambda s: dense_reference(**s, far_plane=50.0)))
    # the differentiable path renders the same images as the no-grad one
    for got, want in zip(our_out, ref_out):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for name, got, want in zip(names, ours, ref):
        assert float(want.abs().max()) > 0, name
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_gradcheck_every_input(backend):
    # Tiny, well-conditioned scene: no pair sits on a threshold, so the function is smooth there.
    scene = random_scene(11, num_gaussians=6, num_cams=1, channels=2, width=9, height=7)
    scene["means"] = scene["means"] * 0.3
    scene["scales"] = scene["scales"] * 0.6 + 0.3
    scene["opacities"] = torch.tensor([0.3, 0.6, 0.45, 0.7, 0.5, 0.4], dtype=torch.float64)
    names = ("means", "quats", "scales", "opacities", "features")

    def fn(*inputs):
        args = dict(zip(names, inputs))
        f, a, d = rasterize_gaussians(args["means"], args["quats"], args["scales"], args["opacities"], args["features"],
                                      scene["viewmats"], scene["Ks"], scene["width"], scene["height"], backend=backend)
        return f, a, d

    inputs = tuple(scene[k].clone().requires_grad_(True) for k in names)
    assert float(fn(*inputs)[1].detach().max()) > 0.3
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_render_is_close_to_float64(backend):
    scene = random_scene(4, dense_cluster=True)
    ref = _render(scene, backend="torch")
    scene32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in scene.items()}
    out = _render(scene32, backend=backend)
    for got, want in zip(out, ref):
        assert got.dtype == torch.float32
        # a handful of pixels may flip at a threshold in float32; the bulk must agree
        close = torch.isclose(got.double(), want, rtol=1e-3, atol=1e-3)
        assert close.float().mean() > 0.99


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_camera_means_render_each_camera_at_its_own_positions(backend):
    scene = random_scene(10, num_cams=3, per_camera_features=True)
    g = torch.Generator().manual_seed(3)
    per_camera = scene["means"][None] + torch.randn(3, 1, 3, generator=g, dtype=torch.float64) * 0.7
    out = _render({**scene, "means": per_camera}, backend=backend)
    for c in range(3):
        single = {**scene, "means": per_camera[c], "features": scene["features"][c], "viewmats": scene["viewmats"][c:c + 1],
                  "Ks": scene["Ks"][c:c + 1]}
        ref = dense_reference(**single)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got[c:c + 1], want, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="per-camera means"):
        _render({**scene, "means": per_camera[:2]}, backend=backend)


def test_small_pair_chunks_give_the_same_render():
    from voxelsplat.splatting.torch_backend import rasterize_torch

    scene = random_scene(6, dense_cluster=True)
    args = [scene[k] for k in ("means", "quats", "scales", "opacities", "features", "viewmats", "Ks")]
    full = rasterize_torch(*args, scene["width"], scene["height"], 0.01, 1e10, 0.3)
    chunked = rasterize_torch(*args, scene["width"], scene["height"], 0.01, 1e10, 0.3, pair_chunk=97)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_and_fully_culled_scenes_render_zeros(backend):
    scene = random_scene(7)
    scene["means"] = scene["means"] * 0 + torch.tensor([0.0, 0.0, -1e3], dtype=torch.float64)  # far below the cameras
    features, alphas, depths = _render(scene, backend=backend, far_plane=20.0)
    assert features.shape == (2, 29, 37, 4) and float(alphas.abs().max()) == 0 and float(depths.abs().max()) == 0
    none = {k: (v[:0] if k in ("means", "quats", "scales", "opacities", "features") else v) for k, v in scene.items()}
    features, alphas, depths = _render(none, backend=backend)
    assert features.shape == (2, 29, 37, 4) and float(alphas.abs().max()) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gaussian_in_front_of_camera_renders_at_its_projected_pixel(backend):
    # An OpenCV camera 5 m from a small opaque Gaussian: the render peaks at K @ (R p + t).
    viewmat = look_at_viewmat(torch.tensor([-5.0, 0.3, 0.2], dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    K = torch.tensor([[40.0, 0, 31.0], [0, 40.0, 17.0], [0, 0, 1]], dtype=torch.float64)
    point = torch.tensor([[0.4, -0.6, 0.3]], dtype=torch.float64)
    cam = point @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = (cam @ K.T)[0, :2] / cam[0, 2]
    _, alphas, depths = rasterize_gaussians(point, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                                            torch.full((1, 3), 0.02, dtype=torch.float64),
                                            torch.tensor([0.9], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                                            viewmat[None], K[None], 64, 36, backend=backend)
    peak = int(alphas[0].argmax())
    assert (peak % 64, peak // 64) == (int(uv[0]), int(uv[1]))
    assert float(depths[0].flatten()[peak] / alphas[0].flatten()[peak]) == pytest.approx(float(cam[0, 2]))


def test_native_backend_matches_torch_in_float32_with_masked_losses_and_threads(monkeypatch):
    """The regularizer's case: float32, a loss on some pixels only (the native backward skips
    pixels without gradient), cameras split over two threads."""
    from voxelsplat.splatting import native_backend

    scene = random_scene(13, num_gaussians=300, num_cams=4, channels=6, width=48, height=32, dense_cluster=True,
                         dtype=torch.float32)
    names = ("means", "quats", "scales", "opacities", "features")
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(4, 32, 48, generator=g) < 0.4
    weights = [torch.randn(s, generator=g) for s in [(4, 32, 48, 6), (4, 32, 48), (4, 32, 48)]]
    results = {}
    for backend, threads in (("torch", 1), ("native", 1), ("native", 2)):
        monkeypatch.setattr(native_backend, "_PIXELS_PER_THREAD", 1)
        torch.set_num_threads(threads)
        leaves = {k: scene[k].clone().requires_grad_(True) for k in names}
        outputs = _render({**scene, **leaves}, backend=backend)
        loss = sum((o * w * (mask[..., None] if o.dim() == 4 else mask)).sum() for o, w in zip(outputs, weights))
        results[backend, threads] = ([o.detach() for o in outputs], torch.autograd.grad(loss, [leaves[k] for k in names]))
    torch.set_num_threads(1)
    (ref_out, ref_grad), (out, grad), (out2, grad2) = results["torch", 1], results["native", 1], results["native", 2]
    for a, b in zip(out + list(grad), out2 + list(grad2)):  # the thread split changes nothing
        assert torch.equal(a, b)
    for got, want in zip(out, ref_out):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(names, grad, ref_grad):
        assert float(want.abs().max()) > 0, name
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()), msg=lambda m: f"d/d{name}: {m}")


def test_native_backend_without_a_compiler_falls_back_or_explains(monkeypatch, tmp_path):
    from voxelsplat.splatting import native_backend

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VOXELSPLAT_NATIVE_DIR", str(tmp_path / "native"))
    monkeypatch.setattr(native_backend.RASTERIZE, "_library", None)
    monkeypatch.setattr(native_backend.RASTERIZE, "_failure", None)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(BackendUnavailableError, match="needs a C compiler"):
        resolve_backend("native", torch.device("cpu"))
    scene = random_scene(8, num_gaussians=20, num_cams=1)
    torch.testing.assert_close(_render(scene)[1], _render(scene, backend="torch")[1], rtol=0, atol=0)


def test_unknown_or_unavailable_backend_raises_clear_error():
    scene = random_scene(8, num_gaussians=4, num_cams=1)
    with pytest.raises(ValueError, match="unknown backend"):
        _render(scene, backend="opengl")
    if not CUDA:
        with pytest.raises(BackendUnavailableError, match="pip install gsplat"):
            _render(scene, backend="gsplat")
        with pytest.raises(BackendUnavailableError, match="pip install gaussian-splatting"):
            _render(scene, backend="inria")
        assert resolve_backend("auto", torch.device("cpu")) == "native"  # where a C compiler is found
        with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
            resolve_backend("native", torch.device("cuda"))


def test_bad_shapes_raise_errors_naming_the_argument():
    scene = random_scene(9, num_gaussians=4, num_cams=1)
    with pytest.raises(ValueError, match="opacities"):
        _render({**scene, "opacities": scene["opacities"][:, None]}, backend="torch")
    with pytest.raises(ValueError, match="features"):
        _render({**scene, "features": scene["features"][:3]}, backend="torch")
    with pytest.raises(ValueError, match="Ks"):
        _render({**scene, "Ks": scene["Ks"][0]}, backend="torch")


def _cuda_scene(seed):
    scene = random_scene(seed, num_gaussians=400, num_cams=3, channels=18, width=80, height=48, dense_cluster=True,
                         dtype=torch.float32)
    return {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in scene.items()}


def _compare_backends(backend, atol, per_camera_means=False):
    scene = _cuda_scene(12)
    if per_camera_means:  # a position per camera, as the regularizer's propagated Gaussians have
        g = torch.Generator().manual_seed(5)
        shift = torch.randn(scene["viewmats"].shape[0], *scene["means"].shape, generator=g) * 0.2
        scene["means"] = scene["means"][None] + shift.to(scene["means"])
    names = ("means", "quats", "scales", "opacities", "features")
    results = {}
    for name in ("torch", backend):
        leaves = {k: scene[k].clone().requires_grad_(True) for k in names}
        outputs = _render({**scene, **leaves}, backend=name)
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(outputs))
        loss.backward()
        results[name] = (outputs, {k: leaves[k].grad for k in names})
    (ref_out, ref_grad), (out, grad) = results["torch"], results[backend]
    for got, want in zip(out, ref_out):
        assert (got - want).abs().float().mean() < atol
    for k in names:
        cos = torch.nn.functional.cosine_similarity(grad[k].flatten(), ref_grad[k].flatten(), dim=0)
        assert float(cos) > 0.95, k


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gsplat_backend_matches_torch_backend():
    pytest.importorskip("gsplat")
    _compare_backends("gsplat", atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gsplat_backend_with_per_camera_means_matches_torch_backend():
    # (C, N, 3) means render in one gsplat call, a camera per batch element
    pytest.importorskip("gsplat")
    _compare_backends("gsplat", atol=1e-4, per_camera_means=True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_inria_backend_matches_torch_backend():
    try:
        resolve_backend("inria", torch.device("cuda"))
    except BackendUnavailableError as error:
        pytest.skip(str(error))
    # The Inria rasterizer caps alpha at 0.99 and tiles by 3 sigma: close, not identical.
    _compare_backends("inria", atol=2e-2)
