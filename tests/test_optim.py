"""
optim.py: which parameters each optimizer takes, and Muon's steps against torch.optim.Muon and AdamW's.
"""
import copy

import pytest
import torch

from model import GPT, GPTConfig
from optim import configure_optimizers

# odd sizes, wide and tall matrices, biases, a shared expert and the noisy router's second matrix
ARGS = dict(block_size=16, vocab_size=40, n_layer=2, n_head=3, n_embd=30, n_exp=4, top_k=2, expert_hidden=45,
            n_shared_exp=1, use_noisy_top_k=True, bias=True)


def model_and_optimizer(name='muon', lr=0.02, weight_decay=0.1):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARGS))
    return model, configure_optimizers(model, name, weight_decay, lr, (0.9, 0.95), 'cpu')


def random_grads(model, step, scale=1.0):
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


def test_optimizer_decays_weights_not_biases():
    model, opt = model_and_optimizer('adamw')
    decay, nodecay = ({id(p) for p in g['params']} for g in opt.param_groups)
    experts = model.transformer.h[0].mlp.experts
    assert id(experts.c_fc) in decay and id(experts.c_proj) in decay
    assert id(experts.fc_bias) in nodecay and id(experts.proj_bias) in nodecay
    assert id(model.transformer.ln_f.weight) in nodecay
    assert len(decay) + len(nodecay) == len(list(model.parameters()))


def test_muon_takes_the_hidden_matrices_and_adamw_embeddings_routers_gains_and_biases():
    model, opt = model_and_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    muon, decay, nodecay = ({names[id(p)] for p in g['params']} for g in opt.param_groups)
    assert [g['muon'] for g in opt.param_groups] == [True, False, False]
    block0, block1 = 'transformer.h.0.', 'transformer.h.1.'
    assert muon == {block0 + 'attn.c_attn.weight', block0 + 'attn.c_proj.weight', block1 + 'attn.c_attn.weight',
                    block1 + 'attn.c_proj.weight', block0 + 'mlp.experts.c_fc', block0 + 'mlp.experts.c_proj',
                    block0 + 'mlp.shared_experts.c_fc.weight', block0 + 'mlp.shared_experts.c_proj.weight',
                    block1 + 'mlp.c_fc.weight', block1 + 'mlp.c_proj.weight'}
    # wte is lm_head too (tied)
    assert decay == {'transformer.wte.weight', 'transformer.wpe.weight', block0 + 'mlp.router.w_g.weight',
                     block0 + 'mlp.router.w_noise.weight'}
    assert all(n.endswith('bias') or 'ln_' in n for n in nodecay) and len(nodecay) == 20
    assert model.lm_head.weight is model.transformer.wte.weight


def test_every_matrix_and_each_expert_steps_as_torch_muon_and_the_rest_as_adamw():
    """ three steps, the learning rate changed between them as the schedule does: each 2-D matrix moves as
    torch.optim.Muon moves it, each expert of a stack as torch.optim.Muon moves that expert's 2-D slice alone,
    and the rest as torch's fused AdamW, all bit for bit """
    model, opt = model_and_optimizer()
    muon_group, *adamw_groups = opt.param_groups
    references = []  # (the parameter, the reference optimizer's copies of its matrices)
    for p in muon_group['params']:
        copies = [m.detach().clone().requires_grad_() for m in (p if p.dim() == 3 else [p])]
        references.append((p, copies, torch.optim.Muon(copies, lr=0.02, weight_decay=0.1,
                                                        adjust_lr_fn='match_rms_adamw')))
    adamw_copies = [[p.detach().clone().requires_grad_() for p in g['params']] for g in adamw_groups]
    adamw = torch.optim.AdamW([{'params': c, 'weight_decay': g['weight_decay']}
                               for c, g in zip(adamw_copies, adamw_groups)], lr=0.02, betas=(0.9, 0.95), fused=True)
    for step, lr in enumerate([0.02, 0.01, 0.005]):
        random_grads(model, step)
        for group in opt.param_groups + adamw.param_groups + [g for *_, o in references for g in o.param_groups]:
            group['lr'] = lr
        for p, copies, _ in references:
            for c, g in zip(copies, p.grad if p.dim() == 3 else [p.grad]):
                c.grad = g.clone()
        for c, p in zip(sum(adamw_copies, []), sum((g['params'] for g in adamw_groups), [])):
            c.grad = p.grad.clone()
        opt.step()
        adamw.step()
        for *_, reference in references:
            reference.step()
    for p, copies, _ in references:
        assert torch.equal(p.detach(), torch.stack(copies) if p.dim() == 3 else copies[0])
    for c, p in zip(sum(adamw_copies, []), sum((g['params'] for g in adamw_groups), [])):
        assert torch.equal(p.detach(), c.detach())


def test_grad_scaler_unscales_before_orthogonalising_and_skips_an_inf_step():
    """ float16's GradScaler: gradients scaled by a growing power of two step as the plain ones (the momentum
    holds unscaled gradients), and a step with an inf gradient moves no weight and no momentum """
    model, opt = model_and_optimizer()
    plain, plain_opt = model_and_optimizer()
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8, growth_interval=1)
    for step in range(3):
        random_grads(plain, step)
        plain_opt.step()
        random_grads(model, step, scale=scaler.scale(torch.ones(())).item())  # what scaler.scale(loss) gives
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 11  # it grew every step
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    random_grads(model, 3, scale=scaler.scale(torch.ones(())).item())
    model.transformer.h[0].mlp.experts.c_fc.grad[1, 2, 3] = float('inf')
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # it halved
    for a, b in [(model.state_dict(), before[0]), (plain.state_dict(), before[0])]:
        assert all(torch.equal(a[k], b[k]) for k in a)
    state, saved = opt.state_dict()['state'], before[1]['state']
    assert all(torch.equal(v, saved[i][k]) for i, s in state.items() for k, v in s.items())


def test_a_loaded_state_steps_on_as_the_saved_optimizer():
    """ what ckpt.pt keeps: Muon's momentum and AdamW's moments, in one state_dict, loaded into a new optimizer
    that then steps as the saved one """
    model, opt = model_and_optimizer()
    for step in range(2):
        random_grads(model, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert {k for s in saved['state'].values() for k in s} == {'momentum_buffer', 'step', 'exp_avg', 'exp_avg_sq'}
    resumed, resumed_opt = model_and_optimizer()
    resumed.load_state_dict(model.state_dict())
    resumed_opt.load_state_dict(saved)
    for m, o in ((model, opt), (resumed, resumed_opt)):
        random_grads(m, 2)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert resumed_opt.adamw.state is resumed_opt.state  # AdamW steps on the loaded moments


@pytest.mark.parametrize('name', ['adamw', 'muon'])
def test_each_optimizer_trains_the_tiny_moe(name):
    model, opt = model_and_optimizer(name, lr=0.01)
    idx = torch.randint(0, 40, (4, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
