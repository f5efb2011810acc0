"""
train.py with fsdp=True (FSDP2): torchrun on 2 CPU processes (gloo), run as a user runs it.
"""
import os
import re
import sys

import pytest
import torch

from conftest import ROOT, TORCHRUN, TINY, MOE, train, logged, assert_muon_runs_agree, run_python

AUX_FREE = ['--use_aux_free_bias=True', '--bias_update_speed=0.01']


def state_mib(stdout):
    """ the bytes of weights, gradients and optimizer state the master holds, as train.py prints them """
    return float(re.search(r"weights, gradients and optimizer state: ([\d.]+) MiB", stdout).group(1))


def test_fsdp_two_processes_match_one_process_on_half_the_memory(workdir):
    """ accumulation 2 per process (the first micro-step unsynced) = 1 process with 4, in weights, Muon's
    and AdamW's state, the aux-free routing bias and eval loss; each process holds half the state. Muon
    orthogonalises each sharded matrix gathered whole, each expert in the shard of its stack """
    # eval_iters 3: 2 forwards each, rank 1's second, past eval_iters, keeps the gathers in step
    args = [*TINY, *MOE, *AUX_FREE, '--gradient_accumulation_steps=4', '--max_iters=3', '--eval_interval=3',
            '--eval_iters=3', '--optimizer=muon']
    fsdp, single = workdir / 'out-fsdp', workdir / 'out-fsdp-single'
    p = train(workdir, *args, '--fsdp=True', f'--out_dir={fsdp}', launcher=TORCHRUN)
    assert p.stdout.count('saving checkpoint') == 1  # only rank 0 writes
    q = train(workdir, *args, f'--out_dir={single}')
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (fsdp, single))
    assert set(a['model']) == set(b['model'])
    # the layout of optimizer.state_dict(): parameters by index, in the same groups
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    assert set(a['optimizer']['state']) == set(b['optimizer']['state'])
    assert_muon_runs_agree(fsdp, single)
    assert a['model']['transformer.h.0.mlp.router.expert_bias'].abs().sum() > 0
    (_, val_a), (_, val_b) = logged(fsdp, 'val_loss')[-1], logged(single, 'val_loss')[-1]
    assert abs(val_a - val_b) < 1e-4
    # rank 0's shard: half of every tensor, rounded up a row where a first dimension is odd
    assert 0.5 <= state_mib(p.stdout) / state_mib(q.stdout) < 0.52


def test_fsdp_resume_is_exact_and_its_checkpoints_resume_on_one_process_and_sample(workdir):
    # dropout and router noise on: every random draw must replay, on each process
    args = [*TINY, *MOE, *AUX_FREE, '--use_noisy_top_k=True', '--dropout=0.1', '--gradient_accumulation_steps=4',
            '--eval_interval=4']
    straight, split = workdir / 'out-fsdp-straight', workdir / 'out-fsdp-split'
    train(workdir, *args, '--fsdp=True', f'--out_dir={straight}', '--max_iters=8', launcher=TORCHRUN)
    train(workdir, *args, '--fsdp=True', f'--out_dir={split}', '--max_iters=4', launcher=TORCHRUN)
    train(workdir, *args, '--fsdp=True', f'--out_dir={split}', '--max_iters=8', '--init_from=resume', launcher=TORCHRUN)
    reference = dict(logged(straight))
    assert [i for i, _ in logged(split)] == list(range(9))  # the first run's iteration 4 is done again, once
    for i, loss in logged(split):
        assert loss == reference[i], f"iter {i}: {loss} != {reference[i]}"  # bit for bit
    final = [torch.load(d / 'ckpt.pt', weights_only=True) for d in (straight, split)]
    for k, v in final[0]['model'].items():
        assert torch.equal(v, final[1]['model'][k]), k
    # the FSDP checkpoint resumes on one process, and that one's under FSDP again
    train(workdir, *args, f'--out_dir={split}', '--max_iters=12', '--init_from=resume')
    train(workdir, *args, '--fsdp=True', f'--out_dir={split}', '--max_iters=16', '--init_from=resume', launcher=TORCHRUN)
    assert torch.load(split / 'ckpt.pt', weights_only=True)['iter_num'] == 16
    assert [i for i, _ in logged(split, 'val_loss')] == [0, 4, 8, 12, 16]  # a resume evaluates first, in place of the eval it repeats
    p = run_python([sys.executable, os.path.join(ROOT, 'sample.py'), f'--out_dir={split}', '--device=cpu',
                    '--num_samples=1', '--max_new_tokens=40'], workdir, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.strip()) >= 40  # 40 characters of a char-level model, decoded with its meta.pkl


def test_fsdp_without_torchrun_stops_with_one_line(workdir):
    p = train(workdir, *TINY, '--fsdp=True', f'--out_dir={workdir / "out-fsdp-alone"}', check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith('error: fsdp=True shards the model')
    assert not (workdir / 'out-fsdp-alone').exists()
