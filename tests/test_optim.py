"""OPTIMIZERS and the training step: groups, exactly-once updates, two ranks equal one process."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train_gpt as tg
from util import CPUContext, free_port, join_gloo, leave_gloo, make_hp, write_shard


def test_every_parameter_in_exactly_one_group():
    for env in ({}, {"TIE_EMBEDDINGS": "0", "MAMBA_MLP": "1"}, {"MAMBA_LAYERS": ""}, {"BIGRAM_VOCAB_SIZE": "0"}):
        hp = make_hp(**env)
        model = tg.HybridGPT(hp)
        opts = tg.build_optimizers(model, hp)
        seen = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
        assert len(seen) == len(set(seen))
        assert set(seen) == {id(p) for p in model.parameters()}


def test_muon_takes_matrices_with_their_learning_rates():
    hp = make_hp(MATRIX_LR=0.01, MAMBA_MATRIX_LR=0.003)
    model = tg.HybridGPT(hp)
    muon = [o for o in tg.build_optimizers(model, hp) if isinstance(o, tg.Muon)][0]
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in muon.param_groups}
    assert "blocks.0.mixer.in_proj.weight" in by_lr[0.003] and "blocks.0.mixer.out_proj.weight" in by_lr[0.003]
    assert "blocks.1.mixer.q.weight" in by_lr[0.01] and "blocks.1.mlp.fc.weight" in by_lr[0.01]
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])


@pytest.mark.parametrize("wd", [{}, {"MUON_WD": "0.1", "ADAM_WD": "0.2", "EMBED_WD": "0.3", "TIE_EMBEDDINGS": "0"},
                                {"MUON_ROW_NORM": "0"}])
def test_each_parameter_updated_exactly_once_per_step(wd):
    hp = make_hp(GRAD_CLIP_NORM=0, **wd)
    torch.manual_seed(0)
    model = tg.HybridGPT(hp)
    opts = tg.build_optimizers(model, hp)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        grads[n] = p.grad.clone()
    for o in opts:
        o.step()
    lrs = {id(p): (g["lr"], isinstance(o, tg.Muon), g.get("momentum"), g["weight_decay"])
           for o in opts for g in o.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        lr, is_muon, momentum, decay = lrs[id(p)]
        # decoupled weight decay: Muon's matrices, the embedding tables, Adam's controls; never an untied head or
        # Mamba's SSM parameters
        if is_muon:
            want = hp.muon_wd
        elif n.startswith(("tok_emb.", "bigram.embed.")):
            want = hp.embed_wd
        elif n.startswith("lm_head.") or n.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D", "conv_weight", "conv_bias",
                                                                   "norm_weight"):
            want = 0.0
        else:
            want = hp.adam_wd
        assert decay == want, n
        start = before[n] * (1 - lr * decay)
        if is_muon:  # nesterov momentum on a fresh buffer: orthogonalize (1 + momentum) * g
            g = grads[n] * (1 + momentum)
            if hp.muon_row_norm:
                g = g / g.norm(dim=-1, keepdim=True)
            u = tg.newton_schulz_orthogonalize(g, hp.muon_backend_steps)
            expected = start - lr * u * max(1.0, p.size(0) / p.size(1)) ** 0.5
        else:  # Adam's first step moves by lr * g / (|g| + eps)
            expected = start - lr * grads[n] / (grads[n].abs() + hp.adam_eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=n)


def test_lr_schedule_warmup_and_warmdown():
    """Warmup by steps; then flat until 1 - WARMDOWN_FRAC of training, then linear down to MIN_LR."""
    hp = make_hp(LR_WARMUP_STEPS=10, WARMDOWN_FRAC=0.4, ITERATIONS=300)
    assert tg.lr_scale(0, 0.0, hp) == pytest.approx(0.1)
    assert tg.lr_scale(50, 0.5, hp) == 1.0
    assert tg.lr_scale(250, 0.8, hp) == pytest.approx(0.5)
    assert tg.lr_scale(300, 1.0, hp) == 0.0
    assert tg.lr_scale(300, 1.0, make_hp(WARMDOWN_FRAC=0.4, MIN_LR=0.1)) == pytest.approx(0.1)
    assert tg.lr_scale(100, 0.9, make_hp(WARMDOWN_FRAC=0)) == 1.0
    # the fraction: by steps without a budget, by the wall clock with one, clamped to [0, 1]
    assert tg.training_fraction(75, 0.0, hp, 0.0) == 0.25
    assert tg.training_fraction(5, 100.0, hp, 400.0) == 0.25
    assert tg.training_fraction(5, 410.0, hp, 400.0) == 1.0


def _train(rank, world_size, data_dir, env, steps, out_dir, port):
    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = tg.Context()
    hp = tg.Hyperparameters(env)
    hp.resolve_world(world_size)
    torch.manual_seed(0)
    model = tg.HybridGPT(hp)
    opts = tg.build_optimizers(model, hp)
    loader = tg.DistributedTokenLoader(tg.shard_files(data_dir, "train"), ctx.rank, world_size, ctx.device)
    losses = [tg.train_step(model, opts, loader, hp, ctx, s, 1.0) for s in range(steps)]
    torch.save({"state": model.state_dict(), "losses": losses}, os.path.join(out_dir, f"w{world_size}_r{rank}.pt"))
    if ctx.distributed:
        leave_gloo()


def test_two_process_training_equals_one_process(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.random.default_rng(0).integers(0, 320, 40000))
    env = {"SMOKE": "1", "TRAIN_BATCH_TOKENS": "1024", "TRAIN_SEQ_LEN": "64", "MODEL_DIM": "32", "NUM_HEADS": "2",
           "NUM_KV_HEADS": "1", "MAMBA_HEADDIM": "16", "MAMBA_CHUNK_SIZE": "16", "LR_WARMUP_STEPS": "0"}
    port = free_port()
    # one process, two micro-batches  vs  two processes, one micro-batch each: the same global batch
    _train(0, 1, str(tmp_path), dict(env, GRAD_ACCUM_STEPS="2"), 3, str(tmp_path), port)
    mp.spawn(_train, args=(2, str(tmp_path), dict(env, GRAD_ACCUM_STEPS="1"), 3, str(tmp_path), port), nprocs=2)
    one = torch.load(tmp_path / "w1_r0.pt")
    r0, r1 = torch.load(tmp_path / "w2_r0.pt"), torch.load(tmp_path / "w2_r1.pt")
    for k in one["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"ranks differ at {k}"
        torch.testing.assert_close(r0["state"][k], one["state"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert np.allclose(one["losses"], r0["losses"], rtol=1e-5) and r0["losses"] == r1["losses"]
    torch.manual_seed(0)
    init = tg.HybridGPT(tg.Hyperparameters(env)).state_dict()
    assert all(not torch.equal(one["state"][k], init[k]) for k in one["state"] if k.endswith("in_proj.weight"))


def test_ema_ramps_its_decay_then_holds_it():
    model = torch.nn.Linear(3, 2, bias=False)
    ema = tg.EMA(model, 0.997)
    with torch.no_grad():
        w0 = model.weight.clone()
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay min(0.997, 1/10) = 0.1
    torch.testing.assert_close(ema.params[0], 0.1 * w0 + 0.9 * (w0 + 1))
    for _ in range(5000):
        ema.update(model)
    torch.testing.assert_close(ema.params[0], w0 + 1)
    before = ema.params[0].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # late: the full decay
    torch.testing.assert_close(ema.params[0], 0.997 * before + 0.003 * (w0 + 2))
    ema.copy_to(model)
    assert torch.equal(model.weight, ema.params[0])


def _sync_check(rank, world_size, port, perturb, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = tg.Context()
    torch.manual_seed(0)
    model = tg.HybridGPT(make_hp())
    if perturb and rank == 1:
        with torch.no_grad():
            model.blocks[0].mixer.D[0] += 1e-6  # one scalar, one rank: must still be caught
    lines, outcome = [], "ok"
    try:
        tg.check_ranks_in_sync(model, ctx, lines.append)
    except RuntimeError as e:
        outcome = str(e)
    with open(os.path.join(out_dir, f"sync_{int(perturb)}_r{rank}.txt"), "w") as f:
        f.write(outcome + "\n" + "\n".join(lines))
    leave_gloo()


@pytest.mark.parametrize("perturb", [False, True])
def test_rank_sync_check_passes_identical_ranks_and_catches_divergence(tmp_path, perturb):
    mp.spawn(_sync_check, args=(2, free_port(), perturb, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        text = (tmp_path / f"sync_{int(perturb)}_r{rank}.txt").read_text()
        if perturb:
            assert text.startswith("ranks diverged: parameter checksums"), text
        else:
            assert text.startswith("ok"), text
            assert rank == 1 or "ranks in sync: 2 ranks" in text


def test_newton_schulz_on_a_stack_equals_each_matrix_alone():
    """Muon orthogonalizes same-shape matrices as one batch; each must come out as if alone."""
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 48, 32), (2, 32, 48)):
        G = torch.randn(*shape, generator=g) * torch.tensor([1.0, 30.0, 0.01][:shape[0]])[:, None, None]
        batched = tg.newton_schulz_orthogonalize(G, 5)
        for i in range(shape[0]):
            torch.testing.assert_close(batched[i], tg.newton_schulz_orthogonalize(G[i], 5), rtol=1e-5, atol=1e-6)
        # orthogonalized: singular values pulled into the quintic's band around 1, whatever the input scale
        s = torch.linalg.svdvals(batched)
        assert s.min() > 0.5 and s.max() < 1.3


def test_row_normalized_muon_ignores_each_rows_gradient_scale():
    """MUON_ROW_NORM=1: rescaling rows of the gradient leaves the update as it was; plain Muon's changes."""
    g = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    row_scale = torch.rand(16, 1, generator=torch.Generator().manual_seed(1)) * 10 + 0.1
    updates = {}
    for row_norm in (False, True):
        for scaled in (False, True):
            w = torch.nn.Parameter(torch.zeros(16, 24))
            w.grad = g * row_scale if scaled else g.clone()
            tg.Muon([w], lr=1.0, momentum=0.0, backend_steps=5, row_norm=row_norm).step()
            updates[row_norm, scaled] = w.detach().clone()
    torch.testing.assert_close(updates[True, True], updates[True, False], rtol=1e-4, atol=1e-5)
    assert (updates[False, True] - updates[False, False]).abs().max() > 0.05


def _average(rank, world_size, port, out_dir):
    ctx = join_gloo(rank, world_size, port)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.full((3, 2), float(rank + 1))  # ranks 1 and 2: mean 1.5
    if rank == 0:  # rank 1 has no gradient for the second tensor (nothing to learn from): it counts as zeros
        params[1].grad = torch.arange(4.0)
    tg.average_gradients(params, ctx)
    torch.save([p.grad for p in params], os.path.join(out_dir, f"avg_r{rank}.pt"))
    leave_gloo()


def test_average_gradients_means_over_ranks_with_missing_as_zeros(tmp_path):
    mp.spawn(_average, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        g0, g1 = torch.load(tmp_path / f"avg_r{rank}.pt")
        assert torch.equal(g0, torch.full((3, 2), 1.5)) and torch.equal(g1, torch.arange(4.0) / 2)


def test_average_gradients_on_one_rank_fills_missing_with_zeros():
    """As on several ranks: a TTT step without data moves momentum the same way on 1 rank as on 2."""
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((3,), 2.0)
    tg.average_gradients([p, q], CPUContext())
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(q.grad, torch.zeros(2))


def test_polar_express_orthogonalizes_closer_than_the_quintic():
    """MUON_NS=polar-express: per-step polynomials (arXiv 2505.16932) leave the singular values nearer 1 than the
    fixed quintic after the same 5 steps; both keep the singular vectors (U V^T of the SVD)."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(64, 96, generator=g) @ torch.diag(torch.logspace(-2, 0, 96))
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    spread = {}
    for coeffs in ("quintic", "polar-express"):
        X = tg.newton_schulz_orthogonalize(G, 5, coeffs=coeffs)
        s = torch.linalg.svdvals(X)
        spread[coeffs] = float((s - 1).abs().max())
        # same singular vectors: U^T X V is diagonal
        D = U.T @ X @ Vh.T
        assert float((D - torch.diag(torch.diagonal(D))).abs().max()) < 5e-2 * float(D.abs().max()), coeffs
    assert spread["polar-express"] < spread["quintic"], spread
    with pytest.raises(tg.ConfigError, match="MUON_NS='newton': expected one of quintic, polar-express"):
        make_hp(MUON_NS="newton")
    hp = make_hp(MUON_NS="polar-express")
    muon = [o for o in tg.build_optimizers(tg.HybridGPT(hp), hp) if isinstance(o, tg.Muon)][0]
    assert all(gr["ns"] == "polar-express" for gr in muon.param_groups)
