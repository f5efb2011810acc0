"""
The MoE layer against a slow, obviously-correct reference written token by token from the
papers: outputs, gradients, the aux and z losses, capacity and dropping.
"""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import model
from model import GPTConfig, MOELayer
from manager import MANAGER


def reference_moe(x, w_g, c_fc, c_proj, fc_bias, proj_bias, k, cap, noise=None, w_noise=None, expert_bias=None):
    """ Per-token loops. x (N, C). cap None = dropless. expert_bias (DeepSeek-V3) moves the choice
    of experts, not the gates. Returns y, aux, z, number dropped. """
    N, E = x.size(0), w_g.size(0)
    logits = x @ w_g.t()
    if noise is not None:  # Shazeer et al. 2017 eq. (4)
        logits = logits + F.softplus(x @ w_noise.t()) * noise
    choices, gates = [], []
    for t in range(N):
        score = logits[t] if expert_bias is None else logits[t] + expert_bias
        ranked = sorted(range(E), key=lambda e: -score[e].item())[:k]
        choices.append(ranked)
        if k == 1:  # Switch eq. (2): the gate is the full-softmax probability p_i(x)
            gates.append(torch.softmax(logits[t], 0)[ranked])
        else:  # Shazeer et al. 2017 eq. (3)-(5): a softmax over the k chosen logits
            gates.append(torch.softmax(torch.stack([logits[t, e] for e in ranked]), 0))
    # fill slots: every token's 1st choice in token order, then every 2nd choice, ...
    used, kept = [0] * E, {}
    for j in range(k):
        for t in range(N):
            e = choices[t][j]
            kept[t, j] = cap is None or used[e] < cap
            used[e] += kept[t, j]
    rows = []
    for t in range(N):
        y_t = torch.zeros(x.size(1))
        for j in range(k):
            if kept[t, j]:
                e = choices[t][j]
                h = x[t] @ c_fc[e] + (fc_bias[e, 0] if fc_bias is not None else 0)
                out = F.gelu(h) @ c_proj[e] + (proj_bias[e, 0] if proj_bias is not None else 0)
                y_t = y_t + gates[t][j] * out
        rows.append(y_t)
    y = torch.stack(rows)
    # Switch eq. (4)-(6) for top-k: f over the k*N assignments before dropping, P full softmax
    probs = torch.softmax(logits, dim=-1)
    aux = 0
    for e in range(E):
        f_e = sum(choices[t][j] == e for t in range(N) for j in range(k)) / (N * k)
        P_e = sum(probs[t, e] for t in range(N)) / N
        aux = aux + f_e * P_e
    aux = E * aux
    z = sum(torch.logsumexp(logits[t], 0) ** 2 for t in range(N)) / N  # ST-MoE eq. (5)
    dropped = sum(not v for v in kept.values())
    return y, aux, z, dropped


def make_layer(seed=0, **kw):
    args = dict(n_embd=16, n_head=2, n_exp=4, top_k=2, use_aux_loss=True, use_router_z_loss=True)
    args.update(kw)
    config = GPTConfig(**args)
    torch.manual_seed(seed)
    layer = MOELayer(config, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def skewed_input(seed=0, B=2, T=12, layer=None):
    """ tokens that prefer expert 0, so that capacity limits bite """
    g = torch.Generator().manual_seed(seed)
    C = layer.router.w_g.in_features
    x = torch.randn(B, T, C, generator=g)
    w0 = layer.router.w_g.weight[0].detach()
    return x + 0.8 * w0 / w0.norm()


def run_both(layer, x, train=True, noise_seed=None):
    layer.train(train)
    layer.zero_grad(set_to_none=True)
    N = x.size(0) * x.size(1)
    xs = x.clone().requires_grad_(True)
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
    MANAGER.reset()
    y = layer(xs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    fast = dict(y=y.detach(), aux=MANAGER.aux_loss[0].detach(), z=MANAGER.router_z_loss[0].detach(),
                dropped=MANAGER.routing[0][1].item() * N * layer.top_k, dx=xs.grad,
                grads={n: p.grad for n, p in layer.named_parameters()})

    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    xr = x.clone().view(N, -1).requires_grad_(True)
    noise = None
    if noise_seed is not None and train:
        torch.manual_seed(noise_seed)
        noise = torch.randn(N, layer.n_exp)
    cf = layer.train_capacity if train else layer.eval_capacity
    cap = None  # dropless
    if cf > 0:  # Switch eq. (3), rounded up to even, at least min_capacity
        cap = math.floor(Fraction(str(cf)) * layer.top_k * N / layer.n_exp)  # exact: cf as written
        cap = max(cap + cap % 2, layer.min_capacity)
    yr, aux, z, dropped = reference_moe(
        xr, ref_params['router.w_g.weight'], ref_params['experts.c_fc'], ref_params['experts.c_proj'],
        ref_params.get('experts.fc_bias'), ref_params.get('experts.proj_bias'), layer.top_k, cap,
        noise=noise, w_noise=ref_params.get('router.w_noise.weight'), expert_bias=layer.router.expert_bias)
    (yr * g.view(N, -1)).sum().backward()
    ref = dict(y=yr.detach().view_as(x), aux=aux.detach(), z=z.detach(), dropped=dropped, dx=xr.grad.view_as(x),
               grads={n: p.grad for n, p in ref_params.items()})
    return fast, ref


CASES = {
    'dropless': dict(train_capacity=0.0),
    'capacity_1.25': dict(train_capacity=1.25),
    'tight_capacity_drops': dict(train_capacity=0.5, min_capacity=1),
    'top1': dict(top_k=1, train_capacity=1.0, min_capacity=1),
    'top3': dict(top_k=3, train_capacity=1.0, min_capacity=1),
    'no_bias': dict(bias=False, train_capacity=0.75, min_capacity=1),
    'aux_free_bias': dict(use_aux_free_bias=True, train_capacity=1.0, min_capacity=1),
    'top1_aux_free_bias': dict(top_k=1, use_aux_free_bias=True, train_capacity=1.0, min_capacity=1),
    # rows of 30 floats are no multiple of 16 bytes, which torch._grouped_mm needs
    'odd_n_embd': dict(n_embd=30, train_capacity=1.0, min_capacity=1),
    'odd_expert_hidden': dict(expert_hidden=30, train_capacity=0.0),
}


@pytest.fixture(params=['grouped_mm', 'padded_bmm'])
def expert_path(request, monkeypatch):
    """ both ways of running the experts must give the same answers """
    if request.param == 'padded_bmm':
        monkeypatch.setattr(model, 'use_grouped_mm', lambda *args: False)
    return request.param


@pytest.mark.parametrize('case', list(CASES))
def test_layer_matches_reference(case, expert_path):
    layer = make_layer(**CASES[case])
    if layer.router.expert_bias is not None:  # a bias large enough to change choices
        layer.router.expert_bias.copy_(torch.tensor([-1.0, 0.5, 0.0, 1.5]))
    x = skewed_input(layer=layer)
    fast, ref = run_both(layer, x)
    if case == 'dropless':
        assert ref['dropped'] == 0
    if case in ('tight_capacity_drops', 'top1', 'top3', 'no_bias', 'aux_free_bias', 'top1_aux_free_bias', 'odd_n_embd'):
        assert ref['dropped'] > 0, "the case is meant to drop assignments"
    assert fast['dropped'] == pytest.approx(ref['dropped'])
    torch.testing.assert_close(fast['y'], ref['y'], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast['aux'], ref['aux'], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast['z'], ref['z'], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast['dx'], ref['dx'], atol=1e-5, rtol=1e-4)
    for name in ref['grads']:
        torch.testing.assert_close(fast['grads'][name], ref['grads'][name], atol=1e-5, rtol=1e-4, msg=name)


def test_eval_drops_by_eval_capacity_and_training_by_train_capacity(expert_path):
    layer = make_layer(train_capacity=0.0, eval_capacity=0.5, min_capacity=1)
    x = skewed_input(layer=layer)
    fast, ref = run_both(layer, x, train=False)
    assert ref['dropped'] > 0
    assert fast['dropped'] == pytest.approx(ref['dropped'])
    torch.testing.assert_close(fast['y'], ref['y'], atol=1e-5, rtol=1e-4)
    fast_train, ref_train = run_both(layer, x, train=True)
    assert fast_train['dropped'] == ref_train['dropped'] == 0


@pytest.mark.parametrize('top_k', [1, 2])
def test_noisy_top_k_matches_reference_in_training(expert_path, top_k):
    layer = make_layer(use_noisy_top_k=True, top_k=top_k, train_capacity=1.25)
    x = skewed_input(layer=layer)
    fast, ref = run_both(layer, x, train=True, noise_seed=123)
    torch.testing.assert_close(fast['y'], ref['y'], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast['z'], ref['z'], atol=1e-5, rtol=1e-5)
    for name in ref['grads']:
        torch.testing.assert_close(fast['grads'][name], ref['grads'][name], atol=1e-5, rtol=1e-4, msg=name)


def test_noisy_top_k_adds_no_noise_in_eval():
    layer = make_layer(use_noisy_top_k=True, eval_capacity=0.0).eval()
    x = skewed_input(layer=layer)
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    fast, ref = run_both(layer, x, train=False)  # the reference without noise
    torch.testing.assert_close(fast['y'], ref['y'], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('N,E,k,cf,min_cap,expected', [
    (24, 4, 2, 1.25, 4, 16),   # floor(15) -> 15 -> even 16
    (24, 4, 2, 0.5, 4, 6),     # floor(6) = 6
    (24, 4, 2, 0.5, 8, 8),     # min_capacity wins
    (30, 4, 1, 1.0, 1, 8),     # floor(7.5) = 7 -> even 8
    (90, 2, 2, 0.7, 4, 64),    # floor(63) = 63 -> even 64; the float product is 62.99999999999999
    (10, 2, 2, 4.0, 4, 10),    # 40 slots asked, but an expert sees each of 10 tokens at most once
    (24, 4, 2, 0.0, 4, 24),    # dropless: room for every token
    (24, 4, 2, -1.0, 4, 24),
])
def test_capacity_is_switch_eq3_rounded_up_to_even_between_min_capacity_and_n_tokens(N, E, k, cf, min_cap, expected):
    layer = make_layer(n_exp=E, top_k=k, train_capacity=cf, min_capacity=min_cap)
    assert layer.capacity(N) == expected


def six_tokens_that_prefer_expert_0_then_1(layer):
    """ routes every token to expert 0 first and expert 1 second; returns the tokens (1, 6, C) """
    with torch.no_grad():
        layer.router.w_g.weight.zero_()
        layer.router.w_g.weight[0, 0] = 2.0
        layer.router.w_g.weight[1, 0] = 1.0
    x = torch.zeros(1, 6, 16)
    x[0, :, 0] = 1.0
    x[0, :, 1:] = torch.randn(6, 15, generator=torch.Generator().manual_seed(0))
    return x


def test_capacity_drops_second_choices_first(expert_path):
    # 2 slots per expert; tokens alternate between experts 0 then 1 (logits 3, 1) and 1 then 0 (logits 1, 3).
    # First choices fill first, in token order: tokens 0 and 2 take expert 0's slots, 1 and 3 expert 1's,
    # every second choice is dropped and tokens 4 and 5 keep nothing. Filling token by token would keep
    # both choices of tokens 0 and 1 instead, and filling from the last token the first choices of 2 to 5
    layer = make_layer(n_exp=4, top_k=2, train_capacity=0.25, min_capacity=2)  # cap = max(floor(0.75), 2) = 2
    with torch.no_grad():
        layer.router.w_g.weight.zero_()
        layer.router.w_g.weight[:2, :2] = torch.tensor([[2.0, 1.0], [2.0, -1.0]])
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0))
    x[0, :, 0] = 1.0
    x[0, :, 1] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    MANAGER.reset()
    y = layer.train()(x)[0]  # (6, C)
    tokens_per_expert, dropped = MANAGER.routing[0]
    assert tokens_per_expert.tolist() == [6, 6, 0, 0]
    assert dropped.item() == pytest.approx(8 / 12)
    experts, gate = layer.experts, math.exp(3) / (math.exp(3) + math.exp(1))  # softmax of (3, 1)
    for t, e in enumerate([0, 1, 0, 1]):
        h = F.gelu(x[0, t] @ experts.c_fc[e] + experts.fc_bias[e, 0])
        out = h @ experts.c_proj[e] + experts.proj_bias[e, 0]
        torch.testing.assert_close(y[t], gate * out, atol=1e-6, rtol=1e-5)
    assert torch.all(y[4:] == 0)  # the residual alone carries them


def test_an_expert_that_overflows_reaches_only_the_tokens_it_keeps(expert_path):
    # 2 slots per expert, as in test_capacity_drops_second_choices_first. Experts 0 and 2
    # overflow on any token (finite weights of about 1e36, whose products pass the float32
    # maximum), as an expert can in float16. Tokens 2..5 were dropped by expert 0, and expert 2
    # has no tokens, only empty rows: neither may reach them.
    layer = make_layer(n_exp=4, top_k=2, train_capacity=0.25, min_capacity=2)
    x = six_tokens_that_prefer_expert_0_then_1(layer)
    with torch.no_grad():
        for e in (0, 2):
            layer.experts.c_fc[e].normal_(0, 1e36)
            layer.experts.c_proj[e].normal_(0, 1e36)
    MANAGER.reset()
    y = layer(x)
    assert MANAGER.routing[0][0].tolist() == [6, 6, 0, 0]
    assert not torch.isfinite(y[0, :2]).all()  # tokens 0 and 1 are kept by expert 0
    assert torch.all(y[0, 2:] == 0)


def test_uniform_router_has_aux_loss_one_and_z_loss_log_e_squared():
    layer = make_layer(n_exp=4, top_k=2)
    with torch.no_grad():
        layer.router.w_g.weight.zero_()  # uniform router: P_e = 1/E whatever f is
    MANAGER.reset()
    layer(torch.randn(2, 8, 16))
    assert MANAGER.aux_loss[0].item() == pytest.approx(1.0, abs=1e-6)
    assert MANAGER.router_z_loss[0].item() == pytest.approx(math.log(4) ** 2, abs=1e-5)


def test_aux_loss_grows_with_imbalance():
    layer = make_layer(n_exp=4, top_k=1)
    x = skewed_input(layer=layer)
    with torch.no_grad():
        layer.router.w_g.weight[0] *= 10  # nearly all tokens to expert 0
    MANAGER.reset()
    layer(x)
    assert MANAGER.aux_loss[0].item() > 1.5  # 1 when balanced, at most E = 4


def test_router_full_prec_keeps_its_logits_float32_under_autocast():
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    ref_layer = make_layer(router_use_full_prec=False)
    MANAGER.reset()
    ref_layer(x)
    z_fp32 = MANAGER.router_z_loss[0].detach()
    for full_prec in (True, False):
        layer = make_layer(router_use_full_prec=full_prec)
        MANAGER.reset()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            layer(x)
            gates, _, _ = layer.router(x.view(-1, 16))
        z = MANAGER.router_z_loss[0].detach()
        # the softmax and logsumexp run in float32 either way (CPU autocast would leave them in bf16)
        assert gates.dtype == z.dtype == torch.float32
        if full_prec:
            torch.testing.assert_close(z, z_fp32, atol=1e-6, rtol=1e-6)
        else:
            assert (z - z_fp32).abs() > 1e-4  # of bf16 router logits: the switch matters


@pytest.mark.parametrize('n_embd', [16, 36])  # 36 bf16 values are no multiple of 16 bytes
def test_layer_under_autocast_runs_in_bf16_on_both_paths(expert_path, n_embd):
    layer = make_layer(train_capacity=1.25, n_embd=n_embd)
    x = skewed_input(layer=layer)
    with torch.no_grad():
        y32 = layer(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)


def test_grouped_path_compiles_to_one_graph_and_matches_eager(monkeypatch):
    """ On Hopper the compiled model runs the grouped matmul. With no GPU in CI, trace that path on
    CPU: bf16 (torch._grouped_mm's shape checks under tracing accept only bf16), aot_eager. """
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(model, 'use_grouped_mm', lambda *args: True)
    layer = make_layer(train_capacity=1.25).to(torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    explanation = torch._dynamo.explain(layer)(skewed_input(layer=layer).bfloat16())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    for seed in range(3):  # new routings, same shapes: no recompile
        x = skewed_input(seed=seed, layer=layer).bfloat16()
        results = []
        for run in (layer, compiled):
            xs = x.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            MANAGER.reset()
            y = run(xs)
            y.float().square().sum().backward()
            results.append([y, xs.grad, layer.experts.c_fc.grad, layer.router.w_g.weight.grad])
        for eager, traced in zip(*results):
            torch.testing.assert_close(traced, eager)
    assert counters['stats']['unique_graphs'] == 1


def test_top1_router_learns_from_the_task_loss():
    """ Switch eq. (2): with one expert the gate is p_i(x), not a softmax over one logit (always 1),
    so the router gets a gradient from the output alone, with no aux or z loss """
    layer = make_layer(top_k=1, train_capacity=0.0, use_aux_loss=False, use_router_z_loss=False)
    y = layer(skewed_input(layer=layer))
    y.square().sum().backward()
    assert layer.router.w_g.weight.grad.abs().sum() > 0


def grouped_mm_runs(dtype, C, H):
    """ whether torch._grouped_mm takes the experts' two matmuls, (R, C) x (E, C, H) and (R, H) x (E, H, C) """
    offs = torch.tensor([3, 6], dtype=torch.int32)
    try:
        torch._grouped_mm(torch.ones(6, C, dtype=dtype), torch.ones(2, C, H, dtype=dtype), offs=offs)
        torch._grouped_mm(torch.ones(6, H, dtype=dtype), torch.ones(2, H, C, dtype=dtype), offs=offs)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize('dtype,C,H', [(torch.float32, 32, 128), (torch.float32, 30, 120), (torch.float32, 32, 30),
                                       (torch.bfloat16, 36, 144), (torch.bfloat16, 40, 160)])
def test_grouped_matmul_on_cpu_exactly_where_torchs_kernel_takes_the_shapes(dtype, C, H):
    assert model.use_grouped_mm(torch.device('cpu'), dtype, False, (C, H)) is grouped_mm_runs(dtype, C, H)
    assert not model.use_grouped_mm(torch.device('cpu'), dtype, True, (C, H))  # tracing takes bf16 on CUDA only


@pytest.mark.parametrize('major,dtype,expected', [(9, torch.bfloat16, True), (10, torch.bfloat16, True),
                                                  (8, torch.bfloat16, False), (9, torch.float32, False)])
def test_grouped_matmul_on_cuda_only_for_bf16_on_sm90_and_sm100(monkeypatch, major, dtype, expected):
    # torch's bf16 grouped GEMM runs on sm90 and sm100 (Hopper, Blackwell); other GPUs loop over matmuls
    from types import SimpleNamespace
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device: SimpleNamespace(major=major, minor=0))
    assert model.use_grouped_mm(torch.device('cuda'), dtype, False, (384, 1536)) is expected
