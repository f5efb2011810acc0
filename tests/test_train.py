"""
train.py end to end, run as a user runs it: a subprocess in a directory holding data/<dataset>/.
Runs that several tests read are module fixtures: one run, an assertion per test.
"""
import json
import os
import re
import sys
from dataclasses import fields

import pytest
import torch

from conftest import ROOT, TORCHRUN, TINY, MOE, train, logged, run_python

from model import GPTConfig


@pytest.fixture(scope='module')
def moe_run(workdir):
    """ 40 iterations of an MoE model, every step logged, evaluated at 0 and 40 """
    out = workdir / 'out-moe'
    return out, train(workdir, *TINY, *MOE, f'--out_dir={out}', '--max_iters=40', '--eval_interval=40')


def test_moe_training_lowers_the_val_loss(moe_run):
    out, _ = moe_run
    evals = logged(out, 'val_loss')
    assert evals[0][0] == 0 and evals[-1][0] == 40
    assert evals[-1][1] < evals[0][1] - 0.5  # from ~4.17 (ln 65) down


def test_a_run_evaluates_and_saves_its_last_iteration_once(dense_run, moe_run):
    # max_iters=7 no multiple of eval_interval=5: evals at 0, 5 and the last, 7
    assert [i for i, _ in logged(dense_run, 'val_loss')] == [0, 5, 7]
    assert torch.load(dense_run / 'ckpt.pt', weights_only=True)['iter_num'] == 7
    # max_iters=40 a multiple of eval_interval=40: one eval at 40
    assert [i for i, _ in logged(moe_run[0], 'val_loss')] == [0, 40]


def test_step_line_shows_aux_loss_drops_and_tokens_per_second(moe_run):
    _, p = moe_run
    assert 'aux 1.0' in p.stdout and 'drop' in p.stdout and 'tok/s' in p.stdout


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_min_lr(moe_run):
    # TINY: learning_rate 3e-3, warmup_iters 2, lr_decay_iters 40; min_lr 6e-5, train.py's default.
    # nanoGPT's schedule: lr * (it + 1) / (warmup + 1) while warming up, then half a cosine period
    # from lr down to min_lr over iterations 2 to 40, whose middle, 21, is halfway
    out, _ = moe_run
    lr = dict(logged(out, 'lr'))
    expected = {0: 1e-3, 1: 2e-3, 2: 3e-3, 21: (3e-3 + 6e-5) / 2, 40: 6e-5}
    assert {i: lr[i] for i in expected} == pytest.approx(expected, rel=1e-9)


def test_checkpoint_holds_every_gpt_config_key(moe_run):
    out, _ = moe_run
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 40
    assert set(ckpt['model_args']) == {f.name for f in fields(GPTConfig)}
    assert ckpt['model_args']['n_exp'] == 4 and ckpt['model_args']['use_aux_loss'] is True


def test_log_records_each_moe_blocks_expert_shares_and_drops_every_step(moe_run):
    out, _ = moe_run
    routing = [r['routing'] for r in map(json.loads, open(out / 'log.jsonl')) if 'routing' in r]
    assert len(routing) == 41 and set(routing[0]) == {'0'}  # block 0 of 2 is MoE
    shares, dropped = routing[-1]['0']
    assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-5 and 0 <= dropped < 1


def test_run_says_once_what_it_runs_and_at_the_end_where_its_best_model_is(moe_run):
    out, p = moe_run
    state = torch.load(out / 'ckpt.pt', weights_only=True)['model']
    total = sum(v.numel() for k, v in state.items() if k != 'lm_head.weight')  # tied to wte
    experts = sum(v.numel() for k, v in state.items() if '.experts.' in k)
    active = total - experts * (4 - 2) // 4  # each token runs top_k=2 of the n_exp=4 experts
    start = (f"device cpu, dtype float32, compile False, {total:,} parameters ({active:,} active per token), "
             f"128 tokens per iteration, out_dir {out}")  # 1 step x 4 sequences x 32 tokens
    assert p.stdout.splitlines().count(start) == 1
    best = min(v for _, v in logged(out, 'val_loss'))
    last = f"best val loss {best:.4f}; {out / 'ckpt.pt'} holds iter 40; " + r"\d+ s of training steps, \d+ s in all"
    assert re.fullmatch(last, p.stdout.splitlines()[-1]), p.stdout.splitlines()[-1]


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


def test_plot_script_draws_the_loss_and_expert_load_of_a_run(workdir, moe_run):
    out, _ = moe_run
    p = run_python([sys.executable, os.path.join(ROOT, 'assets', 'plot.py'), str(out), '--labels=moe',
                    f'--out={workdir}/plots'], os.getcwd())
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
    # the run's own settings: the same data set, batches and model on the command line's device
    p = train(workdir, f'--out_dir={evaluated}', '--init_from=resume', '--eval_only=True', '--eval_interval=7',
              '--max_iters=60')
    records = [json.loads(line) for line in open(evaluated / 'log.jsonl')]
    assert [r['iter'] for r in records] == [40] and 'val_loss' in records[0]  # one eval, no training step
    # the weights the run evaluated at iteration 40 and the same batches: the same loss
    assert records[0]['val_loss'] == dict(logged(out, 'val_loss'))[40]
    assert 'step 40:' in p.stdout
    for name in ('ckpt.pt', 'run.json'):
        assert (evaluated / name).read_bytes() == (out / name).read_bytes(), name


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


def test_step_times_leave_out_an_eval_that_takes_an_hour(workdir):
    # the clock jumps an hour in each eval (iterations 0, 5, 10 and the last, 12) and a millisecond per
    # reading otherwise: no step's dt, and no train_s, may hold an eval
    out = workdir / 'out-long-eval'
    train(workdir, *TINY, f'--out_dir={out}', '--max_iters=12', '--eval_interval=5', '--always_save_checkpoint=False',
          launcher=[sys.executable, '-c', EVAL_TAKES_AN_HOUR])
    dt = dict(logged(out, 'dt_ms'))
    assert sorted(dt) == list(range(13)) and max(dt.values()) < 100, dt
    assert max(t for _, t in logged(out, 'train_s')) < 1.0


SECONDS_PER_READING = """
import os, sys, time, runpy
clock = [0.0]
def fake_time():  # every reading of the clock a second after the last: a loop of a few steps takes seconds
    clock[0] += 1.0
    return clock[0]
time.time = fake_time
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_an_eval_that_takes_seconds_shows_a_progress_bar_and_a_quick_one_does_not(workdir, moe_run):
    p = train(workdir, *TINY, '--eval_only=True', '--eval_iters=12', f'--out_dir={workdir / "out-slow-eval"}',
              launcher=[sys.executable, '-c', SECONDS_PER_READING])
    assert 'eval train: ' in p.stderr and 'eval val: ' in p.stderr, p.stderr
    assert 'eval train' not in moe_run[1].stderr


# dropout and router noise on: every random draw must replay; Muon's momentum and AdamW's moments from ckpt.pt
RESUMED = [*TINY, *MOE, '--optimizer=muon', '--use_noisy_top_k=True', '--dropout=0.1',
           '--gradient_accumulation_steps=2',
           '--eval_interval=8', '--always_save_checkpoint=True', '--max_iters=16']


@pytest.fixture(scope='module')
def resumed_run(workdir):
    """ 16 iterations in one run, and in two: a run set up by a config file and the command line, stopped by
    Ctrl-C as it saves iteration 8, then `--init_from=resume --out_dir=` alone as its Ctrl-C line says, which
    finds a log record cut short by a crash """
    straight, split = workdir / 'out-straight', workdir / 'out-split'
    train(workdir, *RESUMED, f'--out_dir={straight}')
    config = workdir / 'resumed_config.py'
    config.write_text(''.join(f"{k} = {v if v[0].isdigit() or v in ('True', 'False') else repr(v)}\n"
                              for k, v in (a[2:].split('=') for a in RESUMED[:-4])))
    p = train(workdir, str(config), *RESUMED[-4:], f'--out_dir={split}', check=False,
              launcher=[sys.executable, '-c', CTRL_C_AFTER_THE_RENAME])
    resume = f"--init_from=resume --out_dir={split}"
    assert p.returncode == 130 and p.stdout.splitlines()[-1].endswith(f"continue with {resume}"), p.stdout
    with open(split / 'log.jsonl', 'a') as f:
        f.write('{"iter": 9, "lo')  # a record cut short by a crash mid-write
    p = train(workdir, *resume.split())
    return straight, split, p


def test_resume_replays_the_uninterrupted_run_bit_for_bit(resumed_run):
    straight, split, p = resumed_run
    assert 'Resuming training from' in p.stdout
    reference = dict(logged(straight))
    for i, loss in logged(split):
        assert loss == reference[i], f"iter {i}: {loss} != {reference[i]}"
    final = [torch.load(d / 'ckpt.pt', weights_only=True) for d in (straight, split)]
    for k, v in final[0]['model'].items():
        assert torch.equal(v, final[1]['model'][k]), k


def test_resume_log_reads_as_one_runs_without_records_past_the_checkpoint(resumed_run):
    # the first run's records from the checkpoint's iteration 8 on are dropped, the one cut short too
    straight, split, _ = resumed_run
    kinds = lambda out: [(r['iter'], 'val_loss' in r) for r in map(json.loads, open(out / 'log.jsonl'))]
    assert kinds(split) == kinds(straight)


def test_plain_resume_changes_no_run_setting(resumed_run):
    _, split, p = resumed_run
    assert 'given over' not in p.stdout
    assert torch.load(split / 'ckpt.pt', weights_only=True)['iter_num'] == 16


def test_resume_counts_training_seconds_on_from_the_checkpoints(resumed_run):
    # iteration 8 of the resumed run adds its step to the 8 steps of the first run
    _, split, _ = resumed_run
    records = [json.loads(line) for line in open(split / 'log.jsonl')]
    eval_8 = next(r for r in records if r['iter'] == 8 and 'val_loss' in r)
    step_8 = next(r for r in records if r['iter'] == 8 and 'dt_ms' in r)
    assert abs(step_8['train_s'] - eval_8['train_s'] - step_8['dt_ms'] / 1000) < 1e-6


@pytest.fixture(scope='module')
def dense_run(workdir):
    """ a dense run of 7 iterations evaluated every 5, checkpointed at its last, started in an out_dir that holds
    the log of a run stopped before its first checkpoint """
    out = workdir / 'out-dense'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"iter": 0, "loss": 4.2}\n{"iter": 1, "loss": 4.1}\n')
    train(workdir, *TINY, f'--out_dir={out}', '--max_iters=7', '--eval_interval=5')
    return out


def test_a_new_run_starts_its_own_log(dense_run):
    assert [i for i, _ in logged(dense_run)] == list(range(8))


def test_a_nanogpt_checkpoint_resumes(workdir, dense_run):
    """ nanoGPT's checkpoints have no GradScaler state and no train_s """
    theirs = workdir / 'out-nanogpt'
    checkpoint = torch.load(dense_run / 'ckpt.pt', weights_only=True)
    nanogpt_keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')
    checkpoint = dict(model={'_orig_mod.' + k: v for k, v in checkpoint['model'].items()},  # saved compiled
                      optimizer=checkpoint['optimizer'], iter_num=checkpoint['iter_num'],
                      best_val_loss=checkpoint['best_val_loss'], config=dict(dataset='shakespeare_char'),
                      model_args={k: checkpoint['model_args'][k] for k in nanogpt_keys})
    theirs.mkdir()
    torch.save(checkpoint, theirs / 'ckpt.pt')
    train(workdir, *TINY, f'--out_dir={theirs}', '--max_iters=8', '--eval_interval=4', '--init_from=resume')
    assert torch.load(theirs / 'ckpt.pt', weights_only=True)['iter_num'] == 8


def test_init_from_a_dense_run_upcycles_it_with_a_fresh_optimizer(workdir, dense_run):
    # the dense run trained with AdamW; this one takes Muon, new, for its experts too
    moe = workdir / 'out-upcycled'
    p = train(workdir, *TINY, *MOE, f'--init_from={dense_run}', f'--out_dir={moe}', '--max_iters=2',
              '--eval_interval=2', '--optimizer=muon')
    assert 'upcycled: every expert starts as a copy' in p.stdout
    source = torch.load(dense_run / 'ckpt.pt', weights_only=True)
    ckpt = torch.load(moe / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 2 and ckpt['model_args']['n_exp'] == 4  # a new run of an MoE model
    assert ckpt['model']['transformer.h.0.mlp.experts.c_fc'].shape == (4, 32, 128)
    assert 'transformer.h.0.mlp.c_fc.weight' in source['model']
    assert [len(g['params']) for g in ckpt['optimizer']['param_groups']] == [8, 3, 5]  # Muon, decayed, not
    experts = ckpt['optimizer']['param_groups'][0]['params'][2]  # block 0's attention, then its experts' c_fc
    assert ckpt['optimizer']['state'][experts]['momentum_buffer'].shape == (4, 32, 128)


def test_init_from_its_own_out_dir_stops(workdir, dense_run):
    p = train(workdir, *TINY, f'--init_from={dense_run}', f'--out_dir={dense_run}', check=False)
    assert p.returncode != 0 and "init_from is out_dir" in p.stderr


def test_ddp_two_processes_match_one_process(workdir):
    """ torchrun on 2 CPU processes (gloo) with accumulation 2 per process = 1 process with 4 """
    # an MoE that balances with the aux-free bias too: its update must use the loads of both processes
    args = [*TINY, *MOE, '--use_aux_free_bias=True', '--bias_update_speed=0.01', '--gradient_accumulation_steps=4', '--max_iters=3', '--eval_interval=3',
            '--eval_iters=3']  # the processes evaluate batches 0, 2 and 1
    ddp, single = workdir / 'out-ddp', workdir / 'out-single'
    p = train(workdir, *args, f'--out_dir={ddp}', launcher=TORCHRUN)
    assert p.stdout.count('saving checkpoint') == 1  # only rank 0 writes
    for line in ('the command line sets ', 'found vocab_size', 'Initializing a new model', 'fused AdamW'):
        assert p.stdout.count(line) == 1, line  # and prints
    assert 'Warning' not in p.stderr, p.stderr
    train(workdir, *args, f'--out_dir={single}')
    a = torch.load(ddp / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(single / 'ckpt.pt', weights_only=True)['model']
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    # the eval split over the processes is one process's: the same weights at iteration 0, the same to rounding at 3
    (_, ddp_0), (_, ddp_3) = logged(ddp, 'val_loss')
    (_, single_0), (_, single_3) = logged(single, 'val_loss')
    assert ddp_0 == single_0 and abs(ddp_3 - single_3) < 1e-5
    assert a['transformer.h.0.mlp.router.expert_bias'].abs().sum() > 0
    # eval_only on 2 processes: the checkpoint's weights, so the eval at 3 once more
    train(workdir, *args, f'--out_dir={ddp}', '--init_from=resume', '--eval_only=True', launcher=TORCHRUN)
    evals = logged(ddp, 'val_loss')
    assert [i for i, _ in evals] == [0, 3, 3] and evals[2][1] == evals[1][1]


# Ctrl-C the moment ckpt.pt has been renamed into place, before train.py can note which iteration it holds
CTRL_C_AFTER_THE_RENAME = """
import os, sys, signal, runpy
replace = os.replace
def replace_then_ctrl_c(src, dst):
    replace(src, dst)
    if dst.endswith('ckpt.pt'):
        os.kill(os.getpid(), signal.SIGINT)
os.replace = replace_then_ctrl_c
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_ctrl_c_during_a_save_names_the_iteration_on_disk(workdir):
    out = workdir / 'out-interrupted'
    p = train(workdir, *TINY, f'--out_dir={out}', '--max_iters=100', '--eval_interval=5',
              launcher=[sys.executable, '-c', CTRL_C_AFTER_THE_RENAME], check=False)
    assert p.returncode == 130, p.stderr[-3000:]
    assert 'Traceback' not in p.stderr, p.stderr
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 5
    assert p.stdout.strip().splitlines()[-1] == (f"interrupted at iter 5: {out}/ckpt.pt holds iter 5; "
                                                 f"continue with --init_from=resume --out_dir={out}")


def test_odd_sizes_train_and_dropless_on_padded_slots_warns(workdir):
    # rows of 30 floats are no multiple of 16 bytes: the experts run as a padded batched matmul, which
    # dropless sizes for every token on every expert
    out = workdir / 'out-odd'
    p = train(workdir, *TINY, *MOE, '--n_embd=30', '--n_head=3', '--expert_hidden=30', '--train_capacity=0',
              f'--out_dir={out}', '--max_iters=3', '--eval_interval=3')
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 3
    assert p.stdout.count('warning: dropless routing here runs the experts on padded slots') == 1
    assert 'n_exp/top_k = 2.0x the expert FLOPs' in p.stdout
