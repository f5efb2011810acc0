"""
train.py on bad input: one clear line and a non-zero exit before any work; checkpoints survive a
kill mid-write; a loss that blows up stops the run without touching the last good checkpoint.
"""
import os
import sys
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, MOE, train, run_python

TRAIN_PY = os.path.join(ROOT, 'train.py')


def make_dataset(work, name, n_tokens, vocab_size):
    d = work / 'data' / name
    d.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(0).integers(0, vocab_size, n_tokens).astype(np.uint16)
    tokens.tofile(d / 'train.bin')
    tokens.tofile(d / 'val.bin')
    (d / 'meta.json').write_text(json.dumps({'vocab_size': vocab_size, 'itos': [chr(i) for i in range(vocab_size)]}))


@pytest.fixture(scope='module')
def trained(workdir):
    """ an MoE run with a checkpoint at iteration 4 (block_size 32, vocab 65) whose evals drop tokens: each expert
    takes 32 of the 256 assignments of a batch of 4 x 32 """
    out = workdir / 'out-trained'
    train(workdir, *TINY, *MOE, '--eval_capacity=0.5', f'--out_dir={out}', '--max_iters=4', '--eval_interval=4')
    return out


@pytest.fixture(scope='module')
def dense_run(workdir):
    """ a dense run with a checkpoint at iteration 3, given MoE keys (which a dense model ignores)
    and a warmup as long as its decay """
    out = workdir / 'out-dense'
    p = train(workdir, *TINY, '--top_k=4', '--use_aux_loss=True', '--use_aux_free_bias=True', '--warmup_iters=2',
              '--lr_decay_iters=2', f'--out_dir={out}', '--max_iters=3', '--eval_interval=3')
    return out, p


def fails_with(cwd, args, message, launcher_code=None):
    cmd = [sys.executable, TRAIN_PY, *args] if launcher_code is None else [sys.executable, '-c', launcher_code]
    p = run_python(cmd, cwd, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode != 0
    assert 'Traceback' not in p.stderr, p.stderr
    assert message is None or p.stderr.strip().splitlines()[-1] == message
    return p


@pytest.mark.parametrize('args,message', [
    (['--n_expp=8'], "error: unknown config key 'n_expp' on the command line (did you mean 'n_exp'?)"),
    (['--n_exp=4', '--top_k=5'], "error: top_k=5 must be between 1 and n_exp=4"),
    (['--n_embd=30', '--n_head=4'], "error: n_embd=30 is not divisible by n_head=4: pick n_embd a multiple of n_head"),
    (['--init_from=gtp2'], "error: init_from='gtp2' is not 'scratch', 'resume', a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local GPT-2 directory"),
    (['--dataset=empty'], "error: data/empty/train.bin not found: run python data/openwebtext/prepare.py --input=<your documents> --out_dir=data/empty first"),
    (['--dataset=../data/shakespeare_char'], "error: dataset='../data/shakespeare_char' is not the name of a folder in data/: give --dataset=<a folder of data/>, without '/' or '..'"),
    (['--dataset=short'], "error: data/short/train.bin has 20 tokens, fewer than block_size + 1 = 33: use a smaller --block_size or more data"),
    (['--n_head=0'], "error: n_head=0 must be >= 1"),
    (['--eval_interval=0'], "error: eval_interval=0 must be >= 1"),
    (['--gradient_accumulation_steps=0'], "error: gradient_accumulation_steps=0 must be >= 1"),
    (['--eval_iters=0'], "error: eval_iters=0 must be >= 1"),
    (['--seed=-1'], "error: seed=-1 must be >= 0 (numpy seeds the batches with it)"),
    (['--dtype=fp16'], "error: dtype='fp16' is not one of float32, bfloat16, float16 ('' picks one for the device)"),
    (['--out_dir=data/short/train.bin/out'], "error: out_dir 'data/short/train.bin/out' cannot be made in "
                                             "data/short/train.bin (Not a directory): pick another --out_dir"),
    (['--out_dir=/proc/out'], "error: out_dir '/proc/out' cannot be made in /proc (No such file or directory): "
                              "pick another --out_dir"),
    (['--optimizer=sgd'], "error: optimizer='sgd' is not 'adamw' or 'muon'"),
])
def test_bad_config_or_data_stops_before_any_work(workdir, args, message):
    make_dataset(workdir, 'short', 20, 65)
    (workdir / 'data' / 'empty').mkdir(exist_ok=True)
    out = workdir / 'out-never'
    fails_with(workdir, [*TINY, f'--out_dir={out}', *args], message)
    assert not out.exists()  # nothing written


def test_unknown_dataset_names_the_datasets_in_data(tmp_path):
    for name in ('shakespeare_char', 'openwebtext'):
        (tmp_path / 'data' / name).mkdir(parents=True)
    p = train(tmp_path, *TINY, '--dataset=shakespear_char', check=False)
    assert p.returncode != 0
    assert p.stderr == ("error: no dataset 'shakespear_char' in data/ (it has openwebtext, shakespeare_char): "
                        "pick one, or prepare yours into data/shakespear_char/\n")
    assert not (tmp_path / 'out').exists()


def test_resume_without_a_checkpoint_stops_with_one_line(workdir):
    out = workdir / 'out-empty'
    fails_with(workdir, [*TINY, f'--out_dir={out}', '--init_from=resume'],
               f"error: init_from='resume' but there is no checkpoint at {out}/ckpt.pt: train with init_from='scratch' first, or set --out_dir")


@pytest.mark.parametrize('block_size', [64, 16])
def test_resume_with_another_block_size_stops_and_leaves_the_run_record(workdir, trained, block_size):
    record = (trained / 'run.json').read_bytes()
    fails_with(workdir, [*TINY, f'--out_dir={trained}', '--init_from=resume', f'--block_size={block_size}'],
               f"error: block_size={block_size} is not the checkpoint's 32: resume with --block_size=32, "
               f"or start a new run from its weights with --init_from={trained} --out_dir=<a new directory>")
    assert (trained / 'run.json').read_bytes() == record


def test_a_new_run_refuses_an_out_dir_that_holds_a_checkpoint_and_leaves_it_as_it_was(workdir, trained):
    files = {f: (trained / f).read_bytes() for f in ('ckpt.pt', 'log.jsonl', 'run.json')}
    fails_with(workdir, [*TINY, f'--out_dir={trained}'],
               f"error: out_dir '{trained}' holds a run's checkpoint: continue it with --init_from=resume, or pick another --out_dir")
    assert {f: (trained / f).read_bytes() for f in files} == files


def test_eval_only_of_another_model_in_a_runs_out_dir_prints_and_leaves_the_run_as_it_was(workdir, trained, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(trained, out)
    files = {f: (out / f).read_bytes() for f in ('ckpt.pt', 'log.jsonl', 'run.json')}
    p = train(workdir, *TINY, f'--out_dir={out}', '--eval_only=True')  # a fresh model's eval: not the run's
    assert 'step 0: train loss' in p.stdout
    assert {f: (out / f).read_bytes() for f in files} == files  # a log holds one run's records


def test_warmup_as_long_as_the_decay_trains(dense_run):
    # nanoGPT's schedule divided 0 by 0 at iteration warmup_iters when it equals lr_decay_iters
    out, _ = dense_run
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 3


def test_upcycling_with_impossible_moe_keys_stops_with_one_line(workdir, dense_run, tmp_path):
    dense, _ = dense_run
    fails_with(workdir, [*TINY, f'--init_from={dense}', f'--out_dir={tmp_path}/out-up', '--n_exp=4', '--expert_hidden=64'],
               "error: upcycling copies the dense MLP into each expert: leave expert_hidden=0 and n_shared_exp=0")
    assert not (tmp_path / 'out-up').exists()


def test_resume_on_data_with_another_vocabulary_stops_with_one_line(workdir, trained):
    make_dataset(workdir, 'other_vocab', 1000, 100)
    fails_with(workdir, [*TINY, f'--out_dir={trained}', '--init_from=resume', '--dataset=other_vocab'],
               "error: data/other_vocab/meta.json has a vocabulary of 100 tokens but the model has 65: prepare the data with the model's tokenizer")


def test_pretrained_weights_with_a_smaller_block_size_stop_with_one_line(workdir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=65)).save_pretrained(tmp_path)
    fails_with(workdir, [*TINY, f'--out_dir={tmp_path}/out', f'--init_from={tmp_path}'],
               f"error: block_size=32 is larger than {tmp_path}'s 16: use --block_size=16 or less")


@pytest.mark.parametrize('content,message', [
    (b'PK\x03\x04 truncated', "cannot be loaded: RuntimeError: PytorchStreamReader failed reading zip archive"),
    ('a directory', "cannot be loaded: IsADirectoryError: [Errno 21] Is a directory"),  # not a corrupt file: say so
    (None, "is not a nanoMoE checkpoint (it has no 'model' and 'model_args')"),
])
def test_unreadable_or_foreign_checkpoint_names_the_error(workdir, tmp_path, content, message):
    path = tmp_path / 'ckpt.pt'
    if content is None:
        torch.save({'state_dict': {}}, path)
    elif content == 'a directory':
        path.mkdir()
    else:
        path.write_bytes(content)
    p = fails_with(workdir, [*TINY, f'--out_dir={tmp_path}', '--init_from=resume'], None)
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {path} {message}")


def test_moe_keys_on_a_dense_model_warn_and_train(dense_run):
    _, p = dense_run  # trained: the keys change nothing
    assert 'warning: top_k=4 has no effect with n_exp=1 (a dense model)' in p.stdout
    assert 'warning: use_aux_loss=True has no effect with n_exp=1 (a dense model)' in p.stdout
    assert 'warning: use_aux_free_bias=True has no effect with n_exp=1 (a dense model)' in p.stdout


def launcher(argv, patch):
    """ python -c code that patches something, then runs train.py as __main__ """
    return f"import sys, os, runpy, torch\nsys.path.insert(0, {ROOT!r})\nimport model\n{patch}\nsys.argv = {[TRAIN_PY, *argv]!r}\nrunpy.run_path({TRAIN_PY!r}, run_name='__main__')\n"


KILLED_MID_SAVE = """
def dying_save(obj, f, *args, **kwargs):
    with open(f, 'wb') as fh:
        fh.write(b'PK\\x03\\x04 half a checkpoint')
    sys.stdout.flush()  # the 'saving checkpoint' line, also where stdout is block-buffered (no PYTHONUNBUFFERED)
    os._exit(9)  # killed while writing
torch.save = dying_save
"""


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(workdir, trained, tmp_path):
    from checkpoint import load_checkpoint
    out = tmp_path / 'out'
    shutil.copytree(trained, out)  # a checkpoint at iteration 4
    before = load_checkpoint(out / 'ckpt.pt', 'cpu')
    p = run_python([sys.executable, '-c', launcher([*TINY, f'--out_dir={out}', '--init_from=resume',
                                                     '--max_iters=8', '--eval_interval=4'], KILLED_MID_SAVE)],
                   workdir, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 9 and 'saving checkpoint' in p.stdout
    after = load_checkpoint(out / 'ckpt.pt', 'cpu')
    assert after['iter_num'] == before['iter_num'] == 4
    for k, v in before['model'].items():
        assert torch.equal(v, after['model'][k])


NAN_FROM_ITER_10 = """
forward, calls = model.GPT.forward, [0]
def nan_forward(self, idx, targets=None):
    logits, loss = forward(self, idx, targets)
    if self.training:
        calls[0] += 1
        if calls[0] > 6:
            loss = loss * float('nan')
    return logits, loss
model.GPT.forward = nan_forward
"""


@pytest.mark.parametrize('log_interval,message', [
    (1, "error: loss is nan at iter 10"),  # caught on the next log line
    (100, "error: eval loss is {'train': nan, 'val': nan} at iter 12"),  # caught by the eval before the save
])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(workdir, trained, tmp_path, log_interval, message):
    out = tmp_path / 'out'
    shutil.copytree(trained, out)  # a checkpoint at iteration 4
    # resumed at iteration 4: training forwards 7 on are those of iterations 10 on
    args = [*TINY, *MOE, f'--out_dir={out}', '--init_from=resume', '--max_iters=14', '--eval_interval=4',
            f'--log_interval={log_interval}']
    p = run_python([sys.executable, '-c', launcher(args, NAN_FROM_ITER_10)], workdir,
                   env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last
    assert 'the last good checkpoint is kept' in last
    if log_interval == 1:
        assert '(9, ' in last  # the last finite losses, iteration 9 among them
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 8  # the eval at 8 saved; nothing after the loss went bad
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_a_float16_resume_restores_the_grad_scaler(workdir, trained, tmp_path):
    """ a GradScaler state far from a fresh scaler's (scale 65536, no steps since the last growth) must come back:
    the two steps after it neither overflow at scale 1024 nor reach growth_interval 2000, so only the count of
    steps without an inf moves """
    out = tmp_path / 'out'
    shutil.copytree(trained, out)
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    ckpt['scaler'] = dict(scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                          _growth_tracker=7)
    torch.save(ckpt, out / 'ckpt.pt')
    train(workdir, *TINY, *MOE, f'--out_dir={out}', '--init_from=resume', '--dtype=float16', '--max_iters=6',
          '--eval_interval=6')
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 6
    assert ckpt['scaler']['scale'] == 1024.0 and ckpt['scaler']['_growth_tracker'] == 9  # iterations 4 and 5


# -----------------------------------------------------------------------------
# a saved model's run settings: the given ones win, the rest stay the checkpoint's; its shape cannot change

@pytest.mark.parametrize('arg,key,saved', [('--n_exp=8', 'n_exp', 4), ('--top_k=1', 'top_k', 2), ('--n_embd=64', 'n_embd', 32),
                                           ('--use_aux_free_bias=True', 'use_aux_free_bias', False)])
def test_resume_with_a_key_that_shapes_the_model_stops_with_one_line(workdir, trained, arg, key, saved):
    files = {f: (trained / f).read_bytes() for f in ('ckpt.pt', 'log.jsonl', 'run.json')}
    value = arg.split('=')[1]
    fails_with(workdir, [*TINY, f'--out_dir={trained}', '--init_from=resume', arg],
               f"error: {key}={value} is not the checkpoint's {saved}, and of a saved model only the run settings can "
               f"change: leave {key} out or give --{key}={saved}")
    assert {f: (trained / f).read_bytes() for f in files} == files


def test_resume_with_another_optimizer_stops_with_one_line(workdir, trained):
    files = {f: (trained / f).read_bytes() for f in ('ckpt.pt', 'log.jsonl', 'run.json')}
    fails_with(workdir, [*TINY, f'--out_dir={trained}', '--init_from=resume', '--optimizer=muon'],
               f"error: optimizer='muon' but {trained}/ckpt.pt was trained with 'adamw': resume with "
               f"--optimizer=adamw, or start a new run from its weights with --init_from={trained}")
    assert {f: (trained / f).read_bytes() for f in files} == files


def test_resume_trains_with_a_changed_aux_loss_weight_and_records_it(workdir, trained, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(trained, out)
    p = train(workdir, *TINY, f'--out_dir={out}', '--init_from=resume', '--aux_loss_weight=1000.0', '--max_iters=5',
              '--eval_interval=5')
    assert "run settings given over the checkpoint's: aux_loss_weight 0.01 -> 1000.0" in p.stdout
    # the saved config's other keys: the given ones listed once, the 4 iterations extended to 5
    assert p.stdout.count("given over the run's saved config: ") == 1
    assert "given over the run's saved config: eval_interval 4 -> 5, max_iters 4 -> 5\n" in p.stdout
    # CE (about 4) + 1000 * aux, aux about 1 at any routing: the loss that trained is the new one
    step_5 = next(r for r in map(json.loads, open(out / 'log.jsonl')) if r['iter'] == 5 and 'loss' in r)
    assert step_5['loss'] > 500
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    record = json.load(open(out / 'run.json'))
    assert ckpt['model_args']['aux_loss_weight'] == ckpt['config']['aux_loss_weight'] == 1000.0
    assert record['model_args']['aux_loss_weight'] == record['config']['aux_loss_weight'] == 1000.0
    # a key not given keeps the checkpoint's value, also where train.py's default differs
    assert ckpt['config']['eval_capacity'] == record['config']['eval_capacity'] == 0.5


def val_batches(workdir, it, n):
    """ the val batches train.py evaluates at iteration it, drawn as its get_batch draws them """
    dataset = next(a for a in TINY if a.startswith('--dataset=')).split('=')[1]
    data = np.fromfile(workdir / 'data' / dataset / 'val.bin', dtype=np.uint16).astype(np.int64)
    for k in range(n):
        ix = np.random.default_rng([1337, True, it, k]).integers(len(data) - 32, size=4)
        yield (torch.from_numpy(np.stack([data[i:i + 32] for i in ix])),
               torch.from_numpy(np.stack([data[i + 1:i + 33] for i in ix])))


def test_eval_only_with_eval_capacity_zero_evaluates_dropless(workdir, trained, tmp_path):
    from model import GPT, GPTConfig
    out = tmp_path / 'out'
    shutil.copytree(trained, out)
    p = train(workdir, *TINY, f'--out_dir={out}', '--init_from=resume', '--eval_only=True', '--eval_capacity=0')
    assert "run settings given over the checkpoint's: eval_capacity 0.5 -> 0.0" in p.stdout
    evals = [r['val_loss'] for r in map(json.loads, open(out / 'log.jsonl')) if r['iter'] == 4 and 'val_loss' in r]
    capped, dropless = evals  # the run's eval at iteration 4, then eval_only's
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    model = GPT(GPTConfig(**{**ckpt['model_args'], 'eval_capacity': 0.0}))
    model.load_state_dict(ckpt['model'])
    model.eval()
    with torch.no_grad():
        losses = torch.stack([model(x, y)[1] for x, y in val_batches(workdir, 4, 2)])
    assert abs(dropless - losses.mean().item()) < 1e-6  # an uncapped forward's loss
    assert abs(capped - dropless) > 1e-3  # capacity 0.5 dropped assignments the dropless eval kept


class RunsCode:
    """ unpickled, it would create a file: what a malicious checkpoint could do with os.system """
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def test_a_checkpoint_that_would_run_code_is_refused_by_train_and_sample(workdir, trained, tmp_path):
    out, marker = tmp_path / 'out', tmp_path / 'code-ran'
    shutil.copytree(trained, out)
    checkpoint = torch.load(out / 'ckpt.pt', weights_only=True)
    torch.save({**checkpoint, 'extra': RunsCode(str(marker))}, out / 'ckpt.pt')
    message = f"error: {out}/ckpt.pt holds a pickled object (io.open) that could run code as it loads: refused."
    assert fails_with(workdir, [*TINY, f'--out_dir={out}', '--init_from=resume'], None).stderr.startswith(message)
    p = run_python([sys.executable, os.path.join(ROOT, 'sample.py'), f'--out_dir={out}', '--device=cpu'], workdir,
                   timeout=120)
    assert p.returncode == 1 and p.stderr.startswith(message), p.stderr
    assert not marker.exists()


SKIP_EVERY_STEP = """
init = torch.amp.GradScaler.__init__
def overflowing_init(self, *args, **kwargs):  # a scale that overflows float16's gradients: every step is skipped
    init(self, *args, **{**kwargs, 'init_scale': 2.0 ** 100})
torch.amp.GradScaler.__init__ = overflowing_init
"""


def test_float16_steps_the_scaler_skips_move_no_routing_bias_and_no_muon_momentum(workdir, tmp_path):
    out = tmp_path / 'out'
    args = [*TINY, *MOE, '--use_aux_free_bias=True', '--bias_update_speed=0.01', '--dtype=float16',
            '--optimizer=muon', f'--out_dir={out}', '--max_iters=3', '--eval_interval=3']
    p = run_python([sys.executable, '-c', launcher(args, SKIP_EVERY_STEP)], workdir,
                   env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['scaler']['scale'] == 2.0 ** 97  # 2^100 halved by the skipped steps at iterations 0, 1 and 2
    assert not ckpt['model']['transformer.h.0.mlp.router.expert_bias'].any()
    assert not any(ckpt['optimizer']['state'].values())  # no step: no momentum of the overflowed gradients


@pytest.mark.parametrize('installed', [True, False], ids=['not_logged_in', 'not_installed'])
def test_wandb_that_cannot_log_stops_before_writing_anything(workdir, tmp_path, installed):
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_') and k != 'NETRC'}
    env['HOME'] = str(tmp_path)  # no ~/.netrc: no `wandb login`
    out = tmp_path / 'out'
    argv = [*TINY, f'--out_dir={out}', '--wandb_log=True']
    cmd = [sys.executable, TRAIN_PY, *argv] if installed else \
        [sys.executable, '-c', launcher(argv, "sys.modules['wandb'] = None")]  # import wandb fails
    p = run_python(cmd, workdir, env=env, timeout=120)
    assert p.returncode == 1 and not out.exists()
    problem = "wandb is not installed: pip install wandb" if not installed else \
        f"wandb is not logged in (no WANDB_API_KEY, no api.wandb.ai in {tmp_path}/.netrc): " \
        "run `wandb login`, or set WANDB_MODE=offline"
    assert p.stderr == f"error: wandb_log=True but {problem}; or pass --wandb_log=False\n"


STOP_BEFORE_THE_MODEL = """
def stop(*args, **kwargs):
    sys.exit(3)
model.GPT.__init__ = stop
"""


def setup_output(cwd, argv):
    """ what train.py prints with argv up to building the model, where it stops """
    p = run_python([sys.executable, '-c', launcher(argv, STOP_BEFORE_THE_MODEL)], cwd,
                   env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=120)
    assert p.returncode == 3, p.stderr
    return p.stdout


def test_a_schedule_that_never_leaves_warmup_or_decays_elsewhere_and_a_tiny_val_split_warn(workdir):
    make_dataset(workdir, 'small_val', 5000, 65)
    stdout = setup_output(workdir, [*TINY, '--dataset=small_val', '--max_iters=10', '--warmup_iters=10',
                                    '--lr_decay_iters=100'])
    for warning in [
        "warning: warmup_iters=10 >= max_iters=10: the learning rate never leaves warm-up "
        "(set a smaller --warmup_iters)",
        "warning: lr_decay_iters=100 is far from max_iters=10: the cosine decay ends after the run "
        "(set --lr_decay_iters=10)",
        "warning: data/small_val/val.bin holds only 5,000 tokens, too few for a steady val loss: "
        "prepare more data, to hold 10,000 or more",
    ]:
        assert stdout.splitlines().count(warning) == 1, stdout
    stdout = setup_output(workdir, [*TINY, '--max_iters=100', '--lr_decay_iters=40'])
    assert "warning: lr_decay_iters=40 is far from max_iters=100: the cosine decay ends long before the run " \
           "(set --lr_decay_iters=100)" in stdout.splitlines()


def test_the_readme_quick_start_warns_of_nothing(workdir):
    readme = open(os.path.join(ROOT, 'README.md')).read()
    command = next(line for line in readme.splitlines()
                   if 'python train.py config/train_shakespeare_char_moe.py' in line)
    argv = command.split('python ')[1].split()[1:]
    argv[0] = os.path.join(ROOT, argv[0])
    assert 'warning' not in setup_output(workdir, argv)
