"""
Expert parallelism (GShard §2.2, Switch §2.3) beside DDP or FSDP, under torchrun:
$ torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_moe.py --ep_size=2
The processes form groups of ep_size consecutive ranks (one node's GPUs first). Each process of a group holds
n_exp/ep_size experts of every MoE layer, the group all of them once; the tokens travel to their experts
(model.experts_elsewhere). The other weights are DDP's or FSDP's, as without it. An expert's gradient holds
the tokens of its whole group (the all-to-all's backward brings them); the processes holding the same experts,
one per group, sum theirs. Checkpoints hold the experts whole, as every other run's do.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model import MOELayer, MLPExperts


def parallel_setup_problem(fsdp, ep_size, ddp, world_size, dtype):
    """ what is wrong with fsdp and ep_size for these processes and dtype, as one line naming the fix, or None """
    if fsdp and not ddp:
        return ("fsdp=True shards the model over the processes torchrun starts: "
                "run torchrun --standalone --nproc_per_node=N train.py ... --fsdp=True")
    if fsdp and dtype == 'float16':
        return ("fsdp=True does not train in float16 (its GradScaler would see only this process's shard of the "
                "gradients): use --dtype=bfloat16 or float32, or DDP")
    if ep_size > 1 and not ddp:
        return (f"ep_size={ep_size} splits the experts over the processes torchrun starts: "
                f"run torchrun --standalone --nproc_per_node=N train.py ... --ep_size={ep_size}")
    if ep_size < 1 or world_size % ep_size != 0:
        return f"ep_size={ep_size} does not divide the {world_size} processes: pick a divisor of them"
    if ep_size > 1 and dtype == 'float16':
        return ("ep_size > 1 does not train in float16 (its GradScaler would see only this process's experts' "
                "gradients): use --dtype=bfloat16 or float32")
    return None


def say_error_once(message):
    """ `error: message` on stderr, unless another process of this torchrun job has said one: the first process
    to meet an error says it, whichever it is and however late the others are, then exits, and torchrun stops
    the rest. Not torchrun's error file (errors.record): its report lists every failed process's file, so an
    error all the processes meet (a bad key) shows once per process, inside the report. Not rank 0 alone:
    the others would wait for it, and an error one node meets (a file it lacks) never reaches rank 0. One
    atomic add on the store of torchrun's agents, which every process of the job reaches, says who is first;
    without one (other launchers, torchrun's etcd rendezvous) every process says it """
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                              timeout=timedelta(seconds=60))
        if store.add(f"nanomoe_error_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", 1) > 1:
            return
    print(f"error: {message}", file=sys.stderr, flush=True)


def split_experts(model, ep_size):
    """ Keep this process's share of every MoE layer's experts, experts r*E/n to (r+1)*E/n - 1 for rank r of
    its EP group, and route through the group. Returns (the EP group, the group of the processes holding the
    same experts as this one) """
    world = dist.get_world_size()
    ep_group, _ = dist.new_subgroups_by_enumeration([list(range(s, s + ep_size))
                                                     for s in range(0, world, ep_size)])
    replicas, _ = dist.new_subgroups_by_enumeration([list(range(i, world, ep_size)) for i in range(ep_size)])
    for layer in model.modules():
        if isinstance(layer, MOELayer):
            layer.ep_group = ep_group
            for name, p in list(layer.experts.named_parameters()):
                share = p.detach().chunk(ep_size)[ep_group.rank()].clone()
                setattr(layer.experts, name, nn.Parameter(share))
    return ep_group, replicas


def expert_group(model):
    """ the EP group the model's experts are split over, None if this process holds them all """
    return next((m.ep_group for m in model.modules() if isinstance(m, MOELayer)), None)


def _expert_ids(model):
    return {id(p) for m in model.modules() if isinstance(m, MLPExperts) for p in m.parameters()}


def ddp_ignore_experts(model):
    """ Before wrapping model in DDP: under expert parallelism the experts differ between processes, and
    reduce_expert_grads reduces their gradients, so DDP neither broadcasts nor all-reduces them """
    if expert_group(model) is not None:
        experts = _expert_ids(model)
        names = [n for n, p in model.named_parameters() if id(p) in experts]
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)


def reduce_expert_grads(model, replicas):
    """ After the last micro-step's backward: each expert's gradient summed over the processes holding it,
    divided by the world size as DDP divides the others. Every gradient is then one process's on the global
    batch """
    experts = _expert_ids(model)
    for p in model.parameters():
        if id(p) in experts and p.grad is not None:
            p.grad /= dist.get_world_size()
            if replicas.size() > 1:
                dist.all_reduce(p.grad, group=replicas)


def clip_grad_norm_(model, max_norm, ep_group):
    """ torch's clip_grad_norm_ of the whole model. Under expert parallelism each process holds its own
    experts' gradients: their squares are summed over the EP group, every expert counted once; the others
    are the same on every process """
    if ep_group is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    experts = _expert_ids(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    expert_grads = [p.grad for p in model.parameters() if p.grad is not None and id(p) in experts]
    norm = torch.nn.utils.get_total_norm(grads)
    norm = norm.full_tensor() if hasattr(norm, 'full_tensor') else norm  # FSDP's: over the shards
    expert_square = torch.nn.utils.get_total_norm(expert_grads) ** 2
    dist.all_reduce(expert_square, group=ep_group)
    total_norm = (norm ** 2 + expert_square).sqrt()
    # torch's clip coefficient, a float: FSDP's gradients (DTensors) take no plain tensor factor
    clip_coef = min(max_norm / (total_norm.item() + 1e-6), 1.0)
    for g in grads + expert_grads:
        g.mul_(clip_coef)
    return total_norm


def whole_experts(model, optimizer):
    """ Under expert parallelism, the experts gathered whole over the EP group: {name: weight} and {name: its
    AdamW state}; every process of the group calls this. Else ({}, {}) """
    group = expert_group(model)
    if group is None:
        return {}, {}

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(group.size())]
        dist.all_gather(parts, t.detach().contiguous(), group=group)
        return torch.cat(parts)
    experts = _expert_ids(model)
    named = [(n, p) for n, p in model.named_parameters() if id(p) in experts]
    # AdamW's moments gathered, its 'step' (a scalar, the same everywhere) as it is
    return ({n: gather(p) for n, p in named},
            {n: {k: gather(v) if v.dim() else v for k, v in optimizer.state[p].items()} for n, p in named})


def my_experts(model, optimizer, optim_state):
    """ a checkpoint's optimizer state (the experts' whole), under expert parallelism with this process's
    share """
    group = expert_group(model)
    if group is None:
        return optim_state
    experts = _expert_ids(model)
    params = [p for g in optimizer.param_groups for p in g['params']]  # by their index in optim_state
    share = lambda t: t.chunk(group.size())[group.rank()].clone()
    state = {i: {k: share(v) if id(params[i]) in experts and v.dim() else v for k, v in s.items()}
             for i, s in optim_state['state'].items()}
    return {**optim_state, 'state': state}
