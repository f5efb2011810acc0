"""
A nanoMoE model for Hugging Face transformers: export.py copies this file beside the weights of an exported MoE
run, and config.json's auto_map points transformers at it, so that a machine without this repository loads it:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
It computes what model.py's GPT does at inference as `generate` there routes: dropless (every expert keeps every
token it was chosen by, no capacity) and causal, so a token's output never depends on later tokens, and the
key/value cache holds. Inference only: no dropout, capacity, router noise or balancing losses. Parameter names
are model.py's, so train.py --init_from=<hf_dir> reads the same safetensors back.
Shapes: B batch, T new tokens, S cached + new positions, C model dim, nh heads of hs dims, N tokens (B*T),
E experts, k experts per token, H expert hidden dim.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class NanoMoEConfig(PretrainedConfig):
    """ model.py's GPTConfig; the keys only training reads (capacity, loss weights, ...) ride along in config.json
    as extra attributes, so that a run started from the export trains as the exported one did """
    model_type = 'nanomoe'
    # the names transformers and its clients (generate, lm-evaluation-harness) look up
    attribute_map = {'hidden_size': 'n_embd', 'num_hidden_layers': 'n_layer', 'num_attention_heads': 'n_head',
                     'max_position_embeddings': 'block_size'}

    # GPTConfig's top_k is num_experts_per_tok here (Mixtral's name): transformers reserves top_k for sampling
    def __init__(self, block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=True, n_exp=8,
                 num_experts_per_tok=2, stride=2, expert_hidden=0, n_shared_exp=0, use_aux_free_bias=False,
                 use_noisy_top_k=False, router_use_full_prec=False, **kwargs):
        self.block_size, self.vocab_size, self.bias = block_size, vocab_size, bias
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.n_exp, self.num_experts_per_tok, self.stride = n_exp, num_experts_per_tok, stride
        self.expert_hidden, self.n_shared_exp = expert_hidden, n_shared_exp
        self.use_aux_free_bias, self.use_noisy_top_k = use_aux_free_bias, use_noisy_top_k
        self.router_use_full_prec = router_use_full_prec
        super().__init__(**{'tie_word_embeddings': True, **kwargs})  # lm_head is wte, as in GPT-2


class Attention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.layer_idx = config.n_head, layer_idx

    def forward(self, x, mask, cache):  # x (B, T, C), mask (B, 1, T, S) True where a query may attend
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):

    def __init__(self, config, n_hidden):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, n_hidden, bias=config.bias)
        self.c_proj = nn.Linear(n_hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact GELU, as model.py


class Router(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.top_k, self.full_prec = config.num_experts_per_tok, config.router_use_full_prec
        self.w_g = nn.Linear(config.n_embd, config.n_exp, bias=False)
        # the noise scale of noisy top-k gating (Shazeer et al. 2017 eq. 4) acts in training only: kept, unused,
        # so that a run started from this directory has it
        self.w_noise = nn.Linear(config.n_embd, config.n_exp, bias=False) if config.use_noisy_top_k else None
        # aux-loss-free balancing, DeepSeek-V3 §2.1.2: a bias that picks the experts but does not weight them
        self.register_buffer('expert_bias', torch.zeros(config.n_exp) if config.use_aux_free_bias else None)

    def forward(self, x):  # x (N, C) -> gates (N, k) float32, experts (N, k)
        logits = F.linear(x.float(), self.w_g.weight.float()) if self.full_prec else self.w_g(x)  # (N, E)
        biased = logits if self.expert_bias is None else logits + self.expert_bias
        topk_idx = biased.topk(self.top_k, dim=-1).indices  # (N, k)
        if self.top_k == 1:  # Switch eq. (2): the gate is the full softmax's probability
            return F.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, topk_idx), topk_idx
        # softmax over the chosen k, Shazeer et al. 2017 eq. (3)-(5)
        return F.softmax(logits.gather(-1, topk_idx), dim=-1, dtype=torch.float32), topk_idx


class Experts(nn.Module):
    """ E GELU MLPs, their weights stacked as model.py's MLPExperts: c_fc (E, C, H), c_proj (E, H, C) """

    def __init__(self, config):
        super().__init__()
        C, H, E = config.n_embd, config.expert_hidden or 4 * config.n_embd, config.n_exp
        self.c_fc = nn.Parameter(torch.empty(E, C, H))
        self.c_proj = nn.Parameter(torch.empty(E, H, C))
        self.fc_bias = nn.Parameter(torch.empty(E, 1, H)) if config.bias else None
        self.proj_bias = nn.Parameter(torch.empty(E, 1, C)) if config.bias else None

    def forward(self, x, e):  # x (n, C): the tokens that chose expert e
        h = x @ self.c_fc[e] if self.fc_bias is None else x @ self.c_fc[e] + self.fc_bias[e]  # (n, H)
        h = F.gelu(h)
        return h @ self.c_proj[e] if self.proj_bias is None else h @ self.c_proj[e] + self.proj_bias[e]  # (n, C)


class MoE(nn.Module):
    """ Dropless top-k routing: y_t = sum over t's k experts of gate * expert(x_t), plus the shared experts
    (DeepSeek-MoE §3.2) that every token runs """

    def __init__(self, config):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        n_shared_hidden = config.n_shared_exp * (config.expert_hidden or 4 * config.n_embd)
        self.shared_experts = MLP(config, n_shared_hidden) if config.n_shared_exp > 0 else None

    def forward(self, x):
        B, T, C = x.size()
        x = x.reshape(B * T, C)  # (N, C)
        gates, topk_idx = self.router(x)  # (N, k), (N, k)
        y = torch.zeros_like(x)  # (N, C)
        for e in range(self.experts.c_fc.size(0)):
            token, choice = (topk_idx == e).nonzero(as_tuple=True)  # the (token, choice) pairs that picked e
            out = self.experts(x[token], e) * gates[token, choice].unsqueeze(1).to(x.dtype)
            y.index_add_(0, token, out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, C)


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        use_moe = layer_idx % config.stride == 0  # model.py: every stride-th block, from the first
        self.mlp = MoE(config) if use_moe else MLP(config, 4 * config.n_embd)

    def forward(self, x, mask, cache):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class NanoMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoMoEConfig
    base_model_prefix = 'transformer'
    _tied_weights_keys = {'lm_head.weight': 'transformer.wte.weight'}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    # transformers 5.x renames past_key_values to cache: take either. Other keyword arguments generate passes
    # (cache_position, return_dict, ...) change nothing here
    def forward(self, input_ids, attention_mask=None, cache=None, past_key_values=None, use_cache=None, **kwargs):
        """ Logits (B, T, V) of input_ids (B, T). attention_mask (B, S): 0 at padding, whose keys no query sees
        and which the positions skip, so that a left-padded row computes what it does alone """
        if kwargs.get('labels') is not None:
            raise ValueError("this model code is for inference and computes no loss: train with nanoMoE's "
                             "train.py --init_from=<this directory>")
        B, T = input_ids.size()
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:  # generate asks for one
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        keep = attention_mask.bool()  # (B, S)
        pos = (keep.long().cumsum(-1) - 1).clamp(min=0)  # (B, S): padding does not count
        if pos.max() >= self.config.block_size:  # learned position embeddings: none past block_size
            raise ValueError(f"{pos.max() + 1} positions, more than block_size={self.config.block_size}: "
                             "shorten the input or max_new_tokens")
        query = torch.arange(past, S, device=input_ids.device)[:, None]  # (T, 1): the queries' places in S
        causal = torch.arange(S, device=input_ids.device) <= query  # (T, S)
        # a query sees the earlier non-padding keys, and itself: a padding row is never all masked (nan)
        mask = ((causal & keep[:, None, :]) | (torch.arange(S, device=input_ids.device) == query)).unsqueeze(1)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos[:, -T:])  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, mask, cache)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        name = 'cache' if 'cache' in CausalLMOutputWithPast.__dataclass_fields__ else 'past_key_values'
        return CausalLMOutputWithPast(logits=logits, **{name: cache})
