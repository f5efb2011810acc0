"""
Expert parallelism (GShard §2.2, Switch §2.3) beside DDP or FSDP, under torchrun:
$ torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_moe.py --ep_size=2
The processes form groups of ep_size consecutive ranks (one node's GPUs first). Each process of a group holds
n_exp/ep_size experts of every MoE layer, so that the group holds each expert once, and the tokens travel to
their experts (model.run_remote_experts). The other weights are DDP's or FSDP's, as without it. An expert's
gradient holds the tokens of its whole group, which the all-to-all's backward brings, and the processes that
hold the same experts, one per group, sum theirs. Checkpoints hold the experts whole, as every other run's do.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model import MOELayer, MLPExperts


def parallel_setup_problem(fsdp, ep_size, ddp, world_size, dtype, backend):
    """ Returns what is wrong with fsdp and ep_size for these processes, dtype and backend, as one line naming the
    fix, or None """
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
    if ep_size > 1 and backend and 'gloo' not in backend:  # gather_experts sends through host memory
        return (f"ep_size > 1 saves its experts through host memory, which backend='{backend}' cannot send: "
                "leave backend empty, or add gloo (--backend=cpu:gloo,cuda:nccl)")
    return None


def say_error_once(message):
    """ Prints `error: message` on stderr, unless another process of this torchrun job has printed one. The first
    process to meet an error says it, however late the others are, then exits, and torchrun stops the rest.
    torchrun's error file (errors.record) would show an error all processes meet once per process in its report,
    and rank 0 alone would never hear of an error only another node meets (a file it lacks). One atomic add on
    the store of torchrun's agents, which every process of the job reaches, says who is first. Without that
    store (other launchers, torchrun's etcd rendezvous) every process says it """
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                              timeout=timedelta(seconds=60))
        if store.add(f"nanomoe_error_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", 1) > 1:
            return
    print(f"error: {message}", file=sys.stderr, flush=True)


def split_experts(model, ep_size):
    """ Returns (the EP group, the group of the processes holding the same experts as this one), after keeping
    this process's share of every MoE layer's experts (experts r*E/n to (r+1)*E/n - 1 for rank r of its EP
    group) and routing the layers through the EP group """
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
    """ Returns the EP group the model's experts are split over, None if this process holds them all """
    return next((m.ep_group for m in model.modules() if isinstance(m, MOELayer)), None)


def _expert_ids(model):
    return {id(p) for m in model.modules() if isinstance(m, MLPExperts) for p in m.parameters()}


def ddp_ignore_experts(model):
    """ Tells DDP, before it wraps model, to leave the experts alone under expert parallelism: they differ
    between processes, and reduce_expert_grads reduces their gradients """
    if expert_group(model) is not None:
        experts = _expert_ids(model)
        names = [n for n, p in model.named_parameters() if id(p) in experts]
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)


def reduce_expert_grads(model, replicas):
    """ Sums each expert's gradient over the processes holding it and divides it by the world size, as DDP does
    the others, after the last micro-step's backward. Every gradient is then one process's on the global batch """
    experts = _expert_ids(model)
    for p in model.parameters():
        if id(p) in experts and p.grad is not None:
            p.grad /= dist.get_world_size()
            if replicas.size() > 1:
                dist.all_reduce(p.grad, group=replicas)


def clip_grad_norm_(model, max_norm, ep_group):
    """ Returns the total norm of the model's gradients, which it clips to max_norm as torch's clip_grad_norm_.
    Under expert parallelism each process holds its own experts' gradients, so their squares are summed over the
    EP group to count every expert once. The other gradients are the same on every process """
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


def whole_shape(model, p):
    """ Returns the whole shape of parameter p of model. FSDP's DTensors carry it, and a split expert stack is
    n_exp long, not the E/n a process holds """
    group = expert_group(model)
    if group is not None and id(p) in _expert_ids(model):
        return (p.size(0) * group.size(), *p.shape[1:])
    return p.shape


def local_part(model, p, whole):
    """ Returns a view of this process's part of whole, a tensor of parameter p's whole shape: its rows of FSDP's
    shard, its experts under expert parallelism, else all of it """
    if hasattr(p, 'device_mesh'):  # FSDP2 shards dim 0 (Shard(0)) in torch.chunk's blocks of rows
        mesh, rows = p.device_mesh, p.to_local().size(0)
        block = -(-p.size(0) // mesh.size())
        return whole.narrow(0, min(mesh.get_local_rank() * block, p.size(0)), rows)
    group = expert_group(model)
    if group is not None and id(p) in _expert_ids(model):
        return whole.chunk(group.size())[group.rank()]
    return whole


def _local(t):
    """ Returns the tensor holding t's values on this process: FSDP's shard of a DTensor, else t """
    return t.to_local() if hasattr(t, 'to_local') else t


@torch.no_grad()
def materialize(model, device, weights, source):
    """ Gives a model built, split (split_experts) and sharded (GPT.shard) on 'meta' its memory on device. Each
    parameter is drawn whole by GPT.init_parameter on device, in the model's order, and each process keeps its
    part. The buffers start at zero. Unless weights is None (a whole model's state dict, e.g. ckpt.pt's
    memory-mapped on the CPU), each process then copies its part of every tensor of weights. So every setup,
    sharded or not, starts from the weights one process draws from the same seed on the same device type, and no
    process holds more than its part and the one whole parameter it draws. Raises a ValueError if weights are not
    the model's """
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        whole = torch.empty(whole_shape(model, p), device=_local(p).device)
        model.init_parameter(name, whole)
        _local(p).copy_(local_part(model, p, whole))
    for b in model.buffers():  # the aux-free routing bias and its step load
        b.zero_()
    tensors = model.state_dict(keep_vars=True)
    if weights is not None:
        wrong = [k for k, t in tensors.items() if k not in weights or weights[k].shape != whole_shape(model, t)]
        wrong += sorted(set(weights) - set(tensors))
        if wrong:
            raise ValueError(f"{source} does not hold this model's weights: {', '.join(wrong)[:200]}")
        for name, t in tensors.items():
            _local(t).copy_(local_part(model, t, weights[name]))
    here = torch.empty(0, device=device).device  # 'cuda' with its index
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != here]
    assert not misplaced, f"not on {here}: {misplaced}"  # a tensor that setup did not place stays on 'meta'


def local_optimizer_state(model, optimizer, saved):
    """ Returns a checkpoint's optimizer state (optimizer.state_dict()'s layout, every tensor whole) with each
    state tensor shaped like its whole parameter (AdamW's moments) cut to this process's part, on its device. The
    others (AdamW's step) stay as saved """
    params = [p for g in optimizer.param_groups for p in g['params']]  # by their index in saved

    def part(p, v):
        if not torch.is_tensor(v) or v.shape != whole_shape(model, p):
            return v
        v = local_part(model, p, v).to(_local(p).device, copy=True)  # a copy: the memory map can close
        if hasattr(p, 'device_mesh'):
            return type(p).from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return v
    state = {i: {k: part(params[i], v) for k, v in s.items()} for i, s in saved['state'].items()}
    return {**saved, 'state': state}


def gather_experts(model, optimizer):
    """ Returns, on rank 0 under expert parallelism, ({name: whole expert weight}, {name: its optimizer state}),
    for it to write, and ({}, {}) elsewhere. The processes of rank 0's EP group send it their experts through host
    memory, one tensor at a time, with the state tensors shaped like them: AdamW's moments. AdamW's step, the same
    everywhere, is not sent. The other EP groups hold copies and send nothing """
    group = expert_group(model)
    if group is None or dist.get_rank() >= group.size():  # the groups are consecutive ranks: rank 0's 0..n-1
        return {}, {}

    def gather(t):
        t = t.detach().cpu()  # the process group's CPU backend, gloo, sends it (train.py's backend)
        parts = [torch.empty_like(t) for _ in range(group.size())] if dist.get_rank() == 0 else None
        dist.gather(t, parts, dst=0, group=group)
        return torch.cat(parts) if parts else None
    experts = _expert_ids(model)
    named = [(n, p) for n, p in model.named_parameters() if id(p) in experts]
    weights = {n: gather(p) for n, p in named}
    states = {n: {k: gather(v) if torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in optimizer.state[p].items()} for n, p in named}
    return (weights, states) if dist.get_rank() == 0 else ({}, {})
