"""
Trains a GPT, dense or MoE, on one device (GPU, CPU or Apple silicon, picked automatically):
$ python train.py config/train_shakespeare_char_moe.py
or with DDP on 4 GPUs of one node (add --fsdp=True to shard the model instead of copying it, or --ep_size=4 to
split each MoE layer's experts over the GPUs):
$ torchrun --standalone --nproc_per_node=4 train.py config/train_nano_moe.py
On several nodes, see the README's Scaling section.
"""

import os
import sys
import math
import inspect
import time
import atexit
import signal
import threading
import warnings
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed import init_process_group, destroy_process_group

from model import GPTConfig, GPT, DENSE_KEYS, use_grouped_mm
from machine import gpu_peak_flops, pick_device
from parallel import (split_experts, materialize, ddp_ignore_experts, reduce_expert_grads, clip_grad_norm_,
                      say_error_once)
from optim import configure_optimizers
from checks import run_problem, run_warnings, loaded_model_problem, model_problem
from checkpoint import (check_run_dirs, saved_settings, start_model, load_optimizer_state, save_checkpoint,
                        trim_log, write_run_record)
from manager import MANAGER
from runlog import RunLog
from tokenizer import dataset_dir, char_meta_path, load_char_meta
import hellaswag as hellaswag_eval
from tqdm import tqdm

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'  # checkpoint, log.jsonl and run.json go here
eval_interval = 2000  # iterations between evaluations (and checkpoints)
log_interval = 1  # iterations between log lines
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # if True, evaluate once (also a resumed run) and exit: no training, no checkpoint
always_save_checkpoint = True  # if True, always save a checkpoint after each eval
hellaswag = False  # if True, each eval also scores HellaSwag (hellaswag.py), for GPT-2 BPE models
hellaswag_items = 0  # HellaSwag items each eval scores; 0: all 10,042
# 'scratch', 'resume', 'gpt2*', a GPT-2 dir, or a run's out_dir (its weights), a dense one upcycled if n_exp > 1
init_from = 'scratch'
# wandb logging
wandb_log = False  # disabled by default
wandb_project = 'owt'
wandb_run_name = 'gpt2'  # 'run' + str(time.time())
# data
dataset = 'openwebtext'  # reads data/<dataset>/train.bin, val.bin (and meta.json if there)
gradient_accumulation_steps = 5 * 8  # micro-steps per iteration over all processes, to simulate a larger batch
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
# optimizer
optimizer = 'adamw'  # 'adamw', or 'muon': Muon for the hidden matrices and experts, AdamW for the rest (optim.py)
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
backend = ''  # '' picks: 'cpu:gloo,cuda:nccl' on CUDA, 'gloo' on CPU
fsdp = False  # under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2), for big models
ep_size = 1  # under torchrun: each MoE layer's experts split over groups of ep_size processes (parallel.py)
# system
device = ''  # '' picks: cuda if there, else mps, else cpu. Or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = ''  # '' picks: bfloat16 where CUDA supports it, else float16 (GradScaler) on CUDA, float32 elsewhere
compile = torch.cuda.is_available()  # use PyTorch 2.0 to compile the model to be faster (pays off on CUDA)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
model_keys = [f.name for f in fields(GPTConfig) if f.name in globals()]  # all but vocab_size, which the data sets
moe_defaults = {k: globals()[k] for k in model_keys if k not in DENSE_KEYS}  # the keys only an MoE model reads
# under torchrun rank 0 alone prints the config, the setup, the warnings and the log (fail prints errors)
if int(os.environ.get('RANK', 0)) != 0:
    sys.stdout = open(os.devnull, 'w')
    warnings.simplefilter('ignore')
# overrides from the command line or a config file
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}  # will be useful for logging
# -----------------------------------------------------------------------------

def exit_process(code):
    """ Exits with code. Under torchrun it closes the process group and skips the interpreter's teardown, which
    gloo's threads can abort ("terminate called without an active exception"). Nothing is lost by skipping it:
    the log is line-buffered and checkpoints are renamed into place """
    if torch.distributed.is_initialized():
        destroy_process_group()
        sys.stdout.flush()  # stderr is line-buffered
        os._exit(code)
    sys.exit(code)

def fail(message):
    """ Ends the run on a user mistake: one `error:` line (under torchrun from the first process to fail), exit
    code 1, nothing written """
    say_error_once(message)
    exit_process(1)

# the processes (one, or torchrun's), the device and the dtype
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a ddp run?
ddp_rank, ddp_local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
ddp_world_size = int(os.environ.get('WORLD_SIZE', 1))
master_process = ddp_rank == 0  # this process will do logging, checkpointing etc.
device, device_type, dtype = pick_device(device, dtype)
if ddp and device_type == 'cuda' and torch.cuda.is_available():
    device = f'cuda:{ddp_local_rank}'
    torch.cuda.set_device(device)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')

# the config, the data and out_dir, checked before any work (checks.py): one line naming the problem and the fix
try:
    check_run_dirs(init_from, out_dir, eval_only)
    if init_from == 'resume':  # the run's saved settings, but for the keys given now
        config.update(saved := saved_settings(ckpt_path, config, given_keys))
        globals().update(saved)
    data_dir = dataset_dir(dataset)
    meta = load_char_meta(data_dir)  # None: GPT-2's BPE
except ValueError as e:
    fail(e)
splits = [s for s in ('train', 'val') if os.path.exists(os.path.join(data_dir, f'{s}.bin'))]
if (problem := run_problem(config, device, device_type, dtype, ddp, ddp_world_size, master_process, data_dir,
                           splits, meta)):
    fail(problem)
for line in run_warnings(config, data_dir, splits):
    print(line)
meta_vocab_size, meta_path = (meta['vocab_size'], char_meta_path(data_dir)) if meta else (None, None)
if meta is not None:
    print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")
try:
    hellaswag_val_items = hellaswag_eval.read_items(hellaswag_eval.PATH, hellaswag_items) if hellaswag else None
except ValueError as e:
    fail(e)

# the process group, and the precision every forward runs in
t_start = time.time()  # for the closing line's time in all: setup, steps, evals and saves of this process
if ddp:
    # gloo beside NCCL on CUDA: an expert-parallel checkpoint gathers through host memory (parallel.gather_experts)
    init_process_group(backend=backend or ('cpu:gloo,cuda:nccl' if device_type == 'cuda' else 'gloo'))
    # every way out, errors included, closes the group, so that no process group is left to die at exit
    atexit.register(destroy_process_group)
    gradient_accumulation_steps //= ddp_world_size  # the global count: each process runs its share
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

def get_batch(split, it, micro):
    """ Returns inputs x and targets y (batch_size, block_size) of micro-batch `micro` (counted across all
    processes) of iteration `it`. They are a function of (seed, split, it, micro) alone, so that runs resume
    exactly and N processes see the batches of one with N times the gradient accumulation. train.bin and
    val.bin hold uint16 token ids, as data/<dataset>/prepare.py writes them """
    # a new np.memmap every batch, to avoid a memory leak: https://stackoverflow.com/a/61472122
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = np.random.default_rng([seed, split == 'val', it, micro]).integers(len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if device_type == 'cuda':  # pinned, so that the copy to the GPU runs asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

# the model, from scratch, a run's checkpoint or GPT-2's weights (upcycled if n_exp > 1): checkpoint.py
given_model_args = {k: config[k] for k in model_keys if k in given_keys}  # a config file's or --key=value's
torch.manual_seed(seed)  # an upcycled model's routers
try:
    cfg, weights, checkpoint = start_model(init_from, out_dir, {k: config[k] for k in model_keys},
                                           given_model_args, meta_vocab_size)
except ValueError as e:
    fail(e)
if (problem := loaded_model_problem(cfg, checkpoint, optimizer, meta, data_dir, ckpt_path, out_dir)):
    fail(problem)
iter_num, best_val_loss, saved_iter = 0, 1e9, None  # saved_iter: the iteration out_dir's ckpt.pt holds
train_s = 0.0  # seconds of training steps so far (a first step's compile included), evals and checkpoints left out
if checkpoint is not None:  # a resumed run
    iter_num = saved_iter = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    train_s = checkpoint.get('train_s', 0.0)  # checkpoints of the earlier nanoMoE have none
model_args = asdict(cfg)  # what the checkpoint needs to build the model again
# what runs is what the run records (ckpt.pt's config, run.json): the model's keys, given or saved
config.update({k: model_args[k] for k in model_keys})
block_size = cfg.block_size
# the items as the tensors x, y, labels that hellaswag.evaluate scores
hellaswag_tensors = hellaswag_eval.render(hellaswag_val_items, block_size) if hellaswag else None
if cfg.n_exp == 1:
    for key, default in moe_defaults.items():
        if key in given_model_args and config[key] != default:
            print(f"warning: {key}={config[key]} has no effect with n_exp=1 (a dense model)")
if (problem := model_problem(cfg, ep_size, data_dir, splits)):
    fail(problem)
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
dropless = cfg.n_exp > 1 and min(cfg.train_capacity, cfg.eval_capacity) <= 0
if master_process and dropless and (ep_size > 1 or not use_grouped_mm(torch.device(device), ptdtype, compile,
                                                      (cfg.n_embd, cfg.expert_hidden_size))):
    print(f"warning: dropless routing here runs the experts on padded slots for all N tokens each: "
          f"n_exp/top_k = {cfg.n_exp / cfg.top_k:.1f}x the expert FLOPs and memory of the N*top_k assignments")
with torch.device('meta'):  # no memory: materialize gives each process its part of the model on its device
    model = GPT(cfg)
ep_group = replicas = None  # expert parallelism's groups, see parallel.py
if ep_size > 1:
    ep_group, replicas = split_experts(model, ep_size)
if fsdp:  # weights in dtype: with bf16 weights the residual stream is bf16 too
    model.shard(device_type, ptdtype)
torch.manual_seed(seed)  # the model's initial weights
try:
    materialize(model, device, weights, ckpt_path if init_from == 'resume' else init_from)
except ValueError as e:
    fail(e)
raw_model = model  # what we save: neither compiled nor wrapped
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))  # a no-op unless float16
peak_flops = gpu_peak_flops(device) if device_type == 'cuda' else 0.0  # 0: no MFU

# the optimizer, and the model compiled and wrapped for DDP
optimizer = configure_optimizers(model, optimizer, weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == 'resume':
    load_optimizer_state(model, optimizer, scaler, checkpoint)
checkpoint = weights = None  # free up memory
if compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)  # errors surface: nothing is suppressed
# Every expert runs every step, so DDP needs no find_unused_parameters. Each router counts its own process's
# tokens, so DDP syncs no buffers in forward: forward_sync_buffers from torch 2.13 on, broadcast_buffers before.
if ddp and not fsdp:
    ddp_ignore_experts(model)
    no_sync = next(k for k in ('forward_sync_buffers', 'broadcast_buffers')
                   if k in inspect.signature(DDP).parameters)
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None, **{no_sync: False})
if master_process:
    print(f"device {device}, dtype {dtype}, compile {compile}, {raw_model.get_num_params(non_embedding=False):,} "
          f"parameters ({raw_model.get_num_params(non_embedding=False, active=True):,} active per token), "
          f"{tokens_per_iter:,} tokens per iteration, out_dir {out_dir}")

@torch.no_grad()
def estimate_loss():
    """ Returns {split: mean loss of eval_iters batches}, with HellaSwag's scores if hellaswag. Each process
    evaluates every ddp_world_size-th batch and one all-reduce gathers the losses, so that every process gets the
    means one process computes and all decide alike whether to save. Under DDP it runs the bare module, as DDP's
    forward is for training steps. Under FSDP every process runs as many forwards (each gathers the shards), and
    a last one past eval_iters is not counted """
    out = {}
    eval_model = model.module if isinstance(model, DDP) else model
    eval_model.eval()  # eval mode: CE alone, eval capacity, no dropout or router noise
    for split in splits:
        losses = torch.zeros(eval_iters, device=device)
        batches = range(ddp_rank, math.ceil(eval_iters / ddp_world_size) * ddp_world_size, ddp_world_size)
        for k in tqdm(batches, desc=f"eval {split}", leave=False, disable=not master_process, delay=5):
            X, Y = get_batch(split, iter_num, min(k, eval_iters - 1))
            with ctx:
                logits, loss = eval_model(X, Y)
            if k < eval_iters:
                losses[k] = loss
        if ddp:
            torch.distributed.all_reduce(losses)  # each batch's loss plus zeros: exact
        out[split] = losses.mean().item()
    if hellaswag:
        out.update(hellaswag_eval.evaluate(eval_model, hellaswag_tensors, batch_size, device, ctx, ddp_rank,
                                           ddp_world_size))
    eval_model.train()
    return out

def get_lr(it):
    """ Returns the learning rate of iteration it: linear warmup, then cosine decay down to min_lr at
    lr_decay_iters """
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # >= rather than >, as the cosine below would divide 0 by 0 where warmup_iters == lr_decay_iters
    if it >= lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)

def checkpoint_status(saved_iter):
    """ Returns which iteration out_dir's checkpoint holds (saved_iter, None for none), for the closing and the
    interrupted lines """
    return f"{ckpt_path} holds iter {saved_iter}" if saved_iter is not None else "no checkpoint yet"

def stop_together(code, line, file=sys.stdout):
    """ Ends the run where every process decided to, on the same all-reduced values. Rank 0 prints line while
    the others wait at a barrier, because torchrun stops every process as soon as one exits """
    if master_process:
        print(line, file=file, flush=True)
    if ddp:
        torch.distributed.barrier()
    exit_process(code)

def stop_if_not_finite(losses, message):
    """ Ends the run if a loss is inf or nan, before anything saves it, so that the last good checkpoint stays """
    if not all(map(math.isfinite, losses)):
        stop_together(1, f"error: {message}; the last good checkpoint is kept. Last logged losses (iter, loss, "
                      f"aux, z): {run_log.recent_losses}", sys.stderr)

# the run's record (config, versions, commit) next to its log, both written by rank 0 alone
log_path = os.path.join(out_dir, 'log.jsonl')
if master_process and not eval_only:  # an eval leaves the run in out_dir, if any, as it is
    os.makedirs(out_dir, exist_ok=True)
    write_run_record(out_dir, config=config, model_args=model_args, world_size=ddp_world_size, device=device,
                     dtype=dtype)
    trim_log(log_path, iter_num)
# a log holds one run's records: the eval of another model than the run in out_dir is printed only
keeps_log = master_process and (init_from == 'resume' or not eval_only)
run_log = RunLog(log_path if keeps_log else None, iter_num, max_iters, tokens_per_iter, cfg.use_aux_loss,
                 cfg.use_router_z_loss)
if master_process and wandb_log:
    run_log.start_wandb(project=wandb_project, name=wandb_run_name, config=config)
# a Ctrl-C, seen by one process or all, only sets the flag: every process stops at the next log step
interrupted = threading.Event()
signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())

# training loop
t0 = time.time()
local_iter_num = 0  # number of iterations in the lifetime of this process
while True:
    # dropout and router noise draw from an RNG seeded by (seed, rank, iteration): resume is exact
    torch.manual_seed(seed + 1_000_003 * iter_num + ddp_rank)

    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    # evaluate and save at every eval_interval and the last iteration, outside the steps' timing
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        if device_type == 'cuda':
            torch.cuda.synchronize()  # the last step's queued work belongs to its dt, not to the eval
        t_eval = time.time()
        losses = estimate_loss()
        stop_if_not_finite([losses[s] for s in splits], f"eval loss is {losses} at iter {iter_num}")
        if master_process:
            run_log.eval(iter_num, losses, lr, train_s)
        if not eval_only and (losses['val'] < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0:
                save_checkpoint(ckpt_path, raw_model, optimizer, scaler, fsdp, model_args=model_args,
                                iter_num=iter_num, best_val_loss=best_val_loss, train_s=train_s, config=config)
                saved_iter = iter_num
        t0 += time.time() - t_eval
    if eval_only:
        break

    # forward backward update, with gradient accumulation to simulate a larger batch
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
        scaler.scale(loss).backward()
    if ep_group is not None:
        reduce_expert_grads(raw_model, replicas)
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        clip_grad_norm_(raw_model, grad_clip, ep_group)
    scale = scaler.get_scale()  # 1.0 unless float16
    scaler.step(optimizer)
    scaler.update()
    if local_iter_num == 0 and master_process:  # the memory FSDP divides by the number of processes
        local = [t.to_local() if hasattr(t, 'to_local') else t for p in raw_model.parameters()
                 for t in (p, p.grad, *optimizer.state[p].values()) if t is not None]
        megabytes = sum(t.numel() * t.element_size() for t in local) / 2**20
        print(f"weights, gradients and optimizer state: {megabytes:.3f} MiB in this process")
    optimizer.zero_grad(set_to_none=True)  # flush the gradients as soon as we can, no need for this memory anymore
    # aux-loss-free balancing (DeepSeek-V3), unless the scaler lowered its scale and so skipped the step
    raw_model.update_routing_bias(skipped=scaler.get_scale() < scale)

    # the step's time, the checks all processes make together, and the log line
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    train_s += dt
    if iter_num % log_interval == 0:
        # One all-reduce of every process's last micro-batch loss and of whether it saw a Ctrl-C, at log steps
        # alone, so that all processes stop at the same iteration, whichever of them saw the reason.
        status = torch.zeros(ddp_world_size + 1, device=device)
        status[ddp_rank], status[-1] = loss.detach(), interrupted.is_set()
        if ddp:
            torch.distributed.all_reduce(status)
        *step_losses, interrupts = status.tolist()
        step_losses = [x * gradient_accumulation_steps for x in step_losses]  # scaled back up
        stop_if_not_finite(step_losses, f"loss is {step_losses if ddp else step_losses[0]} at iter {iter_num}")
        if interrupts:
            how_to_go_on = f"continue with --init_from=resume --out_dir={out_dir}" if saved_iter is not None else \
                "start it again"
            stop_together(130, f"\ninterrupted at iter {iter_num}: {checkpoint_status(saved_iter)}; "
                               f"{how_to_go_on}")
    if iter_num % log_interval == 0 and master_process:
        fwdbwd_per_iter = batch_size * gradient_accumulation_steps
        mfu = raw_model.estimate_mfu(fwdbwd_per_iter, dt, peak_flops) if peak_flops else None
        run_log.step(dict(iter=iter_num, loss=step_losses[0], lr=lr, dt_ms=dt * 1000, train_s=train_s,
                          **MANAGER.log_record()), dt, mfu)
    iter_num += 1
    local_iter_num += 1
    if iter_num > max_iters:
        break

if master_process:
    if not eval_only:
        print(f"best val loss {best_val_loss:.4f}; {checkpoint_status(saved_iter)}; "
              f"{train_s:.0f} s of training steps, {time.time() - t_start:.0f} s in all")
    run_log.close()
if ddp:
    torch.distributed.barrier()  # the processes leave together
exit_process(0)
