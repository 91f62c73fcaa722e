"""GPU fast paths against the PyTorch fallbacks (run on a CUDA machine: python3 -m pytest -m gpu).
CI has no GPU, so these are deselected there by pytest.ini's `-m "not gpu"`."""
import pytest
import torch

import train_gpt as tg
from util import make_hp, randomize_weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ssd_kernel():
    fn, why = tg.load_mamba_ssd()
    if fn is None:
        pytest.fail(f"mamba_ssm SSD kernel unavailable: {why}")
    return fn


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("L, chunk, G", [(2048, 128, 1), (1000, 64, 2), (257, 256, 1)])
def test_ssd_kernel_matches_fallback(ssd_kernel, dtype, tol, L, chunk, G):
    torch.manual_seed(L + G)
    b, H, P, N = 2, 8, 64, 64
    x = torch.randn(b, L, H, P, device="cuda", dtype=dtype, requires_grad=True)
    dt = torch.nn.functional.softplus(torch.randn(b, L, H, device="cuda") - 2).requires_grad_()
    A = (-torch.rand(H, device="cuda") * 4 - 0.5).requires_grad_()
    B = torch.randn(b, L, G, N, device="cuda", dtype=dtype, requires_grad=True)
    C = torch.randn(b, L, G, N, device="cuda", dtype=dtype, requires_grad=True)
    inputs = (x, dt, A, B, C)
    grad_out = torch.randn(b, L, H, P, device="cuda", dtype=dtype)
    results = []
    for fn in (lambda *a: ssd_kernel(*a, chunk), lambda *a: tg.ssd_scan_torch(*(t.double() for t in a), chunk)):
        y = fn(*inputs)
        grads = torch.autograd.grad(y, inputs, grad_out.to(y.dtype))
        results.append((y, grads))
    (yk, gk), (yr, gr) = results
    assert rel_err(yk, yr) <= tol, ("y", rel_err(yk, yr))
    for name, a, r in zip("x dt A B C".split(), gk, gr):
        assert rel_err(a, r) <= tol, (name, rel_err(a, r))


def test_model_loss_and_grads_kernel_vs_fallback(ssd_kernel):
    hp = make_hp(MODEL_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, MAMBA_HEADDIM=64, MAMBA_D_STATE=64,
                 MAMBA_CHUNK_SIZE=64, TRAIN_SEQ_LEN=512, VOCAB_SIZE=1024)
    torch.manual_seed(0)
    model = randomize_weights(tg.HybridGPT(hp), 1).cuda()
    ids = torch.randint(0, hp.vocab_size, (4, 513), device="cuda")
    out = []
    for kernel in (ssd_kernel, None):
        tg.KERNELS["ssd_scan"] = kernel
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:]).mean()
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    tg.KERNELS["ssd_scan"] = None
    (lk, gk), (lf, gf) = out
    assert abs(lk - lf) / abs(lf) < 1e-2
    for n in gf:
        assert rel_err(gk[n], gf[n]) < 5e-2, (n, rel_err(gk[n], gf[n]))


def test_require_fast_kernels_is_an_error_when_missing(monkeypatch):
    monkeypatch.setattr(tg, "load_mamba_ssd", lambda: (None, "test: pretend missing"))
    with pytest.raises(SystemExit, match="REQUIRE_FAST_KERNELS=1"):
        tg.configure_kernels(make_hp(FAST_KERNELS=1, REQUIRE_FAST_KERNELS=1), torch.device("cuda"), lambda m: None)
    lines = []
    tg.configure_kernels(make_hp(FAST_KERNELS=1), torch.device("cuda"), lines.append)
    assert any(line.startswith("WARNING: the fast SSD kernel is unavailable") for line in lines)
    tg.KERNELS["ssd_scan"] = None
