"""
train.py end to end, run as a user runs it: a subprocess in a directory holding data/<dataset>/.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(SHARED_DATA, 'tinyshakespeare', 'input.txt')

TINY = ['--dataset=shakespeare_char', '--device=cpu', '--compile=False', '--eval_iters=2', '--log_interval=1',
        '--block_size=32', '--batch_size=4', '--n_layer=2', '--n_head=2', '--n_embd=32', '--warmup_iters=2',
        '--learning_rate=3e-3', '--lr_decay_iters=40', '--gradient_accumulation_steps=1']
MOE = ['--n_exp=4', '--top_k=2', '--use_aux_loss=True', '--use_router_z_loss=True']


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """ a directory with data/shakespeare_char/ as nanoGPT's char-level prepare writes it """
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"needs {SHAKESPEARE}")
    work = tmp_path_factory.mktemp('work')
    data_dir = work / 'data' / 'shakespeare_char'
    data_dir.mkdir(parents=True)
    text = open(SHAKESPEARE).read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(data_dir / 'train.bin')
    ids[n:].tofile(data_dir / 'val.bin')
    with open(data_dir / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': stoi}, f)
    return work


def train(cwd, *args, launcher=None, check=True):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, 'train.py'), *args]
    # one thread per process: tiny models gain nothing from more, and a busy machine
    # oversubscribed by OpenMP threads slows down many times over
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def logged(out_dir, key='loss'):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [(r['iter'], r[key]) for r in map(json.loads, f) if key in r]


@pytest.fixture(scope='module')
def moe_run(workdir):
    out = workdir / 'out-moe'
    return out, train(workdir, *TINY, *MOE, f'--out_dir={out}', '--max_iters=40', '--eval_interval=40')


def test_moe_training_lowers_loss_and_checkpoints_every_moe_key(moe_run):
    out, p = moe_run
    evals = logged(out, 'val_loss')
    assert evals[0][0] == 0 and evals[-1][0] == 40
    assert evals[-1][1] < evals[0][1] - 0.5  # from ~4.17 (ln 65) down
    assert 'aux 1.0' in p.stdout and 'drop' in p.stdout and 'tok/s' in p.stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['iter_num'] == 40
    from model import GPTConfig
    from dataclasses import fields
    assert set(ckpt['model_args']) == {f.name for f in fields(GPTConfig)}
    assert ckpt['model_args']['n_exp'] == 4 and ckpt['model_args']['use_aux_loss'] is True
    routing = [r['routing'] for r in map(json.loads, open(out / 'log.jsonl')) if 'routing' in r]
    assert len(routing) == 41 and set(routing[0]) == {'0'}  # block 0 of 2 is MoE
    shares, dropped = routing[-1]['0']
    assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-5 and 0 <= dropped < 1


def test_run_says_once_what_it_runs_and_at_the_end_where_its_best_model_is(moe_run):
    out, p = moe_run
    state = torch.load(out / 'ckpt.pt', weights_only=False)['model']
    total = sum(v.numel() for k, v in state.items() if k != 'lm_head.weight')  # tied to wte
    experts = sum(v.numel() for k, v in state.items() if '.experts.' in k)
    active = total - experts * (4 - 2) // 4  # each token runs top_k=2 of the n_exp=4 experts
    start = (f"device cpu, dtype float32, compile False, {total:,} parameters ({active:,} active per token), "
             f"128 tokens per iteration, out_dir {out}")  # 1 step x 4 sequences x 32 tokens
    assert p.stdout.splitlines().count(start) == 1
    best = min(v for _, v in logged(out, 'val_loss'))
    assert p.stdout.splitlines()[-1] == f"best val loss {best:.4f}; {out / 'ckpt.pt'} holds iter 40"


def test_unknown_dataset_names_the_datasets_in_data(tmp_path):
    for name in ('shakespeare_char', 'openwebtext'):
        (tmp_path / 'data' / name).mkdir(parents=True)
    p = train(tmp_path, *TINY, '--dataset=shakespear_char', check=False)
    assert p.returncode != 0
    assert p.stderr == ("error: no dataset 'shakespear_char' in data/ (it has openwebtext, shakespeare_char): "
                        "pick one, or prepare yours into data/shakespear_char/\n")
    assert not (tmp_path / 'out').exists()


def test_train_seconds_add_up_the_steps_and_leave_evals_out(moe_run):
    # log_interval=1: every step is logged, so train_s is the running sum of the logged step times
    out, _ = moe_run
    steps, train_s = logged(out, 'dt_ms'), dict(logged(out, 'train_s'))
    total = 0.0
    for i, dt_ms in steps:
        total += dt_ms / 1000
        assert abs(train_s[i] - total) < 1e-6, i
    # an eval runs before its iteration's step and records the time of the steps before it; the
    # eval at iteration 0 takes real time, which no step counts
    evals = [json.loads(line) for line in open(out / 'log.jsonl') if 'val_loss' in line]
    assert [(r['iter'], r['train_s']) for r in evals] == [(0, 0.0), (40, train_s[39])]


EVAL_TAKES_AN_HOUR = """
import os, sys, time, runpy, torch
clock = [0.0]
def fake_time():  # a clock that only evals move far
    clock[0] += 0.001
    return clock[0]
time.time = fake_time
eval_mode = torch.nn.Module.eval
def slow_eval(self):
    clock[0] += 3600.0
    return eval_mode(self)
torch.nn.Module.eval = slow_eval
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_step_time_leaves_out_the_evals(workdir):
    # the clock jumps an hour in each eval (iterations 0, 5, 10) and a millisecond per reading otherwise:
    # no step's dt, and no train_s, may hold an eval
    out = workdir / 'out-long-eval'
    train(workdir, *TINY, f'--out_dir={out}', '--max_iters=12', '--eval_interval=5', '--always_save_checkpoint=False',
          launcher=[sys.executable, '-c', EVAL_TAKES_AN_HOUR])
    dt = dict(logged(out, 'dt_ms'))
    assert sorted(dt) == list(range(13)) and max(dt.values()) < 100, dt
    assert max(t for _, t in logged(out, 'train_s')) < 1.0


def test_resume_is_exact(workdir):
    # dropout and router noise on: every random draw must replay
    args = [*TINY, *MOE, '--use_noisy_top_k=True', '--dropout=0.1', '--gradient_accumulation_steps=2',
            '--eval_interval=8', '--always_save_checkpoint=True']
    straight, split = workdir / 'out-straight', workdir / 'out-split'
    train(workdir, *args, f'--out_dir={straight}', '--max_iters=16')
    train(workdir, *args, f'--out_dir={split}', '--max_iters=8')
    with open(split / 'log.jsonl', 'a') as f:
        f.write('{"iter": 9, "lo')  # a record cut short by a crash mid-write: resume drops it too
    # model keys on the command line are ignored on resume: the checkpoint's model is used
    p = train(workdir, *args, '--n_exp=1', f'--out_dir={split}', '--max_iters=16', '--init_from=resume')
    assert 'Resuming training from' in p.stdout
    # the log reads as one run's: the first run's records from the checkpoint's iteration 8 on are dropped
    records = [json.loads(line) for line in open(split / 'log.jsonl')]
    kinds = lambda records: [(r['iter'], 'val_loss' in r) for r in records]
    assert kinds(records) == kinds(json.loads(line) for line in open(straight / 'log.jsonl'))
    reference = dict(logged(straight))
    for i, loss in logged(split):
        assert loss == reference[i], f"iter {i}: {loss} != {reference[i]}"  # bit for bit
    final = [torch.load(d / 'ckpt.pt', weights_only=False) for d in (straight, split)]
    assert final[1]['model_args']['n_exp'] == 4 and final[1]['iter_num'] == 16
    # the seconds of training go on from the checkpoint's: iteration 8 of the resumed run adds its
    # step to the 8 steps of the first run
    eval_8 = next(r for r in records if r['iter'] == 8 and 'val_loss' in r)
    step_8 = next(r for r in records if r['iter'] == 8 and 'dt_ms' in r)
    assert abs(step_8['train_s'] - eval_8['train_s'] - step_8['dt_ms'] / 1000) < 1e-6
    for k, v in final[0]['model'].items():
        assert torch.equal(v, final[1]['model'][k]), k


def test_resume_of_a_nanogpt_checkpoint(workdir):
    """ nanoGPT's checkpoints have no GradScaler state and no train_s """
    ours, theirs = workdir / 'out-ours', workdir / 'out-nanogpt'
    train(workdir, *TINY, f'--out_dir={ours}', '--max_iters=4', '--eval_interval=4')
    checkpoint = torch.load(ours / 'ckpt.pt', weights_only=False)
    nanogpt_keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')
    checkpoint = dict(model={'_orig_mod.' + k: v for k, v in checkpoint['model'].items()},  # saved compiled
                      optimizer=checkpoint['optimizer'], iter_num=checkpoint['iter_num'],
                      best_val_loss=checkpoint['best_val_loss'], config=dict(dataset='shakespeare_char'),
                      model_args={k: checkpoint['model_args'][k] for k in nanogpt_keys})
    theirs.mkdir()
    torch.save(checkpoint, theirs / 'ckpt.pt')
    train(workdir, *TINY, f'--out_dir={theirs}', '--max_iters=8', '--eval_interval=4', '--init_from=resume')
    assert torch.load(theirs / 'ckpt.pt', weights_only=False)['iter_num'] == 8


@pytest.mark.parametrize('moe', [False, True], ids=['dense', 'moe'])
def test_ddp_two_processes_match_one_process(workdir, moe):
    """ torchrun on 2 CPU processes (gloo) with accumulation 2 per process = 1 process with 4 """
    # the MoE run balances with the aux-free bias too: its update must use the loads of both processes
    moe_args = [*MOE, '--use_aux_free_bias=True', '--bias_update_speed=0.01']
    args = [*TINY, *(moe_args if moe else []), '--gradient_accumulation_steps=4', '--max_iters=3', '--eval_interval=3']
    ddp, single = workdir / f'out-ddp-{moe}', workdir / f'out-single-{moe}'
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    p = train(workdir, *args, f'--out_dir={ddp}', launcher=torchrun)
    assert p.stdout.count('saving checkpoint') == 1  # only rank 0 writes
    train(workdir, *args, f'--out_dir={single}')
    a = torch.load(ddp / 'ckpt.pt', weights_only=False)['model']
    b = torch.load(single / 'ckpt.pt', weights_only=False)['model']
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    if moe:
        assert a['transformer.h.0.mlp.router.expert_bias'].abs().sum() > 0
        # eval_only on 2 processes: the master evaluates alone, the other process exits at once
        train(workdir, *args, f'--out_dir={ddp}', '--init_from=resume', '--eval_only=True', launcher=torchrun)
        evals = logged(ddp, 'val_loss')
        assert [i for i, _ in evals] == [0, 3, 3] and evals[2][1] == evals[1][1]


def test_init_from_a_dense_run_upcycles_it(workdir):
    dense, moe = workdir / 'out-dense-src', workdir / 'out-upcycled'
    train(workdir, *TINY, f'--out_dir={dense}', '--max_iters=4', '--eval_interval=4')
    p = train(workdir, *TINY, *MOE, f'--init_from={dense}', f'--out_dir={moe}', '--max_iters=2', '--eval_interval=2')
    assert 'upcycled: every expert starts as a copy' in p.stdout
    source = torch.load(dense / 'ckpt.pt', weights_only=False)
    ckpt = torch.load(moe / 'ckpt.pt', weights_only=False)
    assert ckpt['iter_num'] == 2 and ckpt['model_args']['n_exp'] == 4  # a new run of an MoE model
    assert ckpt['model']['transformer.h.0.mlp.experts.c_fc'].shape == (4, 32, 128)
    assert 'transformer.h.0.mlp.c_fc.weight' in source['model']
    p = train(workdir, *TINY, f'--init_from={moe}', f'--out_dir={moe}', check=False)
    assert p.returncode != 0 and "init_from is out_dir" in p.stderr


def test_plots_from_a_run(workdir, moe_run):
    out, _ = moe_run
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'assets', 'plot.py'), str(out), '--labels=moe',
                        f'--out={workdir}/plots'], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    for name in ('loss.png', 'expert_load_moe.png'):
        png = workdir / 'plots' / name
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000


def test_eval_only_on_a_run_resumed_between_evals_evaluates_and_changes_nothing(workdir, moe_run):
    out, _ = moe_run
    evaluated = workdir / 'out-eval-only'
    evaluated.mkdir()
    for name in ('ckpt.pt', 'run.json'):
        (evaluated / name).write_bytes((out / name).read_bytes())
    # iteration 40 is no multiple of eval_interval=7: eval_only must still evaluate, and then stop
    p = train(workdir, *TINY, f'--out_dir={evaluated}', '--init_from=resume', '--eval_only=True',
              '--eval_interval=7', '--max_iters=60')
    records = [json.loads(line) for line in open(evaluated / 'log.jsonl')]
    assert [r['iter'] for r in records] == [40] and 'val_loss' in records[0]  # one eval, no training step
    # the weights the run evaluated at iteration 40 and the same batches: the same loss
    assert records[0]['val_loss'] == dict(logged(out, 'val_loss'))[40]
    assert 'step 40:' in p.stdout
    for name in ('ckpt.pt', 'run.json'):
        assert (evaluated / name).read_bytes() == (out / name).read_bytes(), name


def test_a_new_run_starts_its_own_log(workdir):
    # an out_dir with no checkpoint but the log of a run stopped before its first one
    out = workdir / 'out-restarted'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"iter": 0, "loss": 4.2}\n{"iter": 1, "loss": 4.1}\n')
    train(workdir, *TINY, f'--out_dir={out}', '--max_iters=2', '--eval_interval=2')
    assert [i for i, _ in logged(out)] == [0, 1, 2]


def test_ctrl_c_prints_one_line_on_how_to_resume(workdir):
    out = workdir / 'out-interrupted'
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *TINY, f'--out_dir={out}', '--max_iters=100000',
           '--eval_interval=5']
    p = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    while not (out / 'ckpt.pt').exists() and p.poll() is None:  # a checkpoint, then Ctrl-C
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130
    assert 'Traceback' not in stderr, stderr
    saved = torch.load(out / 'ckpt.pt', weights_only=False)['iter_num']
    assert stdout.strip().splitlines()[-1].endswith(
        f"{out}/ckpt.pt holds iter {saved}; continue with --init_from=resume --out_dir={out}")


def test_odd_sizes_train_and_dropless_on_padded_slots_warns(workdir):
    # rows of 30 floats are no multiple of 16 bytes: the experts run as a padded batched matmul, which
    # dropless sizes for every token on every expert
    out = workdir / 'out-odd'
    p = train(workdir, *TINY, *MOE, '--n_embd=30', '--n_head=3', '--expert_hidden=30', '--train_capacity=0',
              f'--out_dir={out}', '--max_iters=3', '--eval_interval=3')
    assert torch.load(out / 'ckpt.pt', weights_only=False)['iter_num'] == 3
    assert p.stdout.count('warning: dropless routing here runs the experts on padded slots') == 1
    assert 'n_exp/top_k = 2.0x the expert FLOPs' in p.stdout
