"""
Speed and memory of the GPT and of its MoE layer: nanoGPT's bench.py, MoE-aware. Examples:
$ python bench.py                               # training steps of GPT-2 small with MoE: ms, tok/s, MFU, memory
$ python bench.py --mode=layer --device=cpu --compile=False --batch_size=8 --block_size=256 --n_embd=256 --n_head=4
    # the MoE layer's forward+backward against the earlier nanoMoE's one-hot formulation and a loop over experts
$ python bench.py --mode=step --device=cpu --compile=False --real_data=False --vocab_size=65 --batch_size=12 \
    --block_size=64 --n_layer=4 --n_head=4 --n_embd=128 --optimizer=adamw,muon
    # a whole training step (forward, backward, optimizer) of the MoE model against the dense model of the same
    # shape and the dense model of the same FLOPs, with each optimizer, and the optimizer's share of the step;
    # --profile=True adds each op's time per step (MoE, dense-eq, with the first optimizer)
$ OMP_NUM_THREADS=1 python bench.py --mode=sample --device=cpu --compile=False --dtype=float32 --vocab_size=65 \
    --batch_size=1 --block_size=256 --n_layer=6 --n_head=6 --n_embd=384 --num_steps=3
    # greedy generate (key/value cache) against nanoGPT's loop that recomputes the whole context, dense and MoE
Timings are medians over num_steps; the formulations or models compared run interleaved, step by step,
so that a busy machine slows them alike.
"""
import os
import sys
import time
import functools
import statistics
from contextlib import nullcontext
from dataclasses import fields

# kineto, which every torch profiler starts (the CPU memory measurement below included), logs each
# start and stop at its USDT level, which is above ERROR: only a level past all of them (6) keeps
# the output to the results. KINETO_LOG_LEVEL=3 in the environment shows its errors.
os.environ.setdefault('KINETO_LOG_LEVEL', '6')
import numpy as np
import torch
import torch.nn.functional as F

from model import GPTConfig, GPT, MLP
from machine import gpu_peak_flops, pick_device
from manager import MANAGER
from optim import configure_optimizers
from tokenizer import dataset_dir, load_char_meta

# -----------------------------------------------------------------------------
# 'model': training steps; 'layer': MoE layer vs baselines; 'step': dense vs MoE; 'sample': generate
mode = 'model'
batch_size = 12  # sequences per forward
block_size = 1024  # tokens per sequence
real_data = True  # True: batches from data/<dataset>/train.bin; False: random tokens
dataset = 'openwebtext'
vocab_size = 50304  # of the random tokens; real data takes data/<dataset>/meta.json's if it has one
seed = 1337
device = ''  # '' picks cuda if there, else mps, else cpu. Or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = ''  # '' picks bfloat16 where CUDA supports it, else float16 on CUDA, float32 elsewhere
compile = torch.cuda.is_available()  # torch.compile what is timed (pays off on CUDA)
profile = False  # 'model': write a torch.profiler trace to ./bench_log; 'step': also print the step's time per op
num_steps = 20  # timed steps, after 10 to warm up
prompt_len = 16  # mode='sample': prompt tokens per sequence
max_new_tokens = 200  # mode='sample': tokens generated per sequence
peak_flops = 0.0  # device peak in FLOP/s for MFU; 0: looked up for known GPUs, no MFU on CPU
optimizer = 'adamw'  # 'adamw' or 'muon' (optim.py); mode='step' times each of a list: 'adamw,muon'
# model: GPT-2 small with an MoE MLP in every other block (the keys and meaning of GPTConfig)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
n_exp = 8
top_k = 2
stride = 2
expert_hidden = 0
train_capacity = 1.25
use_aux_loss = True
use_router_z_loss = True
use_switch_tfm_init = True
router_use_full_prec = True
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

if mode not in ('model', 'layer', 'step', 'sample'):
    sys.exit(f"error: mode='{mode}' is not 'model', 'layer', 'step' or 'sample'")
if profile and mode not in ('model', 'step'):
    sys.exit(f"error: profile=True profiles mode='model' or 'step', not mode='{mode}'")
if mode != 'model' and n_exp < 2:
    sys.exit(f"error: mode='{mode}' measures an MoE model: set --n_exp to 2 or more")
if mode == 'sample' and not (1 <= prompt_len <= block_size and max_new_tokens >= 1):
    sys.exit(f"error: mode='sample' needs 1 <= prompt_len <= block_size and max_new_tokens >= 1, "
             f"got prompt_len={prompt_len}, block_size={block_size}, max_new_tokens={max_new_tokens}")
if mode == 'layer' and dropout > 0:
    sys.exit(f"error: mode='layer' first checks that the formulations agree, which dropout={dropout} prevents: "
             "leave dropout at 0")
if not set(optimizer.split(',')) <= {'adamw', 'muon'} or (mode != 'step' and ',' in optimizer):
    sys.exit(f"error: optimizer='{optimizer}' is not 'adamw' or 'muon' (mode='step': or both, 'adamw,muon')")
if dtype not in ('', 'float32', 'bfloat16', 'float16'):
    sys.exit(f"error: dtype='{dtype}' is not one of float32, bfloat16, float16 ('' picks one for the device)")
torch.manual_seed(seed)
device, device_type, dtype = pick_device(device, dtype)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
# every speed figure depends on the threads the CPU work gets (OMP_NUM_THREADS; by default one per core)
print(f"{device}, {dtype}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")

# data: uint16 token ids as written by data/<dataset>/prepare.py, or random tokens
if real_data and mode in ('model', 'step'):
    try:
        data_dir = dataset_dir(dataset)
        meta = load_char_meta(data_dir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    train_path = os.path.join(data_dir, 'train.bin')
    if not os.path.exists(train_path):
        sys.exit(f"error: {train_path} not found: run python data/{dataset}/prepare.py first, "
                 "or use --real_data=False")
    train_data = np.memmap(train_path, dtype=np.uint16, mode='r')
    vocab_size = meta['vocab_size'] if meta else vocab_size

    def get_batch():
        ix = torch.randint(len(train_data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(train_data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train_data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        if device_type == 'cuda':
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
else:
    X, Y = (torch.randint(vocab_size, (batch_size, block_size), device=device) for _ in range(2))
    get_batch = lambda: (X, Y)

model_args = {f.name: globals()[f.name] for f in fields(GPTConfig) if f.name in globals()}  # the keys set above
try:
    GPTConfig(**model_args)
except ValueError as e:
    sys.exit(f"error: {e}")

if not peak_flops and device_type == 'cuda':
    peak_flops = gpu_peak_flops(device)


def timed(fn):
    """ seconds that fn() takes; the GPU is waited for only around it """
    if device_type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device_type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_memory(fn):
    """ Bytes allocated at the peak of fn() beyond those held when it starts. CPU torch keeps no
    allocation counters (and tracemalloc does not see its allocator), so on CPU this replays the
    profiler's record of every allocation and free (profile_memory=True) in time order. Each op's net
    allocation counts at its start, so the transients inside one op are missed; those are small.
    The autograd profiler without kineto records the same and starts in ms, not seconds. """
    if device_type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - start
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.function_events, key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def make_model(n_exp, flop_equivalent=False, optimizer=optimizer):
    """ flop_equivalent: the dense model with the MoE's active FLOPs, its MLPs in the MoE's
    blocks top_k experts wide """
    model = GPT(GPTConfig(**{**model_args, 'n_exp': n_exp}))
    if flop_equivalent:
        for block in model.transformer.h[::stride]:
            block.mlp = MLP(model.config, top_k * model.config.expert_hidden_size)
    model.to(device)
    optimizer = configure_optimizers(model, optimizer, weight_decay=1e-2, learning_rate=1e-4, betas=(0.9, 0.95),
                                     device_type=device_type)
    return model, torch.compile(model) if compile else model, optimizer


def train_step(model, optimizer, X, Y):
    """ one training step; returns the seconds of its optimizer.step """
    with ctx:
        _, loss = model(X, Y)
    loss.backward()
    optimizer_s = timed(optimizer.step)
    # free what the step made before it returns, so that peak_memory sees it all come and go
    optimizer.zero_grad(set_to_none=True)
    MANAGER.reset()
    return optimizer_s


def step_flops(model):
    """ FLOPs of one training step on the active parameters (estimate_mfu at dt = 1 s, peak = 1 FLOP/s) """
    return model.estimate_mfu(batch_size, 1.0, peak_flops=1.0)


# -----------------------------------------------------------------------------
# Baselines for mode='layer': the same router, capacity and experts as MOELayer (the router's top-k
# and gates, slots filled choice-major, drops not renormalised), dispatched in two other ways.

def onehot_moe(layer, x):
    """ The earlier nanoMoE: a one-hot (N, E, cap) dispatch mask and combine weights, applied as matmuls
    over all N tokens for every slot: O(N * E * cap) = O(N^2) memory and FLOPs. """
    B, T, C = x.size()
    N, E, k = B * T, layer.n_exp, layer.top_k
    x = x.view(N, C)
    gates, topk_idx, _ = layer.router(x)  # (N, k), (N, k)
    cap = layer.capacity(N)
    chose = F.one_hot(topk_idx.t(), E)  # (k, N, E) choice j of token t is expert e
    rank = chose.reshape(k * N, E).cumsum(0).view(k, N, E) - 1  # (k, N, E) slot in e, choice-major
    chose = chose * (rank < cap)  # drop what overflows
    slot = (chose * rank).sum(-1)  # (k, N)
    weight = chose * gates.t().unsqueeze(-1)  # (k, N, E)
    combine = (weight.unsqueeze(-1) * F.one_hot(slot, cap).unsqueeze(2)).sum(0)  # (N, E, cap)
    dispatch = combine.bool().to(x.dtype)  # (N, E, cap)
    x_in = dispatch.view(N, E * cap).t() @ x  # (E*cap, C)
    out = layer.experts(x_in)  # (E*cap, C), the padded layout
    return (combine.view(N, E * cap).to(out.dtype) @ out).view(B, T, C)


def loop_moe(layer, x):
    """ A Python loop over experts: each takes its first cap assignments in choice-major order, runs
    on them alone, and adds its gated outputs back to their tokens. """
    B, T, C = x.size()
    N, E = B * T, layer.n_exp
    x = x.view(N, C)
    gates, topk_idx, _ = layer.router(x)
    cap = layer.capacity(N)
    expert_of, gate_of = topk_idx.t().reshape(-1), gates.t().reshape(-1)  # (k*N,) assignment a = j*N + t
    ex = layer.experts
    y = torch.zeros_like(x)
    for e in range(E):
        a = torch.nonzero(expert_of == e).squeeze(1)[:cap]  # (kept,) its assignments, first choices first
        t = a % N
        h = x[t] @ ex.c_fc[e]
        if ex.fc_bias is not None:
            h = h + ex.fc_bias[e]
        h = F.gelu(h) @ ex.c_proj[e]
        if ex.proj_bias is not None:
            h = h + ex.proj_bias[e]
        y = y.index_add(0, t, (h * gate_of[a, None]).to(y.dtype))
    return y.view(B, T, C)


# -----------------------------------------------------------------------------
if mode == 'model':
    raw_model, model, optimizer = make_model(n_exp)
    if profile:
        # the torch profiler: https://pytorch.org/tutorials/intermediate/tensorboard_profiler_tutorial.html
        wait, warmup, active = 5, 5, 5
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device_type == 'cuda':
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
        with torch.profiler.profile(activities=activities, schedule=schedule,
                                    on_trace_ready=torch.profiler.tensorboard_trace_handler('./bench_log'),
                                    record_shapes=False, profile_memory=False, with_stack=False,
                                    with_flops=True) as prof:
            for _ in range(wait + warmup + active):
                train_step(model, optimizer, *get_batch())
                prof.step()
        print("wrote the trace to ./bench_log")
    else:
        for _ in range(10):  # warm up (and compile)
            train_step(model, optimizer, *get_batch())
        times, optimizer_times = [], []
        for _ in range(num_steps):
            X, Y = get_batch()
            times.append(timed(lambda: optimizer_times.append(train_step(model, optimizer, X, Y))))
        dt = statistics.median(times)
        mfu = "MFU n/a (set --peak_flops)"
        if peak_flops:
            mfu = f"MFU {raw_model.estimate_mfu(batch_size, dt, peak_flops) * 100:.2f}%"
        print(f"time per iteration: {dt * 1000:.2f}ms, {batch_size * block_size / dt:,.0f} tok/s, {mfu}")
        print(f"optimizer.step: {statistics.median(optimizer_times) * 1000:.2f}ms, "
              f"{statistics.median(optimizer_times) / dt:.1%} of the iteration")
        held = sum(t.numel() * t.element_size() for t in [*raw_model.parameters(),
                   *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))])
        X, Y = get_batch()
        print(f"peak memory of a step: {peak_memory(lambda: train_step(model, optimizer, X, Y)) / 2**20:.1f} MiB "
              f"beyond the {held / 2**20:.1f} MiB of weights and optimizer state")

elif mode == 'step':
    models = {(name, opt): make_model(n, eq, opt) for opt in optimizer.split(',')
              for name, n, eq in (('dense', 1, False), ('dense-eq', 1, True), ('moe', n_exp, False))}
    for _ in range(10):
        for _, model, opt in models.values():
            train_step(model, opt, *get_batch())
    times, optimizer_times = {key: [] for key in models}, {key: [] for key in models}
    for _ in range(num_steps):
        for key, (_, model, opt) in models.items():
            X, Y = get_batch()
            times[key].append(timed(lambda: optimizer_times[key].append(train_step(model, opt, X, Y))))
    dt = {key: statistics.median(t) for key, t in times.items()}
    flops = {key: step_flops(raw_model) for key, (raw_model, _, _) in models.items()}
    for key in models:
        share = statistics.median(optimizer_times[key]) / dt[key]
        print(f"{' '.join(key):>14}: {dt[key] * 1000:8.2f} ms/step, {batch_size * block_size / dt[key]:9,.0f} "
              f"tok/s, {flops[key] / 1e9:.2f} GFLOP/step, optimizer {share:.1%}")
    for opt in optimizer.split(','):
        moe, dense, dense_eq = ((name, opt) for name in ('moe', 'dense', 'dense-eq'))
        print(f"{opt} moe/dense: time {dt[moe] / dt[dense]:.3f}x, FLOPs {flops[moe] / flops[dense]:.3f}x; "
              f"moe/dense-eq: time {dt[moe] / dt[dense_eq]:.3f}x, FLOPs {flops[moe] / flops[dense_eq]:.3f}x")
    if profile:
        # where the MoE step's time beyond dense-eq's goes: each op's own time (children excluded), ms per step
        op_ms = {}
        for name in ('dense-eq', 'moe'):
            _, model, opt = models[(name, optimizer.split(',')[0])]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(num_steps):
                    train_step(model, opt, *get_batch())
            op_ms[name] = {e.key: (e.self_cpu_time_total / 1e3 / num_steps, e.count // num_steps)
                           for e in prof.key_averages()}
        ops = sorted(op_ms['dense-eq'].keys() | op_ms['moe'].keys(),
                     key=lambda op: -abs(op_ms['moe'].get(op, (0, 0))[0] - op_ms['dense-eq'].get(op, (0, 0))[0]))
        print(f"CPU time per op and step (ms, calls), {torch.get_num_threads()} threads, "
              "largest differences first")
        print(f"{'op':>40} {'dense-eq':>14} {'moe':>14}")
        for op in ops[:20]:
            (d_ms, d_n), (m_ms, m_n) = op_ms['dense-eq'].get(op, (0, 0)), op_ms['moe'].get(op, (0, 0))
            print(f"{op[:40]:>40} {d_ms:8.2f} ({d_n:3d}) {m_ms:8.2f} ({m_n:3d})")
        total = {name: [sum(column) for column in zip(*op_ms[name].values())] for name in op_ms}  # ms, calls
        print(f"{'all ops':>40} {total['dense-eq'][0]:8.2f} ({total['dense-eq'][1]:3d}) "
              f"{total['moe'][0]:8.2f} ({total['moe'][1]:3d})")

elif mode == 'sample':
    # eval_capacity 0: model(idx) routes dropless, as generate does, so both compute the same tokens
    models = {name: GPT(GPTConfig(**{**model_args, 'n_exp': n, 'eval_capacity': 0})).to(device).eval()
              for name, n in (('dense', 1), ('moe', n_exp))}
    if compile:
        for model in models.values():
            model.compile()  # in place, as sample.py does: generate calls self(...)
    prompt = torch.randint(vocab_size, (batch_size, prompt_len), device=device)

    def recompute(model):
        """ nanoGPT's generate, greedy: the whole context, cropped to block_size, through the model for every
        token """
        idx = prompt
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])
            idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        return idx

    def cached(model):
        return model.generate(prompt, max_new_tokens, top_k=1)

    runs = {(name, kind): functools.partial(fn, model) for name, model in models.items()
            for kind, fn in (('cached', cached), ('recompute', recompute))}
    with torch.no_grad(), ctx:
        tokens = {key: run() for key, run in runs.items()}  # and warm up (and compile)
        times = {key: [] for key in runs}
        for _ in range(num_steps):
            for key, run in runs.items():
                times[key].append(timed(run))
    print(f"greedy generate, batch {batch_size}, prompt {prompt_len}, {max_new_tokens} new tokens, "
          f"block_size {block_size}, {dtype}, tokens/s:")
    for name in models:
        speed = {kind: batch_size * max_new_tokens / statistics.median(times[name, kind])
                 for kind in ('cached', 'recompute')}
        same = (tokens[name, 'cached'] == tokens[name, 'recompute'])[:, prompt_len:].float().mean().item()
        print(f"{name:>6}: cached {speed['cached']:8.1f}, recompute {speed['recompute']:8.1f}, "
              f"{speed['cached'] / speed['recompute']:5.2f}x; {same:.1%} of the tokens the same")

else:  # mode == 'layer'
    layer = GPT(GPTConfig(**{**model_args, 'n_layer': 1})).transformer.h[0].mlp.to(device)  # GPT's init
    formulations = {'ours': lambda layer, x: layer(x), 'one-hot': onehot_moe, 'loop': loop_moe}

    def fwd_bwd(fn, x, grad):
        def run():
            with ctx:
                y = fn(layer, x)
            y.backward(grad)
            x.grad = None  # free what run made, as train_step does
            layer.zero_grad(set_to_none=True)
            MANAGER.reset()
        return run

    # the three agree (float32, at this config) on outputs and input gradients
    x = torch.randn(batch_size, block_size, n_embd, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    results = {}
    for name, fn in formulations.items():
        y = fn(layer, x)
        if name == 'ours':
            dropped = MANAGER.routing[0][1].item()  # the baselines record no routing stats
        y.backward(grad)
        results[name] = (y.detach(), x.grad)
        x.grad = None
        MANAGER.reset()
    tol = 1e-5 if device_type == 'cpu' else 1e-2  # CUDA: TF32 matmuls round differently in each formulation
    for name in ('one-hot', 'loop'):
        diff = max((a - b).abs().max().item() / b.abs().max().item()
                   for a, b in zip(results[name], results['ours']))
        print(f"check: {name} agrees with ours to {diff:.1e} (relative, outputs and input grads), "
              f"{dropped:.1%} dropped")
        if diff > tol:
            sys.exit(f"error: {name} disagrees with ours by {diff:.1e} > {tol:.0e}")

    runs = {name: fwd_bwd(torch.compile(fn) if compile else fn, x, grad) for name, fn in formulations.items()}
    for _ in range(10):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(num_steps):
        for name, run in runs.items():
            times[name].append(timed(run))
    dt = {name: statistics.median(t) for name, t in times.items()}
    N = batch_size * block_size
    print(f"MoE layer fwd+bwd, N={N} tokens, C={n_embd}, E={n_exp}, k={top_k}, cap={layer.capacity(N)}, {dtype}:")
    for name, run in runs.items():
        print(f"{name:>8}: {dt[name] * 1000:8.2f} ms, {dt[name] / dt['ours']:5.2f}x ours, "
              f"peak memory {peak_memory(run) / 2**20:8.2f} MiB")
    print("peak memory (MiB, weight gradients included) vs tokens:")
    for B in [max(1, batch_size // 4) * 2**i for i in range(4)]:
        x = torch.randn(B, block_size, n_embd, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        ours, onehot = (peak_memory(fwd_bwd(formulations[name], x, grad)) / 2**20 for name in ('ours', 'one-hot'))
        print(f"N={B * block_size:6d}: ours {ours:8.2f}, one-hot {onehot:8.2f}")
