"""
This training script can be run both on a single gpu or cpu in debug mode,
and also in a larger training run with distributed data parallel (ddp).

To run on a single GPU (or CPU, or Apple silicon; the device is picked automatically), example:
$ python train.py config/train_shakespeare_char_moe.py

To run with DDP on 4 gpus on 1 node, example (add --fsdp=True to shard the model instead of copying it):
$ torchrun --standalone --nproc_per_node=4 train.py config/train_nano_moe.py

To run with DDP on 8 gpus on each of 2 nodes, example (gradient_accumulation_steps is the global
count and must be a multiple of the 16 processes: train_nano_moe.py's 40 is not, so 48):
- Run on the first (master) node with example IP 123.456.123.456:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 --master_port=1234 train.py config/train_nano_moe.py --gradient_accumulation_steps=48
- Run on the worker node:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=123.456.123.456 --master_port=1234 train.py config/train_nano_moe.py --gradient_accumulation_steps=48
(If your cluster does not have Infiniband interconnect prepend NCCL_IB_DISABLE=1)
"""

import os
import sys
import json
import math
import time
import atexit
import pickle
import signal
import subprocess
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed import init_process_group, destroy_process_group
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict

from model import GPTConfig, GPT, load_checkpoint, model_from_checkpoint, use_grouped_mm, gpu_peak_flops
from manager import MANAGER

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'  # checkpoint, log.jsonl and run.json go here
eval_interval = 2000  # iterations between evaluations (and checkpoints)
log_interval = 1  # iterations between log lines
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # if True, evaluate once (also a resumed run) and exit: no training, no checkpoint
always_save_checkpoint = True  # if True, always save a checkpoint after each eval
init_from = 'scratch'  # 'scratch', 'resume', 'gpt2*', a local GPT-2 dir, or another run's out_dir (its weights, a new run); n_exp > 1 upcycles a dense model
# wandb logging
wandb_log = False  # disabled by default
wandb_project = 'owt'
wandb_run_name = 'gpt2'  # 'run' + str(time.time())
# data
dataset = 'openwebtext'  # reads data/<dataset>/train.bin, val.bin (and meta.pkl if there)
gradient_accumulation_steps = 5 * 8  # used to simulate larger batch sizes; divided by the world size
batch_size = 12  # micro-batch size, sequences per forward
block_size = 1024  # context length, tokens
seed = 1337  # batches, dropout and router noise are functions of (seed, iteration, rank)
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # do we use bias inside LayerNorm and Linear layers?
# MoE (see GPTConfig in model.py)
n_exp = 1  # experts per MoE layer; 1 = dense GPT
top_k = 2  # experts per token
use_aux_loss = False  # Switch load-balancing loss
use_router_z_loss = False  # ST-MoE router z-loss
use_noisy_top_k = False  # learned noise on router logits, training only
aux_loss_weight = 0.01
router_z_loss_weight = 0.001
train_capacity = 1.25  # capacity factor in training; <= 0: dropless
eval_capacity = 2.0  # capacity factor in eval; <= 0: dropless
min_capacity = 4  # fewest slots per expert
stride = 2  # every stride-th block is MoE
use_switch_tfm_init = False  # truncated normal init scaled by fan-in
switch_tfm_init_scale = 1.0
router_use_full_prec = False  # router in float32 under autocast
expert_hidden = 0  # hidden size of each expert; 0: 4 * n_embd (smaller with more experts: fine-grained)
n_shared_exp = 0  # experts every token uses besides its top_k
use_aux_free_bias = False  # aux-loss-free balancing by a routing bias (DeepSeek-V3)
bias_update_speed = 0.001  # the bias step per optimizer step (DeepSeek-V3's gamma)
# adamw optimizer
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# DDP settings
backend = ''  # '' picks: 'nccl' on CUDA, 'gloo' on CPU
fsdp = False  # under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2), for models that do not fit in one
# system
device = ''  # '' picks: cuda if there, else mps, else cpu. Or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = ''  # '' picks: bfloat16 where CUDA supports it, else float16 (GradScaler) on CUDA, float32 elsewhere
compile = torch.cuda.is_available()  # use PyTorch 2.0 to compile the model to be faster (pays off on CUDA)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
model_keys = [f.name for f in fields(GPTConfig) if f.name in globals()]  # all but vocab_size, which the data sets
moe_defaults = {k: globals()[k] for k in model_keys[model_keys.index('n_exp') + 1:]}  # GPTConfig lists the MoE keys after n_exp
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # overrides from command line or config file
config = {k: globals()[k] for k in config_keys}  # will be useful for logging
# -----------------------------------------------------------------------------


def leave(code):
    """ Exit. Under torchrun, close the process group and skip the interpreter's teardown: gloo's threads can
    outlive the group while DDP or FSDP still refer to it, and abort that teardown ("terminate called without
    an active exception"). Everything is written by then: the log is line-buffered, checkpoints are renamed. """
    if torch.distributed.is_initialized():
        destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def fail(message):
    """ a user mistake: one line, non-zero exit, nothing written """
    print(f"error: {message}", file=sys.stderr)
    leave(1)


# validate what needs no data or devices, before any work
if init_from not in ('scratch', 'resume') and not init_from.startswith('gpt2') and not os.path.isdir(init_from):
    fail(f"init_from='{init_from}' is not 'scratch', 'resume', a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local GPT-2 directory")
if n_exp == 1 and init_from == 'scratch':
    for key, default in moe_defaults.items():
        if config[key] != default:
            print(f"warning: {key}={config[key]} has no effect with n_exp=1 (a dense model)")
if init_from == 'scratch':
    try:
        GPTConfig(**{k: config[k] for k in model_keys})
    except ValueError as e:
        fail(e)
for key in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'log_interval'):
    if config[key] < 1:
        fail(f"{key}={config[key]} must be >= 1")
if seed < 0:
    fail(f"seed={seed} must be >= 0 (numpy seeds the batches with it)")
if dtype not in ('', 'float32', 'bfloat16', 'float16'):
    fail(f"dtype='{dtype}' is not one of float32, bfloat16, float16 ('' picks one for the device)")
if device.startswith('cuda') and not torch.cuda.is_available():
    fail(f"device='{device}' but torch finds no CUDA GPU: use --device=cpu, or leave device empty to pick")
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if os.path.isdir(init_from) and os.path.abspath(init_from) == os.path.abspath(out_dir):
    fail(f"init_from is out_dir '{out_dir}': use init_from='resume' to continue that run, or another --out_dir")
if init_from == 'resume' and not os.path.exists(ckpt_path):
    fail(f"init_from='resume' but there is no checkpoint at {ckpt_path}: train with init_from='scratch' first, or set --out_dir")
if init_from != 'resume' and not eval_only and os.path.exists(ckpt_path):
    fail(f"out_dir '{out_dir}' holds a run's checkpoint: continue it with --init_from=resume, or pick another --out_dir")

# various inits, derived attributes, I/O setup
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a ddp run?
if fsdp and not ddp:
    fail("fsdp=True shards the model over the processes torchrun starts: run torchrun --standalone --nproc_per_node=N train.py ... --fsdp=True")
if not device:
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ.get(k, v)) for k, v in (('RANK', 0), ('LOCAL_RANK', 0), ('WORLD_SIZE', 1)))
master_process = ddp_rank == 0  # this process will do logging, checkpointing etc.
if ddp:
    init_process_group(backend=backend or ('nccl' if device_type == 'cuda' else 'gloo'))
    atexit.register(destroy_process_group)  # on every way out, errors included: no process group left to die at shutdown
    if device_type == 'cuda':
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    # gradient_accumulation_steps is the global count: each process runs its share
    if gradient_accumulation_steps % ddp_world_size != 0:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the {ddp_world_size} processes: make it a multiple")
    gradient_accumulation_steps //= ddp_world_size
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
torch.manual_seed(seed)  # the model's initial weights
if not dtype:
    dtype = 'float32' if device_type != 'cuda' else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
if fsdp and dtype == 'float16':
    fail("fsdp=True does not train in float16 (its GradScaler would see only this process's shard of the gradients): use --dtype=bfloat16 or float32, or DDP")
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

# data: train.bin / val.bin are uint16 token ids as written by data/<dataset>/prepare.py
data_dir = os.path.join('data', dataset)
if not os.path.isdir(data_dir):
    names = sorted(d for d in os.listdir('data') if os.path.isdir(os.path.join('data', d)) and d[0] not in '._') if os.path.isdir('data') else []
    fail(f"no dataset '{dataset}' in data/ (it has {', '.join(names)}): pick one, or prepare yours into data/{dataset}/" if names else
         f"there is no data/ directory in {os.getcwd()}: run train.py from the repository root")
for split in ('train', 'val'):
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.exists(path):
        prepare = f"data/{dataset}/prepare.py" if os.path.exists(os.path.join(data_dir, 'prepare.py')) else f"data/openwebtext/prepare.py --input=<your documents> --out_dir={data_dir}"
        fail(f"{path} not found: run python {prepare} first")
    n_tokens = os.path.getsize(path) // 2
    if n_tokens < block_size + 1:
        fail(f"{path} has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}: use a smaller --block_size or more data")
meta_vocab_size = None
meta_path = os.path.join(data_dir, 'meta.pkl')
if os.path.exists(meta_path):
    with open(meta_path, 'rb') as f:
        meta_vocab_size = pickle.load(f)['vocab_size']
    print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")


def get_batch(split, it, micro):
    """ Micro-batch `micro` (counted across all processes) of iteration `it`. The batch is a
    function of (seed, split, it, micro) alone: runs resume exactly, and N processes see the
    same batches as one process with N times the gradient accumulation. """
    # We recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once/61472122#61472122
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    rng = np.random.default_rng([seed, split == 'val', it, micro])
    ix = rng.integers(len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if device_type == 'cuda':
        # pin arrays x,y, which allows us to move them to GPU asynchronously (non_blocking=True)
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y


# init these up here, can override if init_from='resume' (i.e. from a checkpoint)
iter_num = 0
best_val_loss = 1e9
train_s = 0.0  # seconds of training steps so far (a first step's compile included), evals and checkpoints left out
checkpoint = None
saved_iter = None  # the iteration out_dir's ckpt.pt holds

# model init
model_args = {k: config[k] for k in model_keys}
if init_from == 'scratch':
    print("Initializing a new model from scratch")
    # determine the vocab size we'll use for from-scratch training
    if meta_vocab_size is None:
        print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
    model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
    model = GPT(GPTConfig(**model_args))
elif init_from == 'resume':
    print(f"Resuming training from {out_dir}")
    try:
        checkpoint = load_checkpoint(ckpt_path, 'cpu' if fsdp else device)  # FSDP: each process keeps its shard of it
    except ValueError as e:
        fail(e)
    # the model is the checkpoint's, every key of it, MoE keys included
    model_args = dict(checkpoint['model_args'])
    if block_size != model_args['block_size']:  # cropping would leave AdamW's state for wpe at the old size
        fail(f"block_size={block_size} is not the checkpoint's {model_args['block_size']}: resume with --block_size={model_args['block_size']}, "
             f"or start a new run from its weights with --init_from={out_dir} --out_dir=<a new directory>")
    model_args['dropout'] = dropout  # as nanoGPT, the one model key a resume may change
    model = model_from_checkpoint(checkpoint, dropout=dropout)
    iter_num = saved_iter = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    train_s = checkpoint.get('train_s', 0.0)  # checkpoints of the earlier nanoMoE, and older ones of ours, have none
else:
    # a new run from pretrained weights; with n_exp > 1 a dense model is upcycled into an MoE
    upcycle_args = {'n_exp': n_exp, **{k: config[k] for k in moe_defaults}} if n_exp > 1 else {}
    if os.path.exists(os.path.join(init_from, 'ckpt.pt')):
        print(f"Initializing from the weights of the run in {init_from}")
        try:
            model = model_from_checkpoint(load_checkpoint(os.path.join(init_from, 'ckpt.pt'), 'cpu' if fsdp else device), dropout=dropout)
        except ValueError as e:
            fail(e)
        if upcycle_args and model.config.n_exp == 1:
            try:
                model = model.upcycle(**upcycle_args)
            except ValueError as e:
                fail(e)
        elif upcycle_args:
            print(f"warning: the run in {init_from} is already MoE: its own MoE keys are used, not the given ones")
            upcycle_args = {}
    else:
        print(f"Initializing from OpenAI GPT-2 weights: {init_from}")
        try:
            model = GPT.from_pretrained(init_from, dict(dropout=dropout, **upcycle_args))
        except OSError as e:
            fail(f"cannot load GPT-2 weights '{init_from}': {str(e).splitlines()[0]}")
        except ValueError as e:  # the upcycled model's keys
            fail(e)
    if upcycle_args:
        print(f"upcycled: every expert starts as a copy of its block's MLP ({n_exp} experts, top_k={top_k})")
    if block_size > model.config.block_size:
        fail(f"block_size={block_size} is larger than {init_from}'s {model.config.block_size}: use --block_size={model.config.block_size} or less")
    model_args = asdict(model.config)
if meta_vocab_size is not None and meta_vocab_size != model_args['vocab_size']:
    fail(f"{meta_path} has a vocabulary of {meta_vocab_size} tokens but the model has {model_args['vocab_size']}: prepare the data with the model's tokenizer")
# crop down the model block size if desired, using model surgery
if block_size < model.config.block_size:
    model.crop_block_size(block_size)
    model_args['block_size'] = block_size  # so that the checkpoint will have the right value
raw_model = model  # what we save: neither compiled nor DDP-wrapped
update_routing_bias = raw_model.config.n_exp > 1 and raw_model.config.use_aux_free_bias  # DeepSeek-V3, below
cfg = raw_model.config
if (cfg.n_exp > 1 and min(cfg.train_capacity, cfg.eval_capacity) <= 0 and master_process
        and not use_grouped_mm(torch.device(device), ptdtype, compile, (cfg.n_embd, cfg.expert_hidden or 4 * cfg.n_embd))):
    # a static shape must hold the worst case, every token on one expert (model.py, MOELayer)
    print(f"warning: dropless routing here runs the experts on padded slots for all N tokens each: "
          f"n_exp/top_k = {cfg.n_exp / cfg.top_k:.1f}x the expert FLOPs and memory of the N*top_k assignments")
peak_flops = gpu_peak_flops(device) if device_type == 'cuda' else 0.0  # 0: no MFU
if fsdp:
    # FSDP2 as its docs recommend: every Block a unit, gathered for its forward and backward, then the
    # root (embeddings, ln_f). Each process keeps its shard of the model it built, on its device (the mesh:
    # FSDP's default is the machine's accelerator, not --device). Weights compute in dtype, gradients
    # reduce in float32; with bf16 weights the embeddings, and so the residual stream, are bf16 too.
    mesh = init_device_mesh(device_type, (ddp_world_size,))
    mp_policy = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.transformer.h:
        if model.config.router_use_full_prec and hasattr(block.mlp, 'router'):
            fully_shard(block.mlp.router, mesh=mesh)  # float32 weights: router_use_full_prec runs the router in float32
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
else:
    model.to(device)

# initialize a GradScaler. If enabled=False scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))


def rekey(optim_state, key):
    """ AdamW's state with its parameters renamed by key: the checkpoint names them by index, as
    optimizer.state_dict(), the FSDP state-dict functions by their names in the model """
    return {'state': {key[k]: v for k, v in optim_state['state'].items()},
            'param_groups': [{**group, 'params': [key[k] for k in group['params']]} for group in optim_state['param_groups']]}


# optimizer
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
names = {p: n for n, p in model.named_parameters()}
param_names = [names[p] for group in optimizer.param_groups for p in group['params']]
if init_from == 'resume':
    if fsdp:  # from the full state every process read, each keeps its shard
        set_optimizer_state_dict(model, optimizer, rekey(checkpoint['optimizer'], dict(enumerate(param_names))), options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint.get('scaler'):  # empty when the run was not float16; nanoGPT's checkpoints have none
        scaler.load_state_dict(checkpoint['scaler'])
checkpoint = None  # free up memory

# compile the model
if compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)  # errors surface: nothing is suppressed

# wrap model into DDP container. Every expert's weights take part in every step (an expert
# with no tokens runs on zero rows and gets a zero gradient), so no find_unused_parameters.
if ddp and not fsdp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)
if master_process:
    print(f"device {device}, dtype {dtype}, compile {compile}, {raw_model.get_num_params(non_embedding=False):,} parameters "
          f"({raw_model.get_num_params(non_embedding=False, active=True):,} active per token), {tokens_per_iter:,} tokens per iteration, out_dir {out_dir}")


# helps estimate an arbitrarily accurate loss over either split using many batches
@torch.no_grad()
def estimate_loss():
    out = {}
    # under DDP the master evaluates alone, so not through DDP, whose forward may broadcast buffers
    # (the routing bias) to processes that are not evaluating, or that have exited (eval_only).
    # Under FSDP every process evaluates the same batches: each forward gathers all the shards
    eval_model = model.module if isinstance(model, DDP) else model
    eval_model.eval()  # eval mode: CE alone, eval capacity, no dropout or router noise
    for split in ['train', 'val']:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, iter_num, k)
            with ctx:
                logits, loss = eval_model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    eval_model.train()
    return out


# learning rate decay scheduler (cosine with warmup)
def get_lr(it):
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it >= lr_decay_iters:  # >=: the cosine below would end at min_lr too, and 0/0 if warmup_iters == lr_decay_iters
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


def save_checkpoint():
    """ rank 0 writes to a temporary file and renames it over ckpt.pt: a kill mid-write leaves the old one """
    global saved_iter
    if fsdp:  # every process sends its shards; rank 0 receives the full state dicts, on the CPU
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_model_state_dict(raw_model, options=options), get_optimizer_state_dict(raw_model, optimizer, options=options)
        if not master_process:
            return
        optim_state = rekey(optim_state, {name: i for i, name in enumerate(param_names)})
    else:
        model_state, optim_state = raw_model.state_dict(), optimizer.state_dict()
    checkpoint = dict(model=model_state, optimizer=optim_state, scaler=scaler.state_dict(), model_args=model_args,
                      iter_num=iter_num, best_val_loss=best_val_loss, train_s=train_s, config=config)
    print(f"saving checkpoint to {out_dir}")
    tmp_path = ckpt_path + '.tmp'
    torch.save(checkpoint, tmp_path)
    saved_iter = iter_num
    os.replace(tmp_path, ckpt_path)


def routing_stats():
    """ per MoE layer of the last forward: (share of assignments per expert, dropped fraction) """
    return {layer: ((tokens / tokens.sum()).tolist(), dropped.item()) for layer, (tokens, dropped) in MANAGER.routing.items()}


# a record of the run next to its log: config, versions, commit
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    if not eval_only:  # an eval leaves the record of the run in out_dir, if any, as it is
        git = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(out_dir, 'run.json'), 'w') as f:
            json.dump(dict(config=config, model_args=model_args, torch=torch.__version__, python=sys.version.split()[0],
                           git_commit=git.stdout.strip() or None, world_size=ddp_world_size, device=device, dtype=dtype), f, indent=1)
    log_path = os.path.join(out_dir, 'log.jsonl')  # one JSON record per log line and eval
    if not eval_only and os.path.exists(log_path):
        # records from iter_num on are of steps (and an eval) this run does again, all of them for a new run:
        # drop them, atomically, so that the log reads as that of one run that never stopped. A line cut
        # short by a crash mid-write goes too.
        def record_iter(line):
            try:
                return json.loads(line)['iter']
            except ValueError:
                return None
        with open(log_path) as f:
            kept = [line for line in f if (it := record_iter(line)) is not None and it < iter_num]
        with open(log_path + '.tmp', 'w') as f:
            f.writelines(kept)
        os.replace(log_path + '.tmp', log_path)
    log_file = open(log_path, 'a', buffering=1)  # line-buffered: every record is on disk when written

# logging
if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)



def checkpoint_status():
    return f"{ckpt_path} holds iter {saved_iter}" if saved_iter is not None else "no checkpoint yet"


def on_interrupt(signum, frame):
    """ Ctrl-C: one line on where the run can go on from, not a traceback """
    if master_process:
        how = f"continue with --init_from=resume --out_dir={out_dir}" if saved_iter is not None else "start it again"
        print(f"\ninterrupted at iter {iter_num}: {checkpoint_status()}; {how}", flush=True)
    leave(130)


signal.signal(signal.SIGINT, on_interrupt)

# training loop
t0 = time.time()
local_iter_num = 0  # number of iterations in the lifetime of this process
running_mfu = -1.0
dt_avg = None
recent_losses = []  # the last few logged (iter, loss, aux, z), reported if the loss blows up
while True:
    # dropout and router noise draw from an RNG seeded by (seed, rank, iteration): resume is exact
    torch.manual_seed(seed + 1_000_003 * iter_num + ddp_rank)

    # determine and set the learning rate for this iteration
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    # evaluate the loss on train/val sets and write checkpoints; the step's time dt leaves this out.
    # eval_only evaluates at once, also a run resumed between evals, and never trains or saves
    if (iter_num % eval_interval == 0 or eval_only) and (master_process or fsdp):
        if device_type == 'cuda':
            torch.cuda.synchronize()  # the last step's queued work belongs to its dt, not to the eval
        t_eval = time.time()
        losses = estimate_loss()
        if not all(math.isfinite(v) for v in losses.values()):
            fail(f"eval loss is {losses} at iter {iter_num}; the last good checkpoint is kept. Last logged losses (iter, loss, aux, z): {recent_losses}")
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log_file.write(json.dumps(dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'], lr=lr, train_s=train_s)) + '\n')
            if wandb_log:
                wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'], "lr": lr, "mfu": running_mfu * 100})
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0 and not eval_only:
                save_checkpoint()
        t0 += time.time() - t_eval
    if eval_only:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    # and using the GradScaler if data type is float16
    step_load = 0  # (MoE layers, E) tokens per expert over this step's micro-batches, for the routing bias
    for micro_step in range(gradient_accumulation_steps):
        X, Y = get_batch('train', iter_num, ddp_rank * gradient_accumulation_steps + micro_step)
        last_micro_step = micro_step == gradient_accumulation_steps - 1  # DDP and FSDP sync gradients there only
        if fsdp:  # and FSDP keeps the weights gathered until then, and this process's unsharded float32 gradients
            raw_model.set_requires_gradient_sync(last_micro_step)
            raw_model.set_reshard_after_backward(last_micro_step)
        elif ddp:
            model.require_backward_grad_sync = last_micro_step
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps  # scale the loss to account for gradient accumulation
        if update_routing_bias:
            step_load = step_load + torch.stack([tokens for tokens, _ in MANAGER.routing.values()])
        # backward pass, with gradient scaling if training in fp16
        scaler.scale(loss).backward()
    # clip the gradient
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # step the optimizer and scaler if training in fp16
    scaler.step(optimizer)
    scaler.update()
    if local_iter_num == 0 and master_process:  # what FSDP divides by the number of processes
        local = [t.to_local() if isinstance(t, DTensor) else t for p in raw_model.parameters() for t in (p, p.grad, *optimizer.state[p].values()) if t is not None]
        print(f"weights, gradients and AdamW state: {sum(t.numel() * t.element_size() for t in local) / 2**20:.3f} MiB in this process")
    # flush the gradients as soon as we can, no need for this memory anymore
    optimizer.zero_grad(set_to_none=True)
    # aux-loss-free balancing (DeepSeek-V3): every process moves its routing biases by the loads
    # of all processes, so the biases stay identical across processes
    if update_routing_bias:
        if ddp:
            torch.distributed.all_reduce(step_load)
        for layer, load in zip(MANAGER.routing, step_load):
            raw_model.transformer.h[layer].mlp.router.update_bias(load)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    train_s += dt
    if iter_num % log_interval == 0 and master_process:
        # get loss as float. note: this is a CPU-GPU sync point
        # scale up to undo the division above, approximating the true total loss (exact would have been a sum)
        lossf = loss.item() * gradient_accumulation_steps
        n_moe = len(MANAGER.routing)
        auxf = MANAGER.aggregate_aux_loss().item() / n_moe if MANAGER.aux_loss else 0.0  # mean over layers
        zf = MANAGER.aggregate_router_z_loss().item() / n_moe if MANAGER.router_z_loss else 0.0
        if not math.isfinite(lossf):
            fail(f"loss is {lossf} at iter {iter_num} (aux {auxf}, z {zf}); the last good checkpoint is kept. Last finite losses (iter, loss, aux, z): {recent_losses}")
        recent_losses = (recent_losses + [(iter_num, round(lossf, 4), round(auxf, 4), round(zf, 4))])[-5:]
        if local_iter_num >= 5:  # let the training loop settle a bit
            dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
            if peak_flops:
                mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak_flops)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        line = f"iter {iter_num}: loss {lossf:.4f}"
        record = dict(iter=iter_num, loss=lossf, lr=lr, dt_ms=dt * 1000, train_s=train_s)
        if n_moe:
            routing = routing_stats()
            drop = sum(d for _, d in routing.values()) / n_moe
            top_share = max(max(shares) for shares, _ in routing.values())
            line += f", aux {auxf:.3f}" if MANAGER.aux_loss else ""
            line += f", z {zf:.3f}" if MANAGER.router_z_loss else ""
            line += f", drop {drop * 100:.1f}%, top {top_share * 100:.0f}%"
            record.update(aux=auxf, z=zf, drop=drop, top_share=top_share, routing={str(k): v for k, v in routing.items()})
        line += f", {dt * 1000:.1f}ms, {tokens_per_iter / dt / 1000:.1f}k tok/s"
        if running_mfu > 0:
            line += f", mfu {running_mfu * 100:.1f}%"
        if dt_avg is not None:
            eta = (max_iters - iter_num) * dt_avg
            line += f", eta {eta / 3600:.1f}h" if eta > 3600 else f", eta {eta / 60:.1f}m" if eta > 60 else f", eta {eta:.0f}s"
        print(line)
        log_file.write(json.dumps(record) + '\n')
        if wandb_log:
            stats = {"iter": iter_num, "train/loss_step": lossf, "lr": lr}
            if n_moe:
                stats.update({"moe/aux": auxf, "moe/z": zf, "moe/drop": drop, "moe/top_share": top_share})
                stats.update({f"load/layer{layer}/expert{e}": s for layer, (shares, _) in routing.items() for e, s in enumerate(shares)})
            wandb.log(stats)
    iter_num += 1
    local_iter_num += 1

    # termination conditions
    if iter_num > max_iters:
        break

if master_process:
    log_file.close()
    if not eval_only:
        print(f"best val loss {best_val_loss:.4f}; {checkpoint_status()}")
if wandb_log and master_process:
    wandb.finish()
if ddp:
    torch.distributed.barrier()  # the processes leave together
leave(0)
