"""
Beyond the earlier nanoMoE: sparse upcycling, aux-loss-free balancing, shared and fine-grained experts.
"""
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, MOELayer
from manager import MANAGER


def dense_gpt(**kw):
    args = dict(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


DROPLESS = dict(n_exp=4, top_k=2, train_capacity=0.0, eval_capacity=0.0)


def test_upcycled_gpt2_from_local_dir_has_the_dense_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=32, vocab_size=64))
    with torch.no_grad():  # GPT-2's init zeroes the biases: random ones, so that each must be copied
        for name, p in hf.named_parameters():
            if name.endswith('.bias'):
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    dense = GPT.from_pretrained(str(tmp_path)).eval()
    moe = GPT.from_pretrained(str(tmp_path), dict(dropout=0.0)).upcycle(**DROPLESS).eval()
    assert [type(b.mlp).__name__ for b in moe.transformer.h] == ['MOELayer', 'MLP', 'MOELayer']
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(idx, idx)[0], dense(idx, idx)[0], atol=1e-5, rtol=1e-5)
    experts = moe.transformer.h[0].mlp.experts
    torch.testing.assert_close(experts.c_fc[3], dense.transformer.h[0].mlp.c_fc.weight.t(), atol=0, rtol=0)
    assert moe.transformer.h[0].mlp.router.w_g.weight.std() > 0.01  # a fresh router, not a copy


@pytest.mark.parametrize('top_k', [2, 4])
def test_upcycled_model_with_top_k_above_1_has_the_dense_loss(top_k):
    dense = dense_gpt(bias=False)
    moe = dense.upcycle(**{**DROPLESS, 'top_k': top_k, 'use_aux_loss': False})
    idx = torch.randint(0, 64, (2, 32))
    torch.testing.assert_close(moe(idx, idx)[1], dense(idx, idx)[1], atol=1e-5, rtol=1e-5)


def test_upcycled_top1_scales_the_mlp_by_its_gate():
    """ top-1's gate is p_i(x) < 1 (Switch eq. 2): an upcycled MoE block starts out as its MLP's
    output scaled, token by token, by the router's probability of the chosen expert """
    dense = dense_gpt(bias=False)
    moe = dense.upcycle(**{**DROPLESS, 'top_k': 1, 'use_aux_loss': False})
    x = torch.randn(2, 32, 32)
    layer = moe.transformer.h[0].mlp
    probs = F.softmax(layer.router.w_g(x), dim=-1).max(dim=-1, keepdim=True).values  # (2, 32, 1)
    torch.testing.assert_close(layer(x), probs * dense.transformer.h[0].mlp(x), atol=1e-6, rtol=1e-5)


def test_upcycling_refuses_experts_that_cannot_be_copies():
    with pytest.raises(ValueError, match='leave expert_hidden=0 and n_shared_exp=0'):
        dense_gpt().upcycle(n_exp=4, expert_hidden=64)


def moe_layer(**kw):
    args = dict(n_embd=32, n_head=2, n_exp=4, top_k=2)
    args.update(kw)
    torch.manual_seed(0)
    layer = MOELayer(GPTConfig(**args), layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    return layer


def test_bias_update_moves_toward_balance():
    layer = moe_layer(use_aux_free_bias=True, bias_update_speed=0.01)
    layer.router.update_bias(torch.tensor([10, 2, 2, 2]))
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    layer.router.update_bias(torch.tensor([4, 4, 4, 4]))  # balanced: no change
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_model_moves_each_routing_bias_by_the_load_of_the_steps_training_forwards():
    """ DeepSeek-V3's load is that of one optimizer step: every micro-batch's training forward, no eval """
    model = dense_gpt(n_exp=4, top_k=2, use_aux_free_bias=True, bias_update_speed=0.01, train_capacity=0.0)
    expected = {0: 0, 2: 0}
    for batch in (2, 3):  # two micro-batches
        with torch.no_grad():
            model(torch.randint(0, 64, (batch, 8)))
        expected = {layer: expected[layer] + MANAGER.routing[layer][0] for layer in expected}
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 8)))
    for layer, load in expected.items():
        router = model.transformer.h[layer].mlp.router
        assert torch.equal(router.step_load, load) and load.sum() == 2 * (16 + 24)
    model.update_routing_bias()
    for layer, load in expected.items():
        router = model.transformer.h[layer].mlp.router
        load = load.float()
        torch.testing.assert_close(router.expert_bias, 0.01 * torch.sign(load.mean() - load))
        assert router.step_load.sum() == 0  # the next step counts from zero
    assert not any('step_load' in k for k in model.state_dict())  # the checkpoint holds the biases only


def test_bias_balances_a_skewed_router():
    layer = moe_layer(use_aux_free_bias=True, bias_update_speed=0.02, train_capacity=0.0)
    x = torch.randn(4, 32, 32)
    x[..., 0] = 1.0
    with torch.no_grad():
        layer.router.w_g.weight[:, 0] = torch.tensor([1.5, 0.0, 0.0, 0.0])  # +1.5 on every token's logit of expert 0
    shares = []
    for _ in range(100):  # the router's weights stay put: only the bias balances
        with torch.no_grad():
            layer(x)
        tokens, _ = MANAGER.routing[0]
        shares.append(tokens.max().item() / tokens.sum().item())
        layer.router.update_bias(tokens)
    assert shares[0] > 0.45 and shares[-1] < 0.3  # at most 0.5 with top-2; balanced is 0.25
    assert layer.router.expert_bias[0] < 0 and layer.router.expert_bias[0] == layer.router.expert_bias.min()


def test_bias_picks_experts_but_gates_come_from_unbiased_logits():
    layer = moe_layer(use_aux_free_bias=True, train_capacity=0.0)
    layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    x = torch.randn(20, 32)
    gates, topk_idx, _ = layer.router(x)
    assert (topk_idx == 3).any(dim=-1).all()  # everyone picks expert 3
    logits = x @ layer.router.w_g.weight.t()
    torch.testing.assert_close(gates, F.softmax(logits.gather(-1, topk_idx), dim=-1))


def test_aux_free_bias_is_a_checkpointed_buffer_not_a_parameter():
    model = dense_gpt(n_exp=4, use_aux_free_bias=True)
    assert 'transformer.h.0.mlp.router.expert_bias' in model.state_dict()
    assert all('expert_bias' not in n for n, _ in model.named_parameters())


def test_shared_experts_add_exactly_their_term():
    layer = moe_layer(n_shared_exp=2).eval()
    x = torch.randn(2, 8, 32)
    shared = layer.shared_experts
    assert shared.c_fc.weight.shape == (2 * 128, 32)  # two experts of the routed width
    with torch.no_grad():
        y = layer(x)
        layer.shared_experts = None
        routed = layer(x)
        torch.testing.assert_close(y - routed, shared(x), atol=1e-6, rtol=1e-5)


def test_fine_grained_experts_shapes_and_active_params():
    fine = dense_gpt(n_exp=16, top_k=4, expert_hidden=64)
    experts = fine.transformer.h[0].mlp.experts
    assert experts.c_fc.shape == (16, 32, 64) and experts.c_proj.shape == (16, 64, 32)
    assert experts.fc_bias.shape == (16, 1, 64) and experts.proj_bias.shape == (16, 1, 32)
    coarse = dense_gpt(n_exp=8, top_k=2)
    # 16 experts of half width, top-4 = 8 of full width, top-2, in active matmul weights; per MoE
    # layer (blocks 0 and 2) only the active biases and the wider router differ
    biases = 4 * (64 + 32) - 2 * (128 + 32)
    router = (16 - 8) * 32
    assert fine.get_num_params(active=True) - coarse.get_num_params(active=True) == 2 * (biases + router)
    idx = torch.randint(0, 64, (2, 16))
    _, loss = fine(idx, idx)
    loss.backward()
    assert experts.c_fc.grad.abs().sum() > 0
