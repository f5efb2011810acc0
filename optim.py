"""
The optimizer train.py steps, by its `optimizer` key:
'adamw': nanoGPT's AdamW (Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101) for every parameter.
'muon': Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) for the hidden matrices, AdamW for
the rest, in one optimizer object: the loop, the GradScaler and ckpt.pt see one param_groups and one state_dict.
Muon takes the 2-D weights of attention, MLPs and shared experts, and each expert of every expert stack
(E, in, out) as a matrix of its own; AdamW the embeddings (wte is also the tied lm_head), the routers, LayerNorm
gains and biases. Moonlight's scaling ("Muon is Scalable for LLM Training", https://arxiv.org/abs/2502.16982)
gives Muon's updates AdamW's RMS, so one learning_rate, weight_decay and schedule drive both.
Shapes: E experts, M matrices orthogonalised in one call, each (a, b).
"""
import inspect
from collections import defaultdict

import torch
from torch import nn
# torch.optim.Muon's pieces: its Newton-Schulz coefficients and steps, and its learning-rate scaling by shape
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr

from model import Router


def orthogonalize(G, coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), steps=DEFAULT_NS_STEPS, eps=EPS):
    """ torch.optim.Muon's quintic Newton-Schulz iteration, in bfloat16, on each matrix of a stack G (M, a, b) at
    once: the batched matmuls give every matrix, bit for bit, what torch's 2-D function gives it alone """
    x, y, z = coefficients
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side: the Gram matrices are the smaller ones
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT  # (M, a, a)
        B = torch.baddbmm(A, A, A, beta=y, alpha=z)  # y A + z A^2
        X = torch.baddbmm(X, B, X, beta=x)  # x X + B X
    return X.mT if tall else X


def whole_matrices(t):
    """ t (a parameter's momentum, maybe an FSDP shard) as a stack (n, a, b) of whole matrices this process
    orthogonalises: an FSDP-sharded 2-D matrix gathered, an expert stack's shard (split along E by FSDP or
    expert parallelism) its whole experts as they are """
    if hasattr(t, 'full_tensor'):
        t = t.full_tensor() if t.dim() == 2 else t.to_local()
    return t.reshape(-1, *t.shape[-2:])


def local_part(o, p):
    """ the orthogonalised o (n, a, b) of whole_matrices(p's momentum), as this process's part of p """
    if hasattr(p, 'full_tensor') and p.dim() == 2:  # the rows of p's FSDP shard, cut locally
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(o[0], p.device_mesh, p.placements, src_data_rank=None).to_local()
    return o.view(local(p).shape)


def local(t):
    """ this process's part of t: the tensor itself, or an FSDP shard's local tensor, which shares its storage """
    return t.to_local() if hasattr(t, 'to_local') else t


class MuonAdamW(torch.optim.Optimizer):
    """ Muon's param group (group['muon'] True), stepped here, beside AdamW's groups, stepped by a
    torch.optim.AdamW that holds the same group dicts and this optimizer's state. Per parameter, the state is
    Muon's momentum_buffer or AdamW's step, exp_avg, exp_avg_sq """

    def __init__(self, muon_params, adamw_groups, lr, weight_decay, betas, **adamw_kernel):
        # torch.optim.Muon's defaults, with Moonlight's update scaling
        muon = dict(params=muon_params, muon=True, lr=lr, weight_decay=weight_decay, momentum=0.95, nesterov=True,
                    ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), ns_steps=DEFAULT_NS_STEPS, eps=EPS,
                    adjust_lr_fn='match_rms_adamw')
        super().__init__([muon, *[dict(g, muon=False) for g in adamw_groups]], dict(lr=lr))
        self.adamw = torch.optim.AdamW(self.param_groups[1:], lr=lr, betas=betas, **adamw_kernel)
        self._share()

    def _share(self):
        """ AdamW's groups and state are this optimizer's (again after load_state_dict, which replaces both) """
        self.adamw.param_groups = [g for g in self.param_groups if not g['muon']]
        self.adamw.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        """ AdamW's step, then Muon's on each matrix: Nesterov momentum orthogonalised (the matrices of one shape
        in one call), scaled by Moonlight's 0.2 sqrt(max(a, b)), after decoupled weight decay:
        torch.optim.Muon's step, matrix by matrix """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        for group in self.param_groups:
            if group['muon']:
                self._muon_step(group)
        return loss

    def _muon_step(self, group):
        momentum, lr = group['momentum'], group['lr']
        by_shape = defaultdict(list)  # (a, b): [(parameter, its whole matrices (n, a, b))]
        for p in group['params']:
            if p.grad is None:
                continue
            state = self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(p.grad)
            buf = state['momentum_buffer']
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group['nesterov'] else buf
            by_shape[p.shape[-2:]].append((p, whole_matrices(update)))
        for shape, pairs in by_shape.items():
            stack = torch.cat([m for _, m in pairs])  # (M, a, b)
            ortho = orthogonalize(stack, group['ns_coefficients'], group['ns_steps'], group['eps'])
            scaled_lr = _adjust_lr(lr, group['adjust_lr_fn'], shape)
            for (p, _), o in zip(pairs, ortho.split([len(m) for _, m in pairs])):
                local(p).mul_(1 - lr * group['weight_decay'])
                local(p).add_(local_part(o, p), alpha=-scaled_lr)


def configure_optimizers(model, optimizer, weight_decay, learning_rate, betas, device_type):
    """ model's optimizer: 'adamw' or 'muon' (see the top of this file). AdamW decays the matrices and embeddings
    it holds (2-D, and 3-D expert stacks), not the biases (the expert biases are 3-D too) nor LayerNorm gains """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_matrix = {id(p) for n, p in named if p.dim() >= 2 and not n.endswith('bias')}
    # Muon orthogonalises the maps between hidden features. The embeddings are lookups, and lm_head and the
    # routers score outputs (tokens, experts) row by row: they stay with AdamW, as the classifier head of
    # Jordan's post does
    scorers = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, Router)) for p in m.parameters()}
    scorers.add(id(model.lm_head.weight))
    to_muon = (is_matrix - scorers) if optimizer == 'muon' else set()
    hidden = [p for n, p in named if id(p) in to_muon]
    rest = [p for n, p in named if id(p) not in to_muon]
    decay_params = [p for p in rest if id(p) in is_matrix]
    nodecay_params = [p for p in rest if id(p) not in is_matrix]
    optim_groups = [{'params': decay_params, 'weight_decay': weight_decay},
                    {'params': nodecay_params, 'weight_decay': 0.0}]
    kinds = [('Muon', hidden)] if optimizer == 'muon' else []
    for kind, group in kinds + [('decayed', decay_params), ('non-decayed', nodecay_params)]:
        print(f"num {kind} parameter tensors: {len(group)}, with {sum(p.numel() for p in group):,} parameters")
    # fused AdamW where available, CPU too: unfused it is a loop of small ops per tensor, and MoE models have many
    use_fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type in ('cuda', 'cpu')
    kernel = dict(fused=True) if use_fused else dict()
    if len({type(p) for p in rest}) > 1:
        # FSDP's DTensors beside expert parallelism's experts: fused and foreach take one kind per call
        use_fused, kernel = False, dict(foreach=False)
    print(f"using fused AdamW: {use_fused}")
    if optimizer == 'muon':
        return MuonAdamW(hidden, optim_groups, learning_rate, weight_decay, betas, **kernel)
    return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **kernel)
