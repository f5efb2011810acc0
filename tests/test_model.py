"""
The whole GPT: GPT-2 import, MoE placement, the earlier nanoMoE checkpoint layout, losses,
MANAGER bookkeeping, init, generate, torch.compile.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, MLP, MOELayer, DENSE_KEYS, RUN_SETTINGS
from manager import MANAGER
from optim import configure_optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
    args = dict(block_size=32, vocab_size=64, n_layer=4, n_head=2, n_embd=32, n_exp=4, top_k=2,
                use_aux_loss=True, use_router_z_loss=True)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def batch(B=3, T=16, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def test_dense_matches_huggingface_gpt2_from_local_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # exact GELU, as nanoGPT's MLP; GPT-2's checkpoints use the tanh approximation (gelu_new)
    hf_config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=48, vocab_size=97,
                           activation_function='gelu', resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.block_size == 48 and model.config.vocab_size == 97 and model.config.n_exp == 1
    idx, targets = batch(B=2, T=20, vocab=97)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        hf_out = hf(idx, labels=idx)
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(hf_out.logits.view(-1, 97), targets.view(-1)))


def test_from_pretrained_overrides_dropout_in_every_dropout_module(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf_config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50)
    GPT2LMHeadModel(hf_config).save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path), dict(dropout=0.1))
    # the embeddings' dropout, and each block's residual dropouts after attention and after the MLP
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.1] * (1 + 2 * 2)
    assert [block.attn.attn_dropout for block in model.transformer.h] == [0.1, 0.1]


@pytest.mark.parametrize('n_layer,n_exp,stride,moe_blocks', [
    (5, 4, 2, [0, 2, 4]),
    (4, 4, 1, [0, 1, 2, 3]),
    (6, 4, 3, [0, 3]),
    (4, 1, 2, []),
])
def test_moe_placement_by_stride(n_layer, n_exp, stride, moe_blocks):
    model = tiny(n_layer=n_layer, n_exp=n_exp, stride=stride)
    placed = [i for i, b in enumerate(model.transformer.h) if isinstance(b.mlp, MOELayer)]
    assert placed == moe_blocks
    assert all(isinstance(b.mlp, MLP) for i, b in enumerate(model.transformer.h) if i not in moe_blocks)


def earlier_nanomoe_state_dict(n_layer, C, E, vocab, block_size, noisy):
    """ the parameter names and shapes of the earlier nanoMoE, written out by hand """
    H = 4 * C
    sd = {'transformer.wte.weight': (vocab, C), 'transformer.wpe.weight': (block_size, C),
          'transformer.ln_f.weight': (C,), 'transformer.ln_f.bias': (C,), 'lm_head.weight': (vocab, C)}
    for i in range(n_layer):
        p = f'transformer.h.{i}.'
        sd.update({p + 'ln_1.weight': (C,), p + 'ln_1.bias': (C,), p + 'ln_2.weight': (C,), p + 'ln_2.bias': (C,),
                   p + 'attn.c_attn.weight': (3 * C, C), p + 'attn.c_attn.bias': (3 * C,),
                   p + 'attn.c_proj.weight': (C, C), p + 'attn.c_proj.bias': (C,)})
        if i % 2 == 0:
            sd.update({p + 'mlp.router.w_g.weight': (E, C), p + 'mlp.experts.c_fc': (E, C, H),
                       p + 'mlp.experts.c_proj': (E, H, C), p + 'mlp.experts.fc_bias': (E, 1, H),
                       p + 'mlp.experts.proj_bias': (E, 1, C)})
            if noisy:
                sd[p + 'mlp.router.w_noise.weight'] = (E, C)
        else:
            sd.update({p + 'mlp.c_fc.weight': (H, C), p + 'mlp.c_fc.bias': (H,),
                       p + 'mlp.c_proj.weight': (C, H), p + 'mlp.c_proj.bias': (C,)})
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in sd.items()}
    sd['lm_head.weight'] = sd['transformer.wte.weight']  # tied
    return sd


@pytest.mark.parametrize('noisy', [False, True])
def test_earlier_nanomoe_checkpoint_loads_unchanged(noisy):
    model = tiny(n_layer=4, n_exp=4, use_noisy_top_k=noisy)
    sd = earlier_nanomoe_state_dict(4, 32, 4, 64, 32, noisy)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], atol=0, rtol=0)
    logits, loss = model(*batch())
    assert torch.isfinite(loss)


def switch_aux_and_z_loss(logits, k):
    """ one MoE layer's balancing losses from its router logits (N, E): Switch eq. (4)-(6) over the k*N
    assignments, E * sum_e f_e * P_e, and the ST-MoE z-loss, eq. (5), the mean squared logsumexp """
    N, E = logits.shape
    chosen = logits.topk(k, dim=-1).indices  # (N, k)
    f = torch.stack([(chosen == e).sum() for e in range(E)]).float() / (N * k)  # (E,)
    P = F.softmax(logits, dim=-1).mean(dim=0)  # (E,)
    return E * (f * P).sum(), torch.logsumexp(logits, dim=-1).square().mean()


@pytest.mark.parametrize('kw,aux_weight,z_weight', [
    (dict(aux_loss_weight=0.5, router_z_loss_weight=0.25), 0.5, 0.25),
    (dict(use_aux_loss=False), 0.0, 0.001),  # no aux loss; the z-loss at its default weight
], ids=['aux_and_z', 'z_only'])
def test_train_loss_adds_the_enabled_router_losses_with_their_weights(kw, aux_weight, z_weight):
    model = tiny(**kw).train()
    router_logits = []  # each MoE block's router logits, recorded as its w_g computes them
    for block in model.transformer.h:
        if isinstance(block.mlp, MOELayer):
            block.mlp.router.w_g.register_forward_hook(lambda module, args, out: router_logits.append(out))
    idx, targets = batch()
    logits, loss = model(idx, targets)
    assert len(router_logits) == 2  # blocks 0 and 2
    expected = F.cross_entropy(logits.view(-1, 64), targets.view(-1))
    for layer_logits in router_logits:
        aux, z = switch_aux_and_z_loss(layer_logits, k=2)
        expected = expected + aux_weight * aux + z_weight * z
    torch.testing.assert_close(loss, expected)


def test_eval_loss_is_cross_entropy_alone():
    model = tiny(aux_loss_weight=0.5, router_z_loss_weight=0.25)
    idx, targets = batch()
    model.train()
    model(idx, targets)  # a training forward first, which collects router losses
    model.eval()
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 64), targets.view(-1)))


def test_manager_is_reset_every_forward():
    model = tiny()
    idx, targets = batch()
    for mode in ('train', 'train', 'eval'):
        getattr(model, mode)()
        model(idx, targets)
        assert len(MANAGER.aux_loss) == 2 and len(MANAGER.router_z_loss) == 2
        assert sorted(MANAGER.routing) == [0, 2]
        tokens_per_expert, dropped = MANAGER.routing[0]
        assert not tokens_per_expert.requires_grad and tokens_per_expert.sum().item() == 3 * 16 * 2
        assert 0.0 <= dropped.item() < 1.0
    dense = tiny(n_exp=1)
    dense(idx, targets)
    assert MANAGER.aux_loss == [] and MANAGER.routing == {}


@pytest.mark.parametrize('top_k', [1, 2])
def test_moe_model_learns_a_batch_by_heart_and_the_task_loss_alone_trains_its_router(top_k):
    # no aux or z-loss and no weight decay: only the gates' gradient can move the router
    model = tiny(dropout=0.0, top_k=top_k, use_aux_loss=False, use_router_z_loss=False)
    router = model.transformer.h[0].mlp.router.w_g.weight
    initial = router.detach().clone()
    opt = configure_optimizers(model, 'adamw', 0.0, 3e-3, (0.9, 0.95), 'cpu')
    idx, targets = batch(B=4, T=16)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert (router - initial).abs().max() > 1e-3  # AdamW moves a weight with any gradient by about lr a step


def test_switch_init_as_the_earlier_nanomoe():
    """ Switch §2.2 on every Linear, lm_head (tied to wte) included; the residual projections then get
    GPT-2's 0.02 / sqrt(2 * n_layer), as the earlier nanoMoE does """
    model = tiny(n_embd=64, n_exp=8, use_switch_tfm_init=True, switch_tfm_init_scale=0.1)
    experts = model.transformer.h[0].mlp.experts
    for w, fan_in in [(experts.c_fc, 64), (model.transformer.h[1].mlp.c_fc.weight, 64), (model.lm_head.weight, 64),
                      (model.transformer.h[0].attn.c_attn.weight, 64), (model.transformer.h[0].mlp.router.w_g.weight, 64)]:
        std = math.sqrt(0.1 / fan_in)
        assert w.abs().max().item() <= 2 * std + 1e-7
        # a normal cut at 2 std has std 0.880 of the uncut one
        assert w.std().item() == pytest.approx(0.880 * std, rel=0.1)
    assert model.transformer.wte.weight is model.lm_head.weight
    residual = 0.02 / math.sqrt(2 * model.config.n_layer)
    for w in (experts.c_proj, model.transformer.h[1].mlp.c_proj.weight, model.transformer.h[0].attn.c_proj.weight):
        assert w.std().item() == pytest.approx(residual, rel=0.1)
    assert experts.fc_bias.abs().sum() == 0


def test_gpt2_init_scales_residual_projections_including_experts():
    model = tiny(n_layer=8, n_embd=64, n_exp=8)
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.transformer.h[0].mlp.experts.c_proj.std().item() == pytest.approx(expected, rel=0.05)
    assert model.transformer.h[1].mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.transformer.h[0].mlp.experts.c_fc.std().item() == pytest.approx(0.02, rel=0.05)


def params_by_hand(experts):
    """ tiny(n_layer=2)'s parameters, wpe left out, counted from the shapes with `experts` of each MoE layer's 4:
    wte (tied to lm_head), two blocks of LayerNorms and attention, block 0 MoE (router, experts), block 1 a
    dense MLP, ln_f """
    V, C, H, E = 64, 32, 128, 4
    attention = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C)  # ln_1, ln_2, c_attn, c_proj
    mlp = (C * H + H) + (H * C + C)
    return V * C + 2 * attention + E * C + experts * mlp + mlp + 2 * C


@pytest.mark.parametrize('top_k', [1, 2])
def test_active_params_count_top_k_of_n_exp_experts(top_k):
    model = tiny(n_layer=2, top_k=top_k)
    assert model.get_num_params() == params_by_hand(experts=4)
    assert model.get_num_params(active=True) == params_by_hand(experts=top_k)
    assert model.get_num_params(non_embedding=False) == params_by_hand(experts=4) + 32 * 32  # wpe
    dense = tiny(n_layer=2, n_exp=1)
    assert dense.get_num_params(active=True) == dense.get_num_params() == params_by_hand(experts=1) - 4 * 32


def test_mfu_counts_6_flops_per_active_parameter_and_the_attention_per_token():
    # PaLM appendix B: 6 N + 12 L nh hs T FLOPs per token for a forward and backward, N the active
    # parameters; here 4 sequences of T = 32 tokens a step, 0.5 s a step, a 1 GFLOP/s device
    model = tiny(n_layer=2, top_k=1)
    flops_per_token = 6 * params_by_hand(experts=1) + 12 * 2 * 2 * 16 * 32
    assert flops_per_token == 190464
    assert model.estimate_mfu(4, 0.5, 1e9) == pytest.approx(190464 * 4 * 32 / 0.5 / 1e9, rel=1e-12)


def argmax_loop(model, idx, max_new_tokens):
    """ nanoGPT's generate, greedy: the whole context, cropped to block_size, through model(idx) for every token """
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def recording_forward_widths(monkeypatch):
    """ the number of tokens of every GPT forward from now on """
    widths, forward = [], GPT.forward
    monkeypatch.setattr(GPT, 'forward', lambda self, idx, *args, **kw: widths.append(idx.size(1)) or forward(self, idx, *args, **kw))
    return widths


def sampling_loop(model, idx, max_new_tokens, temperature, top_k):
    """ nanoGPT's sampling: the whole context, cropped to block_size, through model(idx) for every token, the
    last logits divided by temperature, the tokens below the top_k largest dropped, one draw from the rest """
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])
            logits = logits[:, -1] / temperature  # (B, V)
            kth_largest = logits.sort(dim=-1, descending=True).values[:, min(top_k, logits.size(-1)) - 1]  # (B,)
            logits = torch.where(logits >= kth_largest.unsqueeze(1), logits, float('-inf'))
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)], dim=1)
    return idx


@pytest.mark.parametrize('temperature,top_k', [(0.8, 200), (1.5, 3)], ids=['sample_py_defaults', 'top_3'])
def test_generate_samples_as_nanogpts_loop_with_temperature_and_top_k(temperature, top_k):
    model = tiny(block_size=16, eval_capacity=0).eval()  # dropless, as generate routes
    with torch.no_grad():  # logits 10x the init's, of std ~1, which temperature reshapes
        model.transformer.ln_f.weight.mul_(10)
    idx = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = model.generate(idx, max_new_tokens=30, temperature=temperature, top_k=top_k)
    torch.manual_seed(1)  # the same draws: one torch.multinomial per token in both
    assert torch.equal(out, sampling_loop(model, idx, 30, temperature, top_k))
    assert len(set(out[:, 5:].flatten().tolist())) > 3  # sampled, not the argmax of a few tokens


@pytest.mark.parametrize('n_exp', [1, 4])
def test_greedy_generate_runs_one_token_at_a_time_and_matches_dropless_argmax_loop(monkeypatch, n_exp):
    # eval_capacity 0.5 drops assignments in model(idx); generate routes dropless, as the reference does
    model = tiny(block_size=16, n_exp=n_exp, eval_capacity=0.5).eval()
    with torch.no_grad():  # experts 10x the init, so that what routing keeps changes the argmax
        for name, p in model.named_parameters():
            p.mul_(10 if '.experts.' in name else 1)
    reference = tiny(block_size=16, n_exp=n_exp, eval_capacity=0).eval()
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    widths = recording_forward_widths(monkeypatch)
    out = model.generate(idx, max_new_tokens=30, top_k=1)  # 35 tokens: 19 past block_size
    # the prompt, one token at a time up to block_size, then nanoGPT's crop: a full window each token
    assert widths == [5] + [1] * 11 + [16] * 18
    assert torch.equal(out, argmax_loop(reference, idx, 30))
    if n_exp > 1:  # the capacity-limited loop drops and so differs: routing decides the tokens here
        assert not torch.equal(out, argmax_loop(model, idx, 30))


def test_generate_leaves_training_and_eval_losses_untouched():
    model = tiny(use_noisy_top_k=False, eval_capacity=1.0)
    idx, targets = batch()

    def losses():
        model.train()
        train_loss = model(idx, targets)[1]
        model.eval()
        return train_loss, model(idx, targets)[1]

    before = losses()
    model.generate(idx[:, :4], max_new_tokens=40)
    assert losses() == before


def test_crop_block_size_keeps_the_first_positions_and_the_logits():
    model = tiny(block_size=32).eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    first_positions = model.transformer.wpe.weight[:16].detach().clone()
    with torch.no_grad():
        logits = model(idx)[0]
        model.crop_block_size(16)
        assert model.config.block_size == 16
        assert torch.equal(model.transformer.wpe.weight, first_positions)
        assert torch.equal(model(idx)[0], logits)


@pytest.mark.parametrize('kw,message', [
    (dict(n_embd=30, n_head=4), 'n_embd=30 is not divisible by n_head=4'),
    (dict(n_exp=4, top_k=5), 'top_k=5 must be between 1 and n_exp=4'),
    (dict(n_exp=4, top_k=0), 'top_k=0 must be between 1 and n_exp=4'),
    (dict(n_exp=4, stride=0), 'stride=0 must be >= 1'),
    (dict(n_exp=0), 'n_exp=0 must be >= 1'),
])
def test_config_rejects_impossible_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kw)


def test_compiled_moe_model_has_no_graph_breaks_or_recompiles():
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny(use_noisy_top_k=True)
    idx, targets = batch()
    compiled = torch.compile(model, backend='aot_eager')
    from torch._dynamo.utils import counters
    counters.clear()
    model.eval()
    eager_logits, eager_loss = model(idx, targets)
    logits, loss = compiled(idx, targets)
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    model.train()
    for seed in range(3):  # new data, same shapes: no recompiles
        _, loss = compiled(*batch(seed=seed))
        loss.backward()
    assert counters['stats']['unique_graphs'] == 2  # one graph for eval, one for train
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert len(MANAGER.aux_loss) == 2  # the side effects of the compiled forward reach MANAGER


def test_compiled_model_counts_the_routing_load_as_eager_and_moves_the_same_bias():
    """ the aux-loss-free bias's step_load is a buffer the compiled forward adds to in place """
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager, model = tiny(use_aux_free_bias=True, use_aux_loss=False), tiny(use_aux_free_bias=True, use_aux_loss=False)
    compiled = torch.compile(model, backend='aot_eager')
    for step in range(2):
        for seed in range(2):  # two micro-batches
            for m in (eager, compiled):
                m(*batch(seed=10 * step + seed))[1].backward()
        routers = [(a.mlp.router, b.mlp.router) for a, b in zip(eager.transformer.h, model.transformer.h)
                   if hasattr(a.mlp, 'router')]
        assert all(torch.equal(a.step_load, b.step_load) and b.step_load.sum() > 0 for a, b in routers)
        eager.update_routing_bias()
        model.update_routing_bias()
        assert all(torch.equal(a.expert_bias, b.expert_bias) and b.step_load.sum() == 0 for a, b in routers)
    assert not counters['graph_break'], dict(counters['graph_break'])


def test_compiled_generate_compiles_three_graphs_whatever_the_length():
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny(block_size=16, n_layer=2).eval()
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = [model.generate(idx, n, top_k=1) for n in (20, 40)]
    model.compile(backend='aot_eager')  # in place, as sample.py does
    assert all(torch.equal(model.generate(idx, n, top_k=1), e) for n, e in zip((20, 40), expected))
    # the prompt's forward, a one-token step and the window past block_size: the positions are a tensor
    assert counters['stats']['unique_graphs'] == 3
    assert not counters['graph_break'], dict(counters['graph_break'])


# a few names as torch.cuda.get_device_name reports them, with their datasheets' dense bf16 TFLOP/s
@pytest.mark.parametrize('name,peak', [('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                                       ('NVIDIA A100-SXM4-80GB', 312e12), ('Tesla T4', 0.0)])
def test_gpu_peak_flops_by_device_name_and_zero_for_an_unknown_gpu(monkeypatch, name, peak):
    import machine
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    assert machine.gpu_peak_flops('cuda') == peak


MOE_ONLY_VALUES = dict(top_k=1, use_aux_loss=True, use_router_z_loss=True, use_noisy_top_k=True, aux_loss_weight=0.5,
                       router_z_loss_weight=0.5, train_capacity=0.5, eval_capacity=0.5, min_capacity=1, stride=1,
                       router_use_full_prec=True,
                       expert_hidden=8, n_shared_exp=1, use_aux_free_bias=True, bias_update_speed=0.5)


def test_every_config_key_is_dense_or_read_by_moe_layers_only():
    # a new GPTConfig field must be placed: a dense key, or an MoE one (below) that a dense model ignores
    from dataclasses import fields
    assert {f.name for f in fields(GPTConfig)} == set(DENSE_KEYS) | set(MOE_ONLY_VALUES) | {'n_exp'}
    dense = tiny(n_exp=1, use_aux_loss=False, use_router_z_loss=False)
    for key, value in MOE_ONLY_VALUES.items():
        other = tiny(**{'n_exp': 1, 'use_aux_loss': False, 'use_router_z_loss': False, key: value}).train()
        assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), other.state_dict().values())), key
        torch.manual_seed(0)
        loss = other(*batch())[1]
        torch.manual_seed(0)
        assert torch.equal(loss, dense.train()(*batch())[1]), key


def test_run_settings_leave_the_weights_shapes_alone():
    # a checkpoint loads whatever run settings the resumed or evaluated model is given
    saved = tiny(use_aux_free_bias=True, use_noisy_top_k=True).state_dict()
    changed = dict(dropout=0.1, train_capacity=0.0, eval_capacity=0.0, min_capacity=1, use_aux_loss=False,
                   aux_loss_weight=1.0, use_router_z_loss=False, router_z_loss_weight=1.0, bias_update_speed=0.1,
                   router_use_full_prec=True)
    assert set(changed) == set(RUN_SETTINGS)
    tiny(use_aux_free_bias=True, use_noisy_top_k=True, **changed).load_state_dict(saved, strict=True)
