"""
A GPT language model with optional Mixture-of-Experts (MoE) MLP layers, in one file.
n_exp == 1 gives the dense GPT-2 of nanoGPT; n_exp > 1 replaces the MLP of every
`stride`-th block by a top-k routed MoE layer.
References:
1) GPT-2, OpenAI: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT, Karpathy: https://github.com/karpathy/nanoGPT
3) Sparsely-gated MoE, Shazeer et al. 2017: https://arxiv.org/abs/1701.06538
4) Switch Transformer, Fedus et al. 2021: https://arxiv.org/abs/2101.03961
5) ST-MoE, Zoph et al. 2022: https://arxiv.org/abs/2202.08906

Shapes: B batch, T sequence length, C model dim, nh heads of hs dims, L layers, S cached positions. In the MoE
code: N tokens in the forward call (B*T), H expert hidden dim, E experts, k experts per token, cap slots per
expert, R rows of the experts' input (k*N in the grouped layout, E*cap in the padded one; see use_grouped_mm).
An assignment is one (token, choice) pair; there are k*N of them, numbered a = j*N + t (choice j of token t).
"""

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F

from manager import MANAGER


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, kv_cache=None, pos=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask = None
        # generate: cache this call's keys and values at positions pos (T,), attend up to each
        if kv_cache is not None:
            kv_cache[0][:, :, pos], kv_cache[1][:, :, pos] = k, v  # index_put_, which torch.compile does in place
            k, v = kv_cache  # (B, nh, S, hs)
            mask = pos.unsqueeze(1) >= torch.arange(k.size(2), device=x.device)  # (T, S)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config, n_hidden=None):
        super().__init__()
        n_hidden = n_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, n_hidden, bias=config.bias)
        self.c_proj = nn.Linear(n_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


# -----------------------------------------------------------------------------
# Mixture of Experts

class Router(nn.Module):
    """ Picks k experts per token and their gates; records the balancing losses and the step's load per expert """

    def __init__(self, config):
        super().__init__()
        self.top_k = config.top_k
        self.n_exp = config.n_exp
        self.use_aux_loss = config.use_aux_loss
        self.use_router_z_loss = config.use_router_z_loss
        self.router_use_full_prec = config.router_use_full_prec
        self.w_g = nn.Linear(config.n_embd, config.n_exp, bias=False)
        # noisy top-k gating, Shazeer et al. 2017 eq. (4): learned per-expert noise scale
        self.w_noise = nn.Linear(config.n_embd, config.n_exp, bias=False) if config.use_noisy_top_k else None
        # aux-loss-free load balancing, DeepSeek-V3 §2.1.2 (https://arxiv.org/abs/2412.19437): a per-expert
        # bias on the logits for the top-k choice only, moved toward balance after each optimizer step
        # (update_bias), never by gradients. A buffer, so it is checkpointed; step_load, the step's tokens
        # per expert over all its micro-batches, is not: update_bias empties it
        self.bias_update_speed = config.bias_update_speed
        if config.use_aux_free_bias:
            self.register_buffer('expert_bias', torch.zeros(config.n_exp))
            self.register_buffer('step_load', torch.zeros(config.n_exp, dtype=torch.long), persistent=False)
        else:
            self.expert_bias = self.step_load = None

    def forward(self, x):  # x: (N, C) -> gates (N, k), experts (N, k), tokens per expert (E,)
        if self.router_use_full_prec:
            # routing decisions are brittle in low precision (Switch §2.4, selective precision)
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.route(x.float())
        return self.route(x)

    def route(self, x):
        N = x.size(0)
        logits = self.w_g(x)  # (N, E)
        if self.w_noise is not None and self.training:  # noise explores in training only
            logits = logits + F.softplus(self.w_noise(x)) * torch.randn_like(logits)
        # softmax and logsumexp in float32 on every device (CPU autocast would leave them in bf16):
        # the gates, the aux loss's P and the z-loss are not rounded to 8 bits of mantissa
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        if self.expert_bias is None:
            topk_logits, topk_idx = logits.topk(self.top_k, dim=-1)  # (N, k)
        else:  # the bias picks the experts; the gates come from the unbiased logits
            topk_idx = (logits + self.expert_bias).topk(self.top_k, dim=-1).indices  # (N, k)
            topk_logits = logits.gather(-1, topk_idx)  # (N, k)
        if self.top_k == 1:
            # Switch eq. (2): p_i(x), so the task loss trains the router (a softmax of one logit is 1)
            gates = probs.gather(-1, topk_idx)  # (N, 1)
        else:
            # softmax over the chosen k only, Shazeer et al. 2017 eq. (3)-(5): the gates sum to 1
            gates = F.softmax(topk_logits, dim=-1, dtype=torch.float32)  # (N, k)
        # assignments per expert, before any dropping: the aux loss's f, the dispatch and the bias's load
        chosen = topk_idx.view(-1)  # (N*k,)
        tokens_per_expert = torch.zeros(self.n_exp, dtype=torch.long, device=x.device)
        tokens_per_expert.scatter_add_(0, chosen, torch.ones_like(chosen))  # (E,)
        if self.step_load is not None and self.training:
            self.step_load += tokens_per_expert
        if self.use_aux_loss:
            # Switch eq. (4)-(6) for top-k: E * sum_e f_e * P_e, f_e the share of the k*N
            # assignments that chose e (before any dropping), P_e the mean full softmax prob.
            # Equals 1 at perfect balance. f is a count and carries no gradient.
            f = tokens_per_expert.float() / (N * self.top_k)  # float32: bf16 cannot count past 256 exactly
            P = probs.mean(dim=0)  # (E,)
            MANAGER.add_aux_loss(self.n_exp * torch.dot(f, P))
        if self.use_router_z_loss:
            # router z-loss, ST-MoE eq. (5): keeps router logits small
            MANAGER.add_router_z_loss(torch.logsumexp(logits.float(), dim=-1).pow(2).mean())
        return gates, topk_idx, tokens_per_expert

    @torch.no_grad()
    def update_bias(self, load):
        """ DeepSeek-V3 §2.1.2: b_e += gamma * sign(mean load - load_e), load (E,) the tokens per expert of one
        optimizer step (GPT.update_routing_bias); then the next step counts from zero """
        load = load.float()
        self.expert_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        self.step_load.zero_()


class MLPExperts(nn.Module):
    """ E independent GELU MLPs, their weights stacked so that all experts run in one matmul call. """

    def __init__(self, config):
        super().__init__()
        C, H, E = config.n_embd, config.expert_hidden_size, config.n_exp
        self.c_fc = nn.Parameter(torch.empty(E, C, H))
        self.c_proj = nn.Parameter(torch.empty(E, H, C))
        self.fc_bias = nn.Parameter(torch.empty(E, 1, H)) if config.bias else None
        self.proj_bias = nn.Parameter(torch.empty(E, 1, C)) if config.bias else None

    def forward(self, x, offs=None, row_expert=None):
        """ x (R, C): the rows of expert 0, then of expert 1, ... Grouped layout: expert e's rows end at
        offs[e], row_expert (R,) names each row's expert (for the biases); one grouped matmul. Padded layout
        (offs None): cap rows each, R = E*cap, one batched matmul. """
        if offs is None:
            x = x.view(self.c_fc.size(0), -1, x.size(-1))  # (E, cap, C)
            # baddbmm adds the bias inside the matmul, and autocasts it along with the weights
            if self.fc_bias is None:
                h = torch.bmm(F.gelu(torch.bmm(x, self.c_fc)), self.c_proj)  # (E, cap, C)
            else:
                h = F.gelu(torch.baddbmm(self.fc_bias, x, self.c_fc))  # (E, cap, H)
                h = torch.baddbmm(self.proj_bias, h, self.c_proj)  # (E, cap, C)
            return h.view(-1, h.size(-1))  # (R, C)
        # F.grouped_mm does no autocast: cast to the autocast dtype here. Its bias argument is not implemented
        # (torch 2.13), so each row gathers its expert's bias; index_select's backward is an index_add
        dtype = _compute_dtype(x)
        h = F.grouped_mm(x.to(dtype), self.c_fc.to(dtype), offs=offs)  # (R, H)
        if self.fc_bias is not None:
            h = h + self.fc_bias.squeeze(1).index_select(0, row_expert).to(dtype)
        h = F.grouped_mm(F.gelu(h), self.c_proj.to(dtype), offs=offs)  # (R, C)
        if self.proj_bias is not None:
            h = h + self.proj_bias.squeeze(1).index_select(0, row_expert).to(dtype)
        return h


def _compute_dtype(x):
    """ the dtype matmuls on x run in: autocast's where it is on """
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def run_remote_experts(experts, x, group):
    """ Expert parallelism (GShard §2.2, Switch §2.3): the n processes of group hold E/n experts each,
    process i experts i*E/n to (i+1)*E/n - 1. x (E*cap, C) is this process's padded layout; one all-to-all
    sends each process the rows of its experts, they run there on cap rows from every process, a second
    all-to-all brings the outputs back. Equal splits: fixed shapes, no host sync. Returns (E*cap, C) """
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    n, E_local, C = group.size(), experts.c_fc.size(0), x.size(-1)
    cap = x.size(0) // (n * E_local)
    x = all_to_all_single_autograd(x, None, None, group)  # (n*E_local*cap, C): from process 0, 1, ...
    x = x.view(n, E_local, cap, C).transpose(0, 1).reshape(-1, C)  # (E_local*n*cap, C): by local expert
    out = experts(x)  # the padded layout, n*cap slots per expert
    out = out.view(E_local, n, cap, C).transpose(0, 1).reshape(-1, C)  # (n*E_local*cap, C): by process
    return all_to_all_single_autograd(out, None, None, group)  # (E*cap, C)


def use_grouped_mm(device, dtype, compiling, sizes):
    """ The experts' layout: one grouped matmul over the k*N assignments (F.grouped_mm), or a batched
    matmul over E*cap padded slots. Grouped where torch has a kernel for it: CPU eager, and bf16 on sm90 and
    sm100 GPUs (Hopper, Blackwell: torch's CUTLASS path; other GPUs get a loop of matmuls, and tracing
    accepts bf16 only). Its operands' rows must be multiples of 16 bytes: `sizes` are the row lengths, C and H. """
    if any(size * dtype.itemsize % 16 for size in sizes):
        return False
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)  # torch.compile folds this to a constant
        return dtype == torch.bfloat16 and props.major in (9, 10)
    return device.type == 'cpu' and not compiling


class MOELayer(nn.Module):
    """ Top-k routed experts with a capacity limit: routing, dispatch (sort by expert, gather), experts,
    combine (index_add) """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # names the layer in MANAGER's routing stats
        self.n_exp = config.n_exp
        self.top_k = config.top_k
        self.train_capacity = config.train_capacity
        self.eval_capacity = config.eval_capacity
        self.min_capacity = config.min_capacity
        self.router = Router(config)
        self.experts = MLPExperts(config)
        self.ep_group = None  # expert parallelism: the processes its experts are split over (parallel.py)
        self.dropout = nn.Dropout(config.dropout)
        # shared experts, DeepSeek-MoE §3.2 (https://arxiv.org/abs/2401.06066): every token uses
        # them; n_shared_exp experts of the routed width make one MLP n_shared_exp times as wide
        n_shared_hidden = config.n_shared_exp * config.expert_hidden_size
        self.shared_experts = MLP(config, n_shared_hidden) if config.n_shared_exp > 0 else None

    def capacity(self, N):
        """ Slots per expert, Switch eq. (3): floor(k * cf * N / E), rounded up to even, at least
        min_capacity. cf <= 0 means dropless. Never more than N: an expert gets each token once. """
        cf = self.train_capacity if self.training else self.eval_capacity
        if cf <= 0:
            return N
        cap = math.floor(self.top_k * cf * N / self.n_exp + 1e-6)  # + 1e-6: 0.7 is stored a hair below 0.7
        cap += cap % 2
        return min(max(cap, self.min_capacity), N)

    def forward(self, x, dropless=False):
        B, T, C = x.size()
        N, E, k, H = B * T, self.n_exp, self.top_k, self.experts.c_fc.size(-1)
        x = x.view(N, C)

        # routing
        gates, topk_idx, tokens_per_expert = self.router(x)  # (N, k), (N, k), (E,)
        cap = N if dropless else self.capacity(N)

        # dispatch. Numbering assignments a = j*N + t and stably sorting them by expert lists each expert's
        # assignments with all first choices, in token order, before any second choice: the order its slots
        # fill in. Its first cap are kept, the rest dropped (Switch §2.2).
        sorted_expert, sorted_assignment = torch.sort(topk_idx.t().reshape(-1), stable=True)  # (k*N,), (k*N,)
        expert_end = torch.cumsum(tokens_per_expert, 0)  # (E,) where e's assignments end in sorted_assignment
        expert_start = expert_end - tokens_per_expert  # (E,) and where they start
        # expert parallelism sends the padded layout, whose splits are equal (run_remote_experts)
        compiling = torch.compiler.is_compiling()
        if self.ep_group is None and use_grouped_mm(x.device, _compute_dtype(x), compiling, (C, H)):
            # R = k*N rows in sorted order, expert e's ending at offs[e]. A dropped assignment keeps its
            # row: its expert runs one row more, and no gather is spent packing the kept ones tighter
            offs = expert_end.to(torch.int32)  # (E,)
            row_expert, row_assignment = sorted_expert, sorted_assignment  # (R,), (R,)
            row_kept = torch.arange(k * N, device=x.device) - expert_start[sorted_expert] < cap  # (R,)
        else:
            # R = E*cap rows, cap slots per expert: slot s of expert e holds e's s-th assignment, if e kept it
            offs = None
            if self.ep_group is None and x.device.type == 'cpu' and not compiling:  # a host read is free on CPU
                cap = min(cap, int(tokens_per_expert.max()))  # no slot past the fullest expert's last assignment
            row = torch.arange(E * cap, device=x.device)  # (R,)
            row_expert, slot = row // cap, row % cap  # (R,), (R,)
            row_kept = slot < tokens_per_expert[row_expert]  # (R,)
            row_assignment = sorted_assignment[(expert_start[row_expert] + slot).clamp(max=k * N - 1)]  # (R,)
        # A row without a kept assignment (a dropped one, a padding slot) reads and writes token N, a zero row
        # past the real ones: it adds nothing to any output or gradient, and an expert that would overflow on
        # some token (float16) reaches no token it did not keep. No mask multiplies (R, C) rows.
        row_token = torch.where(row_kept, row_assignment % N, N)  # (R,)
        # a gather, whose backward is an index_add, not a scatter of tokens into a buffer
        x_in = F.pad(x, (0, 0, 0, 1)).index_select(0, row_token)  # (R, C)

        # experts
        if self.ep_group is None:
            out = self.experts(x_in, offs, row_expert)  # (R, C)
        else:  # expert parallelism: this process holds some of the experts, the group the others
            out = run_remote_experts(self.experts, x_in, self.ep_group)  # (R, C)

        # combine: y_t = sum over t's kept assignments of gate * expert output. index_add adds a token's k
        # outputs onto zero: for k = 2 the same sum in any order, on any device
        row_gate = gates.t().reshape(-1).index_select(0, row_assignment).to(out.dtype)  # (R,)
        y = out.new_zeros(N + 1, C).index_add(0, row_token, out * row_gate.unsqueeze(1))[:N]  # (N, C)

        dropped_frac = 1.0 - row_kept.sum() / (k * N)
        MANAGER.add_routing_stats(self.layer_idx, tokens_per_expert.detach(), dropped_frac)
        y = self.dropout(y)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, C)


# -----------------------------------------------------------------------------

class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        use_moe = config.n_exp > 1 and layer_idx % config.stride == 0
        self.mlp = MOELayer(config, layer_idx) if use_moe else MLP(config)

    def forward(self, x, kv_cache=None, pos=None, dropless=False):
        x = x + self.attn(self.ln_1(x), kv_cache, pos)
        mlp_args = {'dropless': dropless} if isinstance(self.mlp, MOELayer) else {}
        return x + self.mlp(self.ln_2(x), **mlp_args)


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    # MoE; names and defaults as the earlier nanoMoE so its config files and checkpoints work
    n_exp: int = 1  # experts per MoE layer; 1 = dense GPT
    top_k: int = 2  # experts each token is sent to
    use_aux_loss: bool = False  # Switch load-balancing loss
    use_router_z_loss: bool = False  # ST-MoE router z-loss
    use_noisy_top_k: bool = False  # learned gaussian noise on router logits in training (Shazeer 2017)
    aux_loss_weight: float = 0.01  # Switch's alpha
    router_z_loss_weight: float = 0.001  # ST-MoE's c_z
    train_capacity: float = 1.25  # capacity factor in training; <= 0: dropless
    eval_capacity: float = 2.0  # capacity factor in eval; <= 0: dropless
    min_capacity: int = 4  # fewest slots per expert whatever the batch
    stride: int = 2  # every stride-th block (0, stride, 2*stride, ...) is MoE
    use_switch_tfm_init: bool = False  # truncated normal init scaled by fan-in (Switch §2.2)
    switch_tfm_init_scale: float = 1.0  # Switch's s; they recommend 0.1
    router_use_full_prec: bool = False  # router in float32 under autocast
    # beyond the earlier nanoMoE
    expert_hidden: int = 0  # each expert's hidden size; 0: 4 * n_embd. Smaller, more: fine-grained (DeepSeek-MoE)
    n_shared_exp: int = 0  # experts every token uses besides its top_k (DeepSeek-MoE)
    use_aux_free_bias: bool = False  # aux-loss-free balancing by a routing bias (DeepSeek-V3)
    bias_update_speed: float = 0.001  # DeepSeek-V3's gamma: bias step per optimizer step

    def __post_init__(self):
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                             "pick n_embd a multiple of n_head")
        if self.n_exp < 1:
            raise ValueError(f"n_exp={self.n_exp} must be >= 1 (1 = dense GPT)")
        if self.n_exp > 1:
            if not 1 <= self.top_k <= self.n_exp:
                raise ValueError(f"top_k={self.top_k} must be between 1 and n_exp={self.n_exp}")
            if self.stride < 1:
                raise ValueError(f"stride={self.stride} must be >= 1 (1 = every block is MoE)")
            if self.expert_hidden < 0 or self.n_shared_exp < 0:
                raise ValueError(f"expert_hidden={self.expert_hidden}, n_shared_exp={self.n_shared_exp} "
                                 "must be >= 0")

    @property
    def expert_hidden_size(self):
        """ each expert's hidden size, H: expert_hidden, or GPT-2's 4 * n_embd where it is 0 """
        return self.expert_hidden or 4 * self.n_embd


# GPTConfig's fields by what they are to a saved model. Those a dense model reads (nanoGPT's and the Switch init);
# the others, n_exp on, only MoE layers read
DENSE_KEYS = ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'dropout', 'bias', 'use_switch_tfm_init',
              'switch_tfm_init_scale')
# settings of a run, not of its weights: a resumed, evaluated or finetuned model takes the ones given
# (checkpoint.model_args_with). top_k is not one: the weights were trained to mix k experts' outputs
RUN_SETTINGS = ('dropout', 'train_capacity', 'eval_capacity', 'min_capacity', 'use_aux_loss', 'aux_loss_weight',
                'use_router_z_loss', 'router_z_loss_weight', 'bias_update_speed', 'router_use_full_prec')


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # https://paperswithcode.com/method/weight-tying
        self.transformer.wte.weight = self.lm_head.weight

        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    def to_empty(self, *, device, recurse=True):
        """ nn.Module's to_empty (a model built on 'meta' gets uninitialised tensors on device), wte and lm_head
        tied again: to_empty gives each module a new Parameter """
        super().to_empty(device=device, recurse=recurse)
        self.lm_head.weight = self.transformer.wte.weight
        return self

    def get_num_params(self, non_embedding=True, active=False):
        """ non_embedding leaves out wpe (wte is lm_head's); active counts the top_k of n_exp experts a token
        runs. Every expert counts, those that other processes hold under expert parallelism too """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        for m in self.modules():
            if isinstance(m, MLPExperts):
                held = m.c_fc.size(0)  # the experts this process holds
                per_expert = sum(p.numel() for p in m.parameters()) // held
                n_params += per_expert * ((self.config.top_k if active else self.config.n_exp) - held)
        return n_params

    @torch.no_grad()
    def init_parameter(self, name, w):
        """ GPT-2's init of the parameter called name into w, a tensor of its whole shape (parallel.materialize
        draws a parameter split over processes whole): normal(0.02), the residual projections' std scaled by
        1/sqrt(2 * n_layer) (GPT-2 §2.3, under Switch init too); zero biases, unit LayerNorm gains. With
        use_switch_tfm_init Switch's init (§2.2) on every other matmul weight, lm_head (tied to wte) too """
        if name.endswith('bias'):  # a Linear's or LayerNorm's, the experts' fc_bias and proj_bias
            torch.nn.init.zeros_(w)
        elif isinstance(self.get_submodule(name.rpartition('.')[0]), nn.LayerNorm):
            torch.nn.init.ones_(w)
        elif name.endswith(('c_proj.weight', 'experts.c_proj')):
            torch.nn.init.normal_(w, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        elif self.config.use_switch_tfm_init and name != 'transformer.wpe.weight':
            _switch_init(w, w.size(1), self.config.switch_tfm_init_scale)  # fan_in: (out, in) or (E, C, H)
        else:
            torch.nn.init.normal_(w, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, pos=None, dropless=False):
        """ cache, pos (T,): generate's, see there. dropless: MoE layers keep every token, whatever the
        capacity, so that a token's output never depends on the other tokens (generate, hellaswag.py) """
        MANAGER.reset()  # nothing from an earlier step or mode may leak into this one
        B, T = idx.size()
        assert T <= self.config.block_size, f"cannot forward {T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device) if pos is None else pos  # (T,)

        tok_emb = self.transformer.wte(idx)  # token embeddings (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # position embeddings (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, dropless=dropless) if cache is None else block(x, cache[i], pos, dropless=True)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            # the router losses train the router; in eval the loss is CE alone so that val losses
            # of dense and MoE models compare
            if self.training and self.config.n_exp > 1:
                if self.config.use_aux_loss:
                    loss = loss + self.config.aux_loss_weight * MANAGER.aggregate_aux_loss()
                if self.config.use_router_z_loss:
                    loss = loss + self.config.router_z_loss_weight * MANAGER.aggregate_router_z_loss()
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None

        return logits, loss

    def crop_block_size(self, block_size):  # model surgery, e.g. GPT-2's block size 1024 down to a smaller model's
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """ GPT-2 weights from Hugging Face: a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local
        directory written by GPT2LMHeadModel.save_pretrained; override_args may set dropout. ValueError: unloadable
        weights """
        override_args = override_args or {}
        assert all(k == 'dropout' for k in override_args)  # only dropout can be overridden
        from transformers import GPT2LMHeadModel
        print(f"loading weights from pretrained gpt: {model_type}")
        try:
            model_hf = GPT2LMHeadModel.from_pretrained(model_type)
        # transformers' error for no network, an unknown name or a directory without the files
        except OSError as e:
            reason = str(e).splitlines()[0].rstrip('.')
            raise ValueError(f"cannot load GPT-2 weights '{model_type}' ({reason}): give --init_from a directory "
                             "written by GPT2LMHeadModel.save_pretrained, or connect to the Hugging Face hub")
        hf = model_hf.config
        model = GPT(GPTConfig(n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, block_size=hf.n_positions,
                              vocab_size=hf.vocab_size, bias=True, **override_args))
        sd = model.state_dict()
        buffers = ('.attn.bias', '.attn.masked_bias')  # the causal masks, not weights
        sd_hf = {k: v for k, v in model_hf.state_dict().items() if not k.endswith(buffers)}
        assert set(sd_hf) == set(sd), f"mismatched keys: {sorted(set(sd_hf) ^ set(sd))}"
        # OpenAI checkpoints use a "Conv1D" module, so these weights are stored transposed
        transposed = ['attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight']
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k.endswith(tuple(transposed)):
                    v = v.t()
                assert v.shape == sd[k].shape, f"{k}: {v.shape} vs {sd[k].shape}"
                sd[k].copy_(v)
        return model

    @torch.no_grad()
    def upcycle(self, **moe_args):
        """ Sparse upcycling (Komatsuzaki et al. 2022, https://arxiv.org/abs/2212.05055): the MoE GPT with this
        dense model's weights, each MoE block's experts all copies of that block's MLP, and fresh routers. Dropless
        and with top_k >= 2 it computes what the dense model does: a token's k gates sum to 1 over k equal experts.
        With top_k = 1 each MoE block's output starts as its MLP's scaled by the gate p_i(x) < 1 (Switch eq. 2)
        """
        config = GPTConfig(**{**asdict(self.config), **moe_args})
        if config.expert_hidden_size != 4 * config.n_embd or config.n_shared_exp:
            raise ValueError("upcycling copies the dense MLP into each expert: "
                             "leave expert_hidden=0 and n_shared_exp=0")
        moe = GPT(config).to(self.lm_head.weight.device)
        dense = self.state_dict()
        for k, v in moe.state_dict().items():
            if k in dense:  # embeddings, attention, LayerNorms, the blocks that stay dense
                v.copy_(dense[k])
        for block, dense_block in zip(moe.transformer.h, self.transformer.h):
            if isinstance(block.mlp, MOELayer):
                experts, mlp = block.mlp.experts, dense_block.mlp
                experts.c_fc.copy_(mlp.c_fc.weight.t().expand_as(experts.c_fc))  # (E, C, H)
                experts.c_proj.copy_(mlp.c_proj.weight.t().expand_as(experts.c_proj))  # (E, H, C)
                if config.bias:
                    experts.fc_bias.copy_(mlp.c_fc.bias.expand_as(experts.fc_bias))
                    experts.proj_bias.copy_(mlp.c_proj.bias.expand_as(experts.proj_bias))
        return moe

    def update_routing_bias(self, skipped=False):
        """ Call after each optimizer step: every router's aux-loss-free bias moves by the step's load, summed over
        the processes when distributed, so that all of them keep the same biases. A step the float16 GradScaler
        skipped (inf or nan gradients) moved no weight: its load is dropped and no bias moves """
        routers = [m for m in self.modules() if isinstance(m, Router) and m.expert_bias is not None]
        if skipped:
            for router in routers:
                router.step_load.zero_()
        elif routers:
            loads = torch.stack([router.step_load for router in routers])  # (MoE layers, E)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(loads)
            for router, load in zip(routers, loads):
                router.update_bias(load)

    def shard(self, device_type, param_dtype):
        """ FSDP2 over all processes, as its docs recommend: every Block a unit, gathered for its forward and
        backward, then the root (embeddings, ln_f). Weights compute in param_dtype, gradients reduce in float32 """
        from torch.distributed.device_mesh import init_device_mesh  # slow to import, and only FSDP needs it
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        # the mesh of the training device type: FSDP's default is the machine's accelerator
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                         cast_forward_inputs=False)
        # experts split by expert parallelism (parallel.py) stay where they are, whole
        split = {p for m in self.modules() if isinstance(m, MOELayer) and m.ep_group is not None
                 for p in m.experts.parameters()}
        for block in self.transformer.h:
            if self.config.router_use_full_prec and hasattr(block.mlp, 'router'):
                # float32 weights: router_use_full_prec runs it in float32
                fully_shard(block.mlp.router, mesh=mesh)
            fully_shard(block, mesh=mesh, mp_policy=mp_policy, ignored_params=split)
        fully_shard(self, mesh=mesh, mp_policy=mp_policy, ignored_params=split)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """ model flops utilization (MFU) of the active parameters (a token runs top_k of n_exp experts) """
        # see PaLM paper Appendix B as ref: https://arxiv.org/abs/2204.02311
        cfg = self.config
        L, nh, hs, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params(active=True) + 12 * L * nh * hs * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """ Complete idx (LongTensor (B, T)) by max_new_tokens tokens, each fed back in; use model.eval(). The
        prompt's forward fills a key/value cache per block, later ones run the newest token alone. MoE layers route
        dropless, as model(idx) with eval_capacity <= 0: a token's experts never depend on other tokens, so the
        cache holds """
        block_size, hs = self.config.block_size, self.config.n_embd // self.config.n_head
        S = min(block_size, idx.size(1) + max_new_tokens)
        shape = (idx.size(0), self.config.n_head, S, hs)  # (B, nh, S, hs)
        # zeros, not empty: slots not yet written get attention weight 0, and 0 * nan is nan
        like = dict(dtype=_compute_dtype(self.lm_head.weight), device=idx.device)  # c_attn's output dtype
        cache = [(torch.zeros(shape, **like), torch.zeros(shape, **like)) for _ in self.transformer.h]
        for i in range(max_new_tokens):
            T = idx.size(1)
            if i == 0 or T > block_size:
                # the prompt, or past block_size nanoGPT's crop: the learned position embeddings shift
                # with the crop and change every cached key and value, so each token past block_size
                # costs a forward over the whole window, as in nanoGPT's loop
                idx_cond, pos = idx[:, -block_size:], torch.arange(min(T, block_size), device=idx.device)
            else:
                idx_cond, pos = idx[:, -1:], torch.tensor([T - 1], device=idx.device)
            logits, _ = self(idx_cond, cache=cache, pos=pos)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def _switch_init(w, fan_in, scale):
    """ Switch Transformer §2.2: truncated normal, std sqrt(s / fan_in), cut at two std """
    std = math.sqrt(scale / fan_in)
    torch.nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)
