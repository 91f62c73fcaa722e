"""MODEL: the SSD scan against a plain recurrence, the causal conv, causality, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from util import make_hp


def ssd_sequential(x, dt, A, B, C, state=None):
    """The Mamba-2 recurrence one step at a time, for reference."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Bh, Ch = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)
    state = torch.zeros(b, H, P, N, dtype=x.dtype) if state is None else state.clone()
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1), state


def random_ssd_inputs(b, L, H, P, G, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, L, H, generator=g, dtype=dtype) - 1)
    A = -torch.rand(H, generator=g, dtype=dtype) * 4 - 0.1
    B = torch.randn(b, L, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, L, G, N, generator=g, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("L, chunk, G", [(1, 4, 1), (37, 8, 1), (64, 16, 2), (100, 32, 4), (50, 64, 1), (33, 1, 2)])
def test_ssd_matches_sequential_float64(L, chunk, G):
    x, dt, A, B, C = random_ssd_inputs(2, L, 4, 3, G, 5, torch.float64, seed=L)
    init = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, init)
    y, s = tg.ssd_scan_torch(x, dt, A, B, C, chunk, initial_state=init, return_final_state=True)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_ssd_float32_and_chunk_independence():
    x, dt, A, B, C = random_ssd_inputs(1, 70, 2, 4, 1, 8, torch.float64, seed=3)
    y_ref, _ = ssd_sequential(x, dt, A, B, C)
    for chunk in (8, 16, 128):
        y = tg.ssd_scan(*(t.float() for t in (x, dt, A, B, C)), chunk)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def assert_grads_match_sequential(scan, inputs):
    scan(*inputs, 8).square().sum().backward()
    got = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    ssd_sequential(*inputs)[0].square().sum().backward()
    for a, b in zip(got, inputs):
        torch.testing.assert_close(a, b.grad, rtol=1e-9, atol=1e-9)


def test_ssd_gradients_match_sequential():
    inputs = [t.requires_grad_() for t in random_ssd_inputs(1, 20, 2, 3, 1, 4, torch.float64, seed=5)]
    assert_grads_match_sequential(tg.ssd_scan, inputs)


def test_cumsum_op_matches_cumsum_and_its_gradient():
    """The scan's opaque cumsum (kept from inductor's scan codegen): values, gradient, and its registration."""
    x = torch.randn(3, 4, 300, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(tg.cumsum_last(x), torch.cumsum(x, dim=-1), rtol=0, atol=0)
    assert torch.autograd.gradcheck(tg.cumsum_last, (x[:1, :2, :40].detach().requires_grad_(),))
    grad = torch.randn_like(x)
    (ours,) = torch.autograd.grad(tg.cumsum_last(x), x, grad)
    (ref,) = torch.autograd.grad(torch.cumsum(x, dim=-1), x, grad)
    torch.testing.assert_close(ours, ref)
    torch.library.opcheck(tg.cumsum_last, (x[:, :, :40],))
    # a strided input (the scan passes a permuted view)
    v = x.detach().transpose(0, 2)
    torch.testing.assert_close(tg.cumsum_last(v), torch.cumsum(v, dim=-1), rtol=0, atol=0)


def test_compiled_ssd_scan_matches_eager():
    """The chunked scan under torch.compile (fullgraph, with the broadcast dt + bias and dt * A of a real
    Mamba-2 block) against eager, forward and gradients. On CPU; the GPU suite runs the shape that broke."""
    x, dt, A, B, C = random_ssd_inputs(2, 96, 4, 3, 1, 5, torch.float32, seed=11)
    bias = torch.randn(4)
    inputs = [t.requires_grad_() for t in (x, dt, bias, A, B, C)]

    def scan(x, dt, bias, A, B, C):
        return tg.ssd_scan_torch(x, F.softplus(dt + bias), A, B, C, 32)

    torch._dynamo.reset()
    compiled = torch.compile(scan, fullgraph=True)
    grad = torch.randn(x.shape)
    got, ref = compiled(*inputs), scan(*inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_hybrid_compiles_whole_with_the_pytorch_scan():
    """A Mamba-2 block and an attention block under torch.compile with no graph break, the PyTorch scan and its
    opaque cumsum inside: loss and every gradient as eager. The GPU suite compiles the whole SMOKE-sized model
    with the kernels; this is what a machine without mamba_ssm compiles (small: CPU compiles are slow)."""
    hp = make_hp(NUM_LAYERS=2, MAMBA_LAYERS=0, RECUR_LAYERS="", PARALLEL_FROM=0, MAMBA_CHUNK_SIZE=16)
    torch.manual_seed(0)
    model = tg.HybridGPT(hp)
    ids = torch.randint(0, hp.vocab_size, (2, 65))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    losses, grads = [], []
    for run in (compiled, model):
        loss = run(ids[:, :-1], ids[:, 1:]).mean()
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_causal_conv_matches_conv1d():
    x, w, bias = torch.randn(2, 19, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None, :], bias, groups=6)).transpose(1, 2)
    torch.testing.assert_close(tg.causal_conv1d(x, w, bias), ref)


def test_attention_op_matches_naive_gqa():
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("blhd,bshd->bhls", q, kk) / 8 ** 0.5
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhls,bshd->blhd", scores.softmax(-1), vv)
    torch.testing.assert_close(tg.attention_op(q, k, v), ref, rtol=1e-5, atol=1e-5)


def perturbed_model(hp, seed=0):
    """A model whose zero-initialised output projections are made random, so every path carries signal."""
    torch.manual_seed(seed)
    model = tg.HybridGPT(hp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("layers, extra", [("0,2,3", {}), ("", {}), ("0,1,2,3", {}),
                                           ("0,2", {"ATTN_XSA": 1, "ROPE_DIMS": 8}), ("0,2", {"SMEAR_GATE": 1}),
                                           ("0,2", {"ATTN_GATE": 1}), ("0", {"MAMBA_BRANCH_LAYERS": "1,3"})])
def test_whole_model_is_causal(layers, extra):
    hp = make_hp(MAMBA_LAYERS=layers, MAMBA_CHUNK_SIZE=8, **extra)
    model = perturbed_model(hp).double()
    model.looping = True
    if model.smear_w is not None:
        with torch.no_grad():
            model.smear_lambda.fill_(1.0)
            model.smear_w.normal_()
    ids = torch.randint(0, hp.vocab_size, (2, 40))
    base = model.logits(ids)
    for t in (0, 7, 8, 23, 39):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % hp.vocab_size
        out = model.logits(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t:] - base[:, t:]).abs().amax() > 1e-6


def test_mamba_branch_adds_a_mamba2_beside_attention_on_the_same_input():
    """MAMBA_BRANCH_LAYERS: a = x + attn(h) + s * mamba2(h), h the block's normalized input, then the MLP on a (or,
    parallel, on the input); with the branch's out_proj at zero (its init) exactly the block without it. Its matrices
    train as Mamba's do (Muon at MAMBA_MATRIX_LR), its SSM parameters as the other SSM parameters."""
    hp = make_hp(MAMBA_LAYERS="0", MAMBA_BRANCH_LAYERS="1,3", MAMBA_CHUNK_SIZE=8)  # SMOKE: PARALLEL_FROM=3
    model = tg.HybridGPT(hp).double()
    assert model.blocks[2].branch is None and model.blocks[0].branch is None
    x, x0 = torch.randn(2, 16, hp.model_dim, dtype=torch.float64), torch.randn(2, 16, hp.model_dim, dtype=torch.float64)
    for i, parallel in ((1, False), (3, True)):
        block = model.blocks[i]
        assert isinstance(block.mixer, tg.Attention) and isinstance(block.branch, tg.Mamba2) and block.parallel == parallel
        with torch.no_grad():
            branch = block.branch
            out = block(x, x0)
            block.branch = None
            torch.testing.assert_close(out, block(x, x0))  # zero out_proj: the branch adds nothing yet
            block.branch = branch
            for p in (branch.out_proj.weight, block.mixer.proj.weight, block.mlp.proj.weight):
                p.normal_(0, 0.1)
            block.branch_scale.uniform_(0.5, 1.5)
            xin = block.resid_mix[0] * x + block.resid_mix[1] * x0
            h = F.rms_norm(xin, (hp.model_dim,)) * block.norm_scale
            a = xin + block.mixer_scale * block.mixer(h) + block.branch_scale * branch(h)
            mlp_in = F.rms_norm(xin if parallel else a, (hp.model_dim,)) * block.norm_scale
            torch.testing.assert_close(block(x, x0), a + block.mlp_scale * block.mlp(mlp_in))
    names = dict(model.named_parameters())
    assert tg.param_group("blocks.1.branch.in_proj.weight", names["blocks.1.branch.in_proj.weight"]) == "mamba_matrices"
    assert tg.param_group("blocks.1.branch.A_log", names["blocks.1.branch.A_log"]) == "ssm"
    assert tg.param_group("blocks.1.branch_scale", names["blocks.1.branch_scale"]) == "controls"
    assert "layer  1 encoder: attention&mamba2+mlp" in tg.layer_map(model)
    assert tg.parameter_report(model)["mamba_branches"] == sum(p.numel() for p in model.blocks[1].branch.parameters()) * 2


def test_layer_map_and_skips():
    hp = make_hp(NUM_LAYERS=5, MAMBA_LAYERS="0,1,3", MAMBA_MLP=0)
    model = tg.HybridGPT(hp)
    assert model.is_mamba == [True, True, False, True, False]
    assert model.skip_map() == {2: 1, 3: 0}
    assert isinstance(model.blocks[2].mixer, tg.Attention) and isinstance(model.blocks[0].mixer, tg.Mamba2)
    assert model.blocks[0].mlp is None and model.blocks[2].mlp is not None
    assert make_hp().mamba_mlp and tg.HybridGPT(make_hp()).blocks[0].mlp is not None  # MAMBA_MLP=1, the default


def test_recurrent_layers_equal_a_stack_with_those_blocks_repeated():
    """RECUR_LAYERS=1,2 with one extra loop on 4 layers runs blocks 0,1,2,1,2,3 once looping is on: the same
    function as 6 layers holding copies of those blocks' weights and scalars (each copy keeping its block's
    norm scale), with the U-Net over the 6; a shared parameter's gradient is the sum of its copies'."""
    from util import randomize_weights
    torch.manual_seed(0)
    rec = tg.HybridGPT(make_hp(NUM_LAYERS=4, MAMBA_LAYERS="0,2", RECUR_LAYERS="1,2", RECUR_LOOPS=1, PARALLEL_FROM=0))
    randomize_weights(rec, seed=3)
    with torch.no_grad():  # scalars away from their ones/zeros init
        for name, p in rec.named_parameters():
            if "scale" in name or "resid_mix" in name or name.startswith("skip_"):
                p.add_(0.3 * torch.randn_like(p))
    assert rec.order == [0, 1, 2, 3] and rec.num_encoder == 2 and rec.skip_map() == {2: 1, 3: 0}
    rec.looping = True
    assert rec.order == [0, 1, 2, 1, 2, 3] and rec.num_encoder == 3 and rec.skip_map() == {3: 2, 4: 1, 5: 0}
    flat = tg.HybridGPT(make_hp(NUM_LAYERS=6, MAMBA_LAYERS="0,2,4", RECUR_LAYERS="", PARALLEL_FROM=0))
    state = {k: v for k, v in rec.state_dict().items() if not k.startswith("blocks.")}
    for j, b in enumerate(rec.order):
        state.update({f"blocks.{j}.{k}": v for k, v in rec.blocks[b].state_dict().items()})
        flat.blocks[j].norm_scale = rec.blocks[b].norm_scale
    flat.load_state_dict(state)
    ids = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(1))
    loss_rec, loss_flat = rec(ids[:, :-1], ids[:, 1:]).mean(), flat(ids[:, :-1], ids[:, 1:]).mean()
    torch.testing.assert_close(loss_rec, loss_flat, rtol=1e-5, atol=1e-6)
    loss_rec.backward()
    loss_flat.backward()
    flat1, flat3 = dict(flat.blocks[1].named_parameters()), dict(flat.blocks[3].named_parameters())
    for name, p in rec.blocks[1].named_parameters():
        torch.testing.assert_close(p.grad, flat1[name].grad + flat3[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    layer_map = tg.layer_map(rec)
    assert "layer  3 (block 1, again) decoder: attention+mlp <- skip from layer 2" in layer_map
    assert "layer  5 (block 3) decoder: attention+mlp <- skip from layer 0" in layer_map


def test_default_recurrence_is_the_record_layout():
    """Layers 3-5 looped twice more: encoder 0,1,2,3,4,5,3,4 and decoder 5,3,4,5,6,...,10 once looping is on."""
    hp = tg.Hyperparameters({"MAMBA_LAYERS": ""})
    with torch.device("meta"):
        model = tg.HybridGPT(hp)
    assert model.order == list(range(11))
    model.looping = True
    n = model.num_encoder
    assert model.order[:n] == [0, 1, 2, 3, 4, 5, 3, 4] and model.order[n:] == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert model.skip_weights.shape == (8, 512) and len(model.skip_map()) == 8


def test_recurrence_switches_on_at_its_fraction_of_training(monkeypatch):
    """Without a wall clock the fraction is steps / ITERATIONS: 20 steps at RECUR_START_FRAC=0.35 run plain
    for steps 0-6 and looped from step 7, and the switch is logged once."""
    from util import CPUContext
    hp = make_hp(ITERATIONS=20, RECUR_START_FRAC=0.35, MAX_WALLCLOCK_SECONDS=0, EMA_DECAY=0)
    model = tg.HybridGPT(hp)
    orders = []

    def fake_step(model_, opts, loader, hp_, ctx, step, lr_mult):
        orders.append(list(model.order))
        return 1.0
    monkeypatch.setattr(tg, "train_step", fake_step)
    logs = []
    steps, _ = tg.train_loop(model, model, [], None, hp, CPUContext(), tg.TrainClock(), logs.append)
    assert steps == 20 and orders[:7] == [model.plain_order] * 7 and orders[7:] == [model.looped_order] * 13
    assert model.looped_order != model.plain_order
    assert sum("recurrence on at step 7 (35% of training)" in m for m in logs) == 1


@pytest.mark.parametrize("layers, message", [("1,3", "expected consecutive layers"), ("3,4", "RECUR_LAYERS has [4]")])
def test_recur_layers_must_be_consecutive_existing_layers(layers, message):
    with pytest.raises(tg.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_hp(NUM_LAYERS=4, RECUR_LAYERS=layers)


def test_block_sequential_and_parallel_residuals_and_norm_scale():
    """Sequential: the MLP reads x + mixer(x); parallel (blocks from PARALLEL_FROM on): both read x. Each
    normalized input is scaled by 1/sqrt(block index + 1) under LN_SCALE."""
    from util import randomize_weights
    hp = make_hp(NUM_LAYERS=4, MAMBA_LAYERS="0", PARALLEL_FROM=2, RECUR_LAYERS="")
    model = tg.HybridGPT(hp)
    randomize_weights(model, seed=4)
    assert [b.parallel for b in model.blocks] == [False, False, True, True]
    assert [b.norm_scale for b in model.blocks] == [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5]
    assert [b.norm_scale for b in tg.HybridGPT(make_hp(NUM_LAYERS=4, LN_SCALE=0)).blocks] == [1.0] * 4
    x, x0 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    norm = lambda t, k: F.rms_norm(t, (64,)) * model.blocks[k].norm_scale
    with torch.no_grad():
        for k in (1, 2):
            b = model.blocks[k]
            b.resid_mix.copy_(torch.stack([torch.full((64,), 0.7), torch.full((64,), 0.3)]))
            start = 0.7 * x + 0.3 * x0
            mid = start + b.mixer_scale * b.mixer(norm(start, k))
            mlp_in = start if k == 2 else mid
            torch.testing.assert_close(b(x, x0), mid + b.mlp_scale * b.mlp(norm(mlp_in, k)))
    assert "layer  2 decoder: attention||mlp <- skip from layer 1" in tg.layer_map(model)


def test_mamba_norm_scale_output_moves_the_factor_past_the_mamba_mixer():
    """MAMBA_NORM_SCALE=output: a Mamba block's mixer reads the plain RMS norm and its output is scaled by
    1/sqrt(i+1); its MLP and every attention block keep the scaled input. The default (input) is LN_SCALE's."""
    from util import randomize_weights
    env = dict(NUM_LAYERS=4, MAMBA_LAYERS="1,3", PARALLEL_FROM=0, RECUR_LAYERS="")
    base = randomize_weights(tg.HybridGPT(make_hp(**env)), seed=5)
    moved = tg.HybridGPT(make_hp(MAMBA_NORM_SCALE="output", **env))
    moved.load_state_dict(base.state_dict())
    assert [b.scale_mixer_output for b in moved.blocks] == [False, True, False, True]
    assert not any(b.scale_mixer_output for b in base.blocks)
    x, x0 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    with torch.no_grad():
        for k, b in enumerate(moved.blocks):
            s, start = b.norm_scale, b.resid_mix[0] * x + b.resid_mix[1] * x0
            mixer_in, mixer_out = (1.0, s) if k in (1, 3) else (s, 1.0)
            mid = start + b.mixer_scale * b.mixer(F.rms_norm(start, (64,)) * mixer_in) * mixer_out
            torch.testing.assert_close(b(x, x0), mid + b.mlp_scale * b.mlp(F.rms_norm(mid, (64,)) * s))
            if k in (0, 2):  # attention blocks are as they were
                torch.testing.assert_close(b(x, x0), base.blocks[k](x, x0))
        assert not torch.allclose(moved.blocks[3](x, x0), base.blocks[3](x, x0))
    with pytest.raises(tg.ConfigError, match="MAMBA_NORM_SCALE='both': expected one of input, output"):
        make_hp(MAMBA_NORM_SCALE="both")


def reference_hidden(model, ids):
    """The U-Net by hand: encoder outputs pushed, decoder layers take them back in reverse, each gated skip
    being sigmoid(g) * x + (1 - sigmoid(g)) * w * skip, or x + w * skip without gates."""
    x = x0 = F.rms_norm(model.tok_emb(ids) + (model.bigram(ids) if model.bigram is not None else 0), (64,))
    order, n, outs = model.order, model.num_encoder, []
    for i, b in enumerate(order):
        if i >= n and i - n < n:
            skip = model.skip_weights[i - n] * outs[n - 1 - (i - n)]
            if model.skip_gates is None:
                x = x + skip
            else:
                g = torch.sigmoid(model.skip_gates[i - n])
                x = g * x + (1 - g) * skip
        x = model.blocks[b](x, x0)
        outs.append(x)
    return F.rms_norm(x, (64,))


@pytest.mark.parametrize("gates", [0, 1])
def test_gated_skips_against_the_hand_formula(gates):
    """At init the gates are 0, so each skip is an even mix of stream and skip (the record's form); with
    SKIP_GATES=0 it is added. Random gates and weights follow the same formula."""
    from util import randomize_weights
    model = tg.HybridGPT(make_hp(NUM_LAYERS=5, SKIP_GATES=gates, RECUR_LAYERS="", PARALLEL_FROM=0))
    randomize_weights(model, seed=6)
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(ids), reference_hidden(model, ids))
        if gates:
            assert torch.equal(model.skip_gates, torch.zeros_like(model.skip_gates))
            model.skip_gates.normal_()
            model.skip_weights.normal_()
            torch.testing.assert_close(model.hidden(ids), reference_hidden(model, ids))
        else:
            assert model.skip_gates is None


def test_matrices_start_orthogonal_and_projections_at_zero():
    model = tg.HybridGPT(make_hp(MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, tg.CastedLinear):
            W = m.weight.detach().double()
            if m.zero_init:
                assert not W.any(), name
            elif min(W.shape) >= 64:
                G = W @ W.T if W.size(0) <= W.size(1) else W.T @ W
                torch.testing.assert_close(G, torch.eye(G.size(0), dtype=G.dtype), atol=1e-5, rtol=0, msg=name)
                checked += 1
    assert checked >= 4


def test_parallel_from_must_name_a_block():
    with pytest.raises(tg.ConfigError, match=r"PARALLEL_FROM=4 must be a block index in \[1, 3\]"):
        make_hp(NUM_LAYERS=4, PARALLEL_FROM=4)
    assert make_hp(NUM_LAYERS=4, PARALLEL_FROM=0).parallel_from == 0
    hp = tg.Hyperparameters({"NUM_LAYERS": "5"})  # defaults for 11 layers, cut to fit, and said
    assert hp.recur_layers == [3, 4] and hp.parallel_from == 0 and hp.mamba_layers == [0, 1, 2, 3, 4]
    assert any("RECUR_LAYERS: default 3,4,5 cut to '3,4' for NUM_LAYERS=5" in n for n in hp.notes)


def test_mamba2_block_shapes_and_parameters():
    hp = make_hp(MODEL_DIM=32, MAMBA_EXPAND=1.5, MAMBA_HEADDIM=8, MAMBA_D_STATE=4, MAMBA_NGROUPS=2, NUM_HEADS=2, NUM_KV_HEADS=1)
    m = tg.Mamba2(hp)
    assert m.nheads == 6 and m.d_inner == 48
    assert m.in_proj.weight.shape == (2 * 48 + 2 * 2 * 4 + 6, 32)
    assert m.A_log.shape == m.dt_bias.shape == m.D.shape == (6,)
    assert m.conv_weight.shape == (48 + 16, hp.mamba_d_conv) and m.norm_weight.shape == (48,)
    assert (-torch.exp(m.A_log) < 0).all()
    assert m(torch.randn(2, 13, 32)).shape == (2, 13, 32)


def test_every_parameter_receives_a_gradient():
    hp = make_hp(MAMBA_MLP=1, TIE_EMBEDDINGS=0)
    torch.manual_seed(0)
    model = tg.HybridGPT(hp)
    opts = tg.build_optimizers(model, hp)
    ids = torch.randint(0, hp.vocab_size, (2, 64))
    for step in range(3):  # zero-initialised head, then output projections, get signal after updates
        model(ids[:, :-1], ids[:, 1:]).mean().backward()
        if step < 2:
            for o in opts:
                o.step()
            model.zero_grad()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_forward_loss_is_per_token_cross_entropy():
    hp = make_hp()
    model = perturbed_model(hp)
    ids = torch.randint(0, hp.vocab_size, (2, 17))
    loss = model(ids[:, :-1], ids[:, 1:])
    ref = F.cross_entropy(model.logits(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(loss, ref.view(2, 16))
    logits = model.logits(ids)
    assert logits.abs().max() <= hp.logit_softcap


def test_asymmetric_softcap_caps_each_sign_by_its_own_limit():
    """LOGIT_SOFTCAP_NEG: positive logits z -> 30 tanh(z / 30), negative ones -> 10 tanh(z / 10); unset, the
    negative cap is LOGIT_SOFTCAP's (the one symmetric softcap)."""
    hp = make_hp(LOGIT_SOFTCAP=30, LOGIT_SOFTCAP_NEG=10)
    assert make_hp(LOGIT_SOFTCAP=30).logit_softcap_neg == 30
    model = perturbed_model(hp)
    with torch.no_grad():
        model.tok_emb.weight.mul_(400)  # raw logits far past both caps
    ids = torch.randint(0, hp.vocab_size, (2, 17))
    capped = model.logits(ids)
    model.softcap = 0.0
    raw = model.logits(ids)
    expected = torch.where(raw > 0, 30 * torch.tanh(raw / 30), 10 * torch.tanh(raw / 10))
    torch.testing.assert_close(capped, expected)
    assert capped.max() > 25 and capped.min() < -9 and capped.min() >= -10
    with pytest.raises(tg.ConfigError, match="LOGIT_SOFTCAP_NEG=10 caps the negative logits of a softcap, but LOGIT_SOFTCAP=0"):
        make_hp(LOGIT_SOFTCAP=0, LOGIT_SOFTCAP_NEG=10)


def test_kernel_configuration_on_cpu_uses_the_pytorch_paths():
    lines = []
    tg.configure_kernels(make_hp(), torch.device("cpu"), lines.append)
    assert all(v is None for v in tg.KERNELS.values())
    assert lines == ["kernels: ssd=pytorch-chunked causal_conv1d=pytorch-shift-add attention=torch-sdpa (no CUDA device)"]


# The GPU libraries cannot load without a GPU, so these stand in for load_fast_kernels() and test only
# the choice and the messages; tests/test_gpu.py runs the real kernels on the device.
def fake_found(ssd=True, conv=True, attention=True):
    def impl(name):
        return (lambda *a, **k: None), name
    return lambda: {"ssd": ((lambda: None, lambda: None), "mamba_ssm-triton") if ssd else (None, "mamba_ssm SSD: missing"),
                    "causal_conv1d": impl("causal_conv1d-cuda") if conv else (None, "causal_conv1d: missing"),
                    "attention": impl("fa3") if attention else (None, "no flash attention")}


def test_kernel_configuration_on_cuda_picks_what_imports(monkeypatch):
    monkeypatch.setattr(tg, "load_fast_kernels", fake_found())
    lines = []
    tg.configure_kernels(make_hp(), torch.device("cuda"), lines.append)
    try:
        assert lines == ["kernels: ssd=mamba_ssm-triton causal_conv1d=causal_conv1d-cuda attention=fa3"]
        assert all(v is not None for v in tg.KERNELS.values())
    finally:
        tg.configure_kernels(make_hp(), torch.device("cpu"), lambda m: None)


def test_fast_kernels_off_keeps_the_fallbacks_on_cuda(monkeypatch):
    monkeypatch.setattr(tg, "load_fast_kernels", fake_found())
    lines = []
    tg.configure_kernels(make_hp(FAST_KERNELS=0), torch.device("cuda"), lines.append)
    assert all(v is None for v in tg.KERNELS.values())
    assert lines[0].endswith("(FAST_KERNELS=0)") and len(lines) == 1


def test_missing_kernel_warns_or_stops_under_require(monkeypatch):
    monkeypatch.setattr(tg, "load_fast_kernels", fake_found(ssd=False, attention=False))
    lines = []
    tg.configure_kernels(make_hp(), torch.device("cuda"), lines.append)
    try:
        assert lines[0] == "kernels: ssd=pytorch-chunked causal_conv1d=causal_conv1d-cuda attention=torch-sdpa"
        assert lines[1].startswith("WARNING: fast kernels unavailable") and "mamba_ssm SSD: missing" in lines[1]
        assert "no flash attention" in lines[1]
        with pytest.raises(SystemExit, match="REQUIRE_FAST_KERNELS=1: .*mamba_ssm SSD: missing"):
            tg.configure_kernels(make_hp(REQUIRE_FAST_KERNELS=1), torch.device("cuda"), lines.append)
    finally:
        tg.configure_kernels(make_hp(), torch.device("cpu"), lambda m: None)


def test_ssd_custom_op_wiring(monkeypatch):
    """The custom op's schema, fake (meta) outputs and autograd registration, checked by torch's opcheck.
    The Triton kernels cannot run on CPU, so the float64 PyTorch scan stands in for them here, with the
    same (forward, backward) call signatures; tests/test_gpu.py checks the real kernels on the device."""
    def fwd(x, dt, A, B, C, chunk):
        return (tg.ssd_scan_torch(x, dt, A, B, C, chunk),)

    def bwd(grad, x, dt, A, B, C, y, chunk):
        # torch.func, not autograd: a custom op's body runs below the autograd dispatch key. torch.func
        # cannot differentiate the scan's own custom op (cumsum_last), so plain cumsum stands in for it
        with monkeypatch.context() as m:
            m.setattr(tg, "cumsum_last", lambda t: torch.cumsum(t, dim=-1))
            _, vjp = torch.func.vjp(lambda *t: tg.ssd_scan_torch(*t, chunk), x, dt, A, B, C)
            return vjp(grad)

    monkeypatch.setitem(tg.KERNELS, "ssd_fwd", fwd)
    monkeypatch.setitem(tg.KERNELS, "ssd_bwd", bwd)
    inputs = [t.requires_grad_() for t in random_ssd_inputs(1, 24, 2, 3, 1, 4, torch.float64, seed=7)]
    torch.library.opcheck(tg.ssd_scan_kernel, (*inputs, 8))
    assert_grads_match_sequential(tg.ssd_scan_kernel, inputs)

def test_import_without_package_init_skips_init_and_repeats(tmp_path, monkeypatch):
    """mamba_ssm's __init__ needs a CUDA extension the SSD path never uses: its submodules must import
    without it, and a second import (another configure_kernels call) must work too."""
    pkg = tmp_path / "initfails"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('package __init__ ran')\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "kernel.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in list(__import__("sys").modules) if m.startswith("initfails")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    assert tg.import_without_package_init("initfails", "ops.kernel").VALUE == 42
    assert tg.import_without_package_init("initfails", "ops.kernel").VALUE == 42
    with pytest.raises(ImportError, match="not installed"):
        tg.import_without_package_init("no_such_package_here", "x")


def test_partial_rope_rotates_only_its_dims_and_stays_relative():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 3, 64, dtype=torch.float64)
    full, partial = tg.Rotary(64, 10000.0).double(), tg.Rotary(16, 10000.0).double()
    out = partial(x)
    torch.testing.assert_close(out[..., 16:], x[..., 16:], rtol=0, atol=0)
    torch.testing.assert_close(out[..., :16], tg.Rotary(16, 10000.0).double()(x[..., :16].contiguous()))
    assert not torch.allclose(out[:, 1:, :, :16], x[:, 1:, :, :16])
    assert not torch.allclose(full(x)[..., 16:], x[..., 16:])
    # the rotated part's dot products depend on the offset only: the same q, k at positions (t, s), (t+4, s+4)
    q, k = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    seq = torch.zeros(1, 12, 1, 64, dtype=torch.float64)

    def score(tq, tk):
        xq, xk = seq.clone(), seq.clone()
        xq[0, tq, 0], xk[0, tk, 0] = q, k
        return float((partial(xq)[0, tq, 0] * partial(xk)[0, tk, 0]).sum())
    assert abs(score(5, 2) - score(9, 6)) < 1e-9 and abs(score(5, 2) - score(5, 3)) > 1e-6


def exposed_attention(**env):
    """A 32-wide, 4-head attention whose output projection is the identity (its output is y itself), and an input."""
    torch.manual_seed(0)
    attn = tg.Attention(make_hp(MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, **env)).double()
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(32, dtype=torch.float64))
    return attn, torch.randn(2, 10, 32, dtype=torch.float64)


def test_xsa_removes_each_output_s_own_value_direction():
    attn, x = exposed_attention(ATTN_XSA=1)
    with torch.no_grad():
        y = attn(x).view(2, 10, 4, 8)
        v = attn.v(x).view(2, 10, 2, 8).repeat_interleave(2, dim=2)
        assert float((y * F.normalize(v, dim=-1)).sum(-1).abs().max()) < 1e-12
        attn.xsa = 0
        plain = attn(x).view(2, 10, 4, 8)
    assert float((plain * F.normalize(v, dim=-1)).sum(-1).abs().max()) > 1e-3


def test_attention_gate_scales_each_head_by_its_own_sigmoid():
    """ATTN_GATE: head h's output (after XSA) times sigmoid(0.5 w_h . x[:12]), x the attention's input; 1/2 at init."""
    attn, x = exposed_attention(ATTN_GATE=1)
    gate_w = attn.gate_w
    with torch.no_grad():
        attn.gate_w = None
        plain = attn(x).view(2, 10, 4, 8)
        attn.gate_w = gate_w
        torch.testing.assert_close(attn(x).view(2, 10, 4, 8), plain / 2)  # zero weights: every gate 1/2
        gate_w.normal_()
        g = torch.sigmoid(0.5 * torch.einsum("bld,hd->blh", x[..., :12], gate_w))
        torch.testing.assert_close(attn(x).view(2, 10, 4, 8), plain * g[..., None])
    attn(x).square().sum().backward()
    assert gate_w.grad.abs().sum() > 0
    assert tg.param_group("blocks.0.mixer.gate_w", gate_w) == "controls"  # Adam, never Muon
    assert tg.quant_kind("blocks.0.mixer.gate_w", gate_w) == "float"
    assert tg.Attention(make_hp(MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2)).gate_w is None  # off by default


def test_smear_gate_mixes_in_the_previous_token_except_at_document_starts():
    """SMEAR_GATE: x_t + lambda sigmoid(w . x_t[:12]) x_{t-1}, and exactly x_t where token t is BOS; the
    identity at init (lambda = w = 0), so the model starts as the one without it."""
    hp = make_hp(SMEAR_GATE=1)
    model = tg.HybridGPT(hp)
    ids = torch.randint(2, 320, (2, 20), generator=torch.Generator().manual_seed(3))
    ids[0, 7] = ids[1, 0] = ids[1, 13] = model.bos_id
    with torch.no_grad():
        plain = model.tok_emb(ids) + model.bigram(ids)
        torch.testing.assert_close(model.embed(ids), plain)  # identity at init
        model.smear_lambda.fill_(0.8)
        model.smear_w.normal_()
        out = model.embed(ids)
        g = 0.8 * torch.sigmoid(plain[:, 1:, :12] @ model.smear_w)[..., None]
        expected = torch.cat([plain[:, :1], plain[:, 1:] + g * plain[:, :-1]], dim=1)
        for b, t in ((0, 7), (1, 0), (1, 13)):
            expected[b, t] = plain[b, t]  # a document start takes nothing from the document before it
        torch.testing.assert_close(out, expected)
        assert (out[0, 8] - plain[0, 8]).abs().amax() > 1e-4  # the token after a start does smear
    loss = model(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    assert model.smear_lambda.grad.abs().sum() > 0 and model.smear_w.grad.abs().sum() > 0
    assert tg.HybridGPT(make_hp()).smear_w is None
