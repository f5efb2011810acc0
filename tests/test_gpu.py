"""
The MoE layer and model on a CUDA GPU; every test here skips without one (CI has none).
The CPU layer is checked against the per-token reference in test_moe_layer.py; here the CUDA
layer is checked against the CPU layer in float32, then the bf16 paths against each other:
grouped matmul (Hopper) vs padded batched matmul, and torch.compile vs eager.
"""
import pytest
import torch

import model
from model import GPTConfig, GPT, MOELayer
from manager import MANAGER
from optim import configure_optimizers
from test_moe_layer import CASES, make_layer, skewed_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10),
                            reason="the grouped matmul kernel needs a Hopper or Blackwell GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    """ no TF32: the float32 comparisons below are to float32 rounding """
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def fwd_bwd(layer, x, autocast=False, compiled=False):
    """ output, aux, z, dropped share, input and weight gradients of one forward and backward """
    layer.zero_grad(set_to_none=True)
    MANAGER.reset()
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        y = (torch.compile(layer) if compiled else layer)(x)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    y.backward(grad)
    # copies: moving the layer to another device later moves its .grad tensors too
    return dict(y=y.detach().float(), aux=MANAGER.aux_loss[0].detach(), z=MANAGER.router_z_loss[0].detach(),
                dropped=MANAGER.routing[0][1].item(), dx=x.grad.float().clone(),
                **{n: p.grad.float().clone() for n, p in layer.named_parameters()})


def relative_error(a, b):
    """ |a - b| / |b| over the whole tensor; NaN anywhere fails every comparison """
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize('case', list(CASES))
def test_cuda_float32_matches_cpu(case):
    layer = make_layer(**CASES[case])
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.tensor([-1.0, 0.5, 0.0, 1.5]))
    x = skewed_input(layer=layer)
    cpu = fwd_bwd(layer, x)
    gpu = fwd_bwd(layer.cuda(), x.cuda())
    assert gpu['dropped'] == pytest.approx(cpu['dropped'], abs=1e-6)
    for name in cpu:
        if name != 'dropped':  # float32 rounding, summed in another order
            assert relative_error(gpu[name].cpu(), cpu[name]) < 1e-5, name


def big_layer(**kw):
    """ a layer of the size train_nano_moe.py uses, bf16 autocast, float32 router """
    config = GPTConfig(n_embd=384, n_head=6, n_exp=8, top_k=2, bias=True, use_aux_loss=True,
                       use_router_z_loss=True, router_use_full_prec=True, **kw)
    torch.manual_seed(0)
    layer = MOELayer(config, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():  # GPT's init leaves them to GPT
            p.normal_(0, 0.02)
    return layer.cuda()


@hopper
def test_bf16_grouped_mm_matches_padded_bmm(monkeypatch):
    layer = big_layer(train_capacity=1.0)
    x = torch.randn(4, 1024, 384, device='cuda')
    assert model.use_grouped_mm(x.device, torch.bfloat16, False, (384, 4 * 384))
    grouped = fwd_bwd(layer, x, autocast=True)
    monkeypatch.setattr(model, 'use_grouped_mm', lambda *args: False)
    padded = fwd_bwd(layer, x, autocast=True)
    assert grouped['dropped'] == padded['dropped'] > 0  # the float32 router decides alike
    for name in grouped:
        if name != 'dropped':
            assert relative_error(grouped[name], padded[name]) < 1e-2, name


def test_bf16_compiled_layer_matches_eager_without_graph_breaks():
    import torch._dynamo
    torch._dynamo.reset()
    layer = big_layer()
    x = torch.randn(4, 1024, 384, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    eager = fwd_bwd(layer, x, autocast=True)
    compiled = fwd_bwd(layer, x, autocast=True, compiled=True)
    assert compiled['dropped'] == eager['dropped']
    for name in eager:
        if name != 'dropped':
            assert relative_error(compiled[name], eager[name]) < 1e-2, name


@pytest.mark.parametrize('optimizer_name', ['adamw', 'muon'])
def test_compiled_bf16_model_trains_without_recompiles(optimizer_name):
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    config = GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=128, n_exp=8, top_k=2,
                       use_aux_loss=True, use_router_z_loss=True, router_use_full_prec=True)
    torch.manual_seed(0)
    gpt = GPT(config).cuda()
    compiled = torch.compile(gpt)
    optimizer = configure_optimizers(gpt, optimizer_name, 0.1, 1e-3, (0.9, 0.95), 'cuda')
    losses = []
    idx = torch.randint(512, (8, 257), device='cuda')  # one batch, learned by heart
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    for step in range(30):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    gpt.eval()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        compiled(x, y)
    assert counters['stats']['unique_graphs'] == 2  # train and eval, compiled once each
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert losses[-1] < losses[0] - 1.0, losses
