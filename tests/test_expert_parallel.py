"""
train.py with ep_size=2 (expert parallelism beside DDP or FSDP): torchrun on 2 and 4 CPU processes (gloo), run as
a user runs it, against one process with the same global batch; and the checkpoint's gather of the experts.
"""
import copy
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TORCHRUN, TINY, MOE, train, logged, assert_muon_runs_agree, run_python

TORCHRUN_4 = [*TORCHRUN[:-1], '--nproc_per_node=4']  # two EP groups of 2: the replicas' all-reduce runs
# accumulation 2 per process under torchrun, 4 on one process; a clip that acts (its norm counts every expert)
ARGS = [*TINY, '--gradient_accumulation_steps=4', '--grad_clip=0.1']


def settings(group):
    """ a param group's settings but its kernels (FSDP beside expert parallelism runs AdamW tensor by
    tensor); betas as a tuple (FSDP's state-dict functions load a list) """
    return {k: tuple(v) if k == 'betas' else v for k, v in group.items() if k not in ('fused', 'foreach')}


def assert_same_run(a, b):
    """ two out_dirs' checkpoints hold the same weights and optimizer state, within float32 rounding """
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (a, b))
    assert set(a['model']) == set(b['model'])
    for k in b['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-6, rtol=1e-5, msg=k)
    groups = [list(map(settings, run['optimizer']['param_groups'])) for run in (a, b)]
    assert groups[0] == groups[1]
    for i, state in b['optimizer']['state'].items():
        for name, value in state.items():
            torch.testing.assert_close(a['optimizer']['state'][i][name], value, atol=1e-6, rtol=1e-5,
                                       msg=f'{i} {name}')


def assert_same_evals(a, b, tolerance=1e-5):
    (iters_a, val_a), (iters_b, val_b) = zip(*logged(a, 'val_loss')), zip(*logged(b, 'val_loss'))
    assert iters_a == iters_b
    assert max(abs(x - y) for x, y in zip(val_a, val_b)) < tolerance


def test_ep_on_4_processes_matches_one_process_holding_half_the_experts(workdir):
    """ 4 processes, 2 EP groups of 2 (each expert's gradient summed over its 2 replicas): top-2 with a capacity
    that drops, a shared expert, the aux and z losses and the aux-free bias: the same weights, AdamW state,
    routing biases and eval losses as one process; each holds half the experts """
    args = [*ARGS, *MOE, '--train_capacity=0.5', '--n_shared_exp=1', '--expert_hidden=64',
            '--use_aux_free_bias=True', '--bias_update_speed=0.01', '--max_iters=3', '--eval_interval=3',
            '--eval_iters=4']
    ep, single = workdir / 'out-ep', workdir / 'out-ep-single'
    p = train(workdir, *args, '--ep_size=2', f'--out_dir={ep}', launcher=TORCHRUN_4)
    assert p.stdout.count('saving checkpoint') == 1  # only rank 0 writes
    q = train(workdir, *args, f'--out_dir={single}')
    assert_same_run(ep, single)
    assert_same_evals(ep, single)
    state = torch.load(single / 'ckpt.pt', weights_only=True)['model']
    assert state['transformer.h.0.mlp.router.expert_bias'].abs().sum() > 0
    assert re.search(r"drop [1-9]", q.stdout)  # the capacity dropped assignments
    # weights, gradients and AdamW's two moments of half the experts fewer, in the MiB train.py prints
    expert_numel = sum(v.numel() for k, v in state.items() if '.experts.' in k and 'shared' not in k)
    mib = [float(re.search(r"optimizer state: ([\d.]+) MiB", r.stdout).group(1)) for r in (p, q)]
    assert abs((mib[1] - mib[0]) - 4 * 4 * expert_numel / 2 / 2**20) < 0.002


def test_ep_resumes_across_one_process_and_samples(workdir):
    """ top-1 dropless, Muon: an EP run with FSDP resumes under EP, its checkpoint on one process, that one's
    under EP with FSDP, and the run equals one process's straight run; its checkpoint samples """
    args = [*ARGS, '--n_exp=4', '--top_k=1', '--train_capacity=0', '--eval_capacity=0', '--eval_interval=2',
            '--optimizer=muon']
    ep, single = workdir / 'out-ep-resume', workdir / 'out-ep-resume-single'
    train(workdir, *args, '--ep_size=2', '--fsdp=True', f'--out_dir={ep}', '--max_iters=2', launcher=TORCHRUN)
    resume = ['--init_from=resume', f'--out_dir={ep}']
    train(workdir, *args, *resume, '--ep_size=2', '--max_iters=4', launcher=TORCHRUN)
    train(workdir, *args, *resume, '--max_iters=6')
    train(workdir, *args, *resume, '--ep_size=2', '--fsdp=True', '--max_iters=8', launcher=TORCHRUN)
    train(workdir, *args, f'--out_dir={single}', '--max_iters=8')
    assert [i for i, _ in logged(ep, 'val_loss')] == [0, 2, 4, 6, 8]
    assert_muon_runs_agree(ep, single)
    assert_same_evals(ep, single, tolerance=1e-4)
    p = run_python([sys.executable, os.path.join(ROOT, 'sample.py'), f'--out_dir={ep}', '--device=cpu',
                    '--num_samples=1', '--max_new_tokens=40'], workdir, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.strip()) >= 40


def test_ep_checkpoint_sends_the_experts_to_rank_0_alone(monkeypatch):
    """ gather_experts on each of 4 processes with ep_size=2, torch.distributed replaced by a stand-in that runs
    their collectives in one process and fails on any but gather: only rank 0's EP group (ranks 0, 1) sends,
    from the CPU, to rank 0 alone, which gets every expert and every optimizer state tensor shaped like one whole
    (AdamW's moments, and a momentum like Muon's) """
    import parallel
    from model import GPT, GPTConfig, MOELayer
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=64, n_exp=4, stride=1, bias=True)
    whole = GPT(config)
    state = lambda p: {'step': torch.tensor(3.0), 'exp_avg': 2 * p.detach(), 'exp_avg_sq': p.detach() ** 2,
                       'momentum_buffer': p.detach() + 1}

    class Dist:
        def __init__(self, rank):
            self.rank, self.sent = rank, []

        def get_rank(self):
            return self.rank

        def gather(self, t, parts, dst, group):
            assert dst == 0 and t.device.type == 'cpu' and (parts is None) == (self.rank != 0)
            self.sent.append(t)
            if parts is not None:  # rank 1's tensor of the same call: it ran first
                parts[0].copy_(t)
                parts[1].copy_(processes[1].sent[len(self.sent) - 1])

    processes = {rank: Dist(rank) for rank in (3, 2, 1, 0)}  # rank 0 last: it receives what rank 1 sent
    for rank, fake in processes.items():
        model = copy.deepcopy(whole)
        group = SimpleNamespace(size=lambda: 2, rank=lambda r=rank % 2: r)  # EP groups {0, 1} and {2, 3}
        for layer in model.modules():
            if isinstance(layer, MOELayer):
                layer.ep_group = group
                for name, p in list(layer.experts.named_parameters()):  # experts 2r, 2r + 1 of 4
                    setattr(layer.experts, name, torch.nn.Parameter(p.detach().chunk(2)[rank % 2].clone()))
        optimizer = SimpleNamespace(state={p: state(p) for p in model.parameters()})
        monkeypatch.setattr(parallel, 'dist', fake)
        weights, states = parallel.gather_experts(model, optimizer)
        assert len(fake.sent) == (0 if rank >= 2 else 2 * 4 * 4)  # 2 layers: 4 expert tensors, 3 states of each
        if rank != 0:
            assert weights == {} and states == {}
    expected = {n: p for n, p in whole.named_parameters() if '.experts.' in n}
    assert set(weights) == set(expected) and len(expected) == 4 * 2
    for name, p in expected.items():
        torch.testing.assert_close(weights[name], p.detach(), rtol=0, atol=0)
        for key, value in state(p).items():
            torch.testing.assert_close(states[name][key], value, rtol=0, atol=0)


@pytest.mark.parametrize('args, launcher, message', [
    (['--ep_size=2'], None, 'error: ep_size=2 splits the experts over the processes torchrun starts'),
    (['--ep_size=3'], TORCHRUN, 'error: ep_size=3 does not divide the 2 processes'),
    (['--ep_size=2', '--n_exp=3', '--top_k=1', '--gradient_accumulation_steps=2'], TORCHRUN,
     'error: n_exp=3 is not divisible by ep_size=2'),
], ids=['no-torchrun', 'processes', 'n_exp'])
def test_ep_bad_input_stops_with_one_line(workdir, args, launcher, message):
    out = workdir / 'out-ep-bad'
    p = train(workdir, *TINY, *args, f'--out_dir={out}', launcher=launcher, check=False)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
    assert errors and errors[0].startswith(message), p.stderr
    assert not out.exists()


def test_ep_with_a_backend_without_gloo_stops_with_one_line():
    from parallel import parallel_setup_problem
    assert parallel_setup_problem(False, 2, True, 2, 'bfloat16', 'cpu:gloo,cuda:nccl') is None
    problem = parallel_setup_problem(False, 2, True, 2, 'bfloat16', 'nccl')
    assert problem.startswith("ep_size > 1 saves its experts through host memory, which backend='nccl' cannot")
