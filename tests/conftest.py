import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# One thread per process, set before torch is imported (and inherited by the scripts the tests
# run): the models here are tiny, and on a busy machine OpenMP threads that outnumber the
# cores slow everything down many times over.
os.environ.setdefault('OMP_NUM_THREADS', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `--dist loadfile` hands each worker a whole file at a time. xdist sends the files with the most tests first,
# which leaves the long files of a few torchrun tests to the end, where one worker runs them while the other
# idles. Sending the longest first (Graham's LPT rule, https://doi.org/10.1137/0117039) ends the two together.
LONGEST_FILES_FIRST = ['test_export.py', 'test_fsdp.py', 'test_expert_parallel.py', 'test_processes.py',
                       'test_train.py', 'test_model.py', 'test_sample.py', 'test_moe_layer.py',
                       'test_reliability.py', 'test_data.py', 'test_bench.py', 'test_hellaswag.py']


def pytest_configure(config):
    if hasattr(config.option, 'loadscopereorder'):
        config.option.loadscopereorder = False  # keep the order below


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# GPT-2's BPE files for tiktoken: TIKTOKEN_CACHE_DIR if set, else the offline copy beside the repository.
# The tests that tokenize with GPT-2's BPE skip without them; every other test makes the text it needs
TIKTOKEN_CACHE = os.environ.get('TIKTOKEN_CACHE_DIR') or os.path.join(ROOT, '..', 'shared', 'data',
                                                                      'tiktoken_cache')
needs_gpt2_bpe = pytest.mark.skipif(
    not (os.path.isdir(TIKTOKEN_CACHE) and os.listdir(TIKTOKEN_CACHE)),
    reason="needs GPT-2's BPE files: set TIKTOKEN_CACHE_DIR to a directory that holds tiktoken's cache of "
           "them, filled where there is network by TIKTOKEN_CACHE_DIR=<dir> python -c \"import tiktoken; "
           "tiktoken.get_encoding('gpt2')\"")


def generated_text(n_words=60_000, seed=0):
    """ ~400 KB of a play in tiny Shakespeare's 65 characters, the same on every machine: speeches of
    a line of words drawn by Zipf's law from 404 random words: spelling and frequencies a tiny model learns """
    rng = np.random.default_rng(seed)
    lower = list('abcdefghijklmnopqrstuvwxyz')
    words = [''.join(rng.choice(lower, rng.integers(2, 8))) for _ in range(400)]
    words += ['&', '$3', words[0] + "'s", words[1] + '-' + words[2]]
    rng.shuffle(words)
    zipf = 1 / np.arange(1, len(words) + 1)
    ids = rng.choice(len(words), n_words, p=zipf / zipf.sum())
    names = [c + ''.join(rng.choice(lower, 4)) for c in 'ABCDEFGHIJKLMNOPQRSTUVWXYZ']
    lengths = rng.integers(3, 10, n_words // 3)
    speakers = rng.integers(0, len(names), n_words // 3)
    marks = rng.choice(list(',;:.!?'), n_words // 3)
    speeches, start = [], 0
    for n, speaker, mark in zip(lengths, speakers, marks):
        if start + n > n_words:
            break
        line = ' '.join(words[i] for i in ids[start:start + n])
        speeches.append(f"{names[speaker]}:\n{line[0].upper()}{line[1:]}{mark}\n")
        start += n
    return '\n'.join(speeches)


# ---------------------------------------------------------------------------------------------
# train.py end to end (test_train.py, test_reliability.py, test_fsdp.py): a tiny char-level
# model on generated_text(), run as a subprocess in a directory holding data/shakespeare_char/

TINY = ['--dataset=shakespeare_char', '--device=cpu', '--compile=False', '--eval_iters=2', '--log_interval=1',
        '--block_size=32', '--batch_size=4', '--n_layer=2', '--n_head=2', '--n_embd=32', '--warmup_iters=2',
        '--learning_rate=3e-3', '--lr_decay_iters=40', '--gradient_accumulation_steps=1']
MOE = ['--n_exp=4', '--top_k=2', '--use_aux_loss=True', '--use_router_z_loss=True']


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """ a directory with data/shakespeare_char/ as nanoGPT's char-level prepare writes it from
    generated_text() """
    work = tmp_path_factory.mktemp('work')
    data_dir = work / 'data' / 'shakespeare_char'
    data_dir.mkdir(parents=True)
    text = generated_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(data_dir / 'train.bin')
    ids[n:].tofile(data_dir / 'val.bin')
    (data_dir / 'meta.json').write_text(json.dumps({'vocab_size': len(chars), 'itos': chars}))
    return work


TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']  # 2 processes


_warm = {}  # this worker's tests/warm_python.py, started by its first run_python


def _stop_warm():
    _warm['process'].stdin.close()  # which ends its loop
    _warm['process'].wait()
    _warm['process'].stdout.close()
    shutil.rmtree(_warm['dir'], ignore_errors=True)


def run_python(cmd, cwd, env=None, timeout=300):
    """ subprocess.run(cmd, cwd, env, capture_output=True, text=True, timeout) where cmd is `python script args`
    or `python -c code args`: run by a child of tests/warm_python.py, which has imported torch already. Any other
    command (torchrun), or one whose PYTHON* variables (read as an interpreter starts) differ from this process's,
    runs as a subprocess of its own """
    env = dict(env if env is not None else os.environ)
    startup = {k for k in [*env, *os.environ] if k.startswith('PYTHON') and env.get(k) != os.environ.get(k)}
    if cmd[0] != sys.executable or cmd[1].startswith('-') and cmd[1] != '-c' or startup:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if 'process' not in _warm:
        _warm['process'] = subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'warm_python.py')],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                            env=dict(os.environ, OMP_NUM_THREADS='1'))
        _warm['dir'] = tempfile.mkdtemp()
        atexit.register(_stop_warm)
    process, out, err = _warm['process'], os.path.join(_warm['dir'], 'out'), os.path.join(_warm['dir'], 'err')
    code, argv = (cmd[2], cmd[3:]) if cmd[1] == '-c' else (None, cmd[1:])
    request = dict(cwd=str(cwd), env=env, argv=[str(a) for a in argv], code=code, out=out, err=err,
                   timeout=timeout)
    process.stdin.write(json.dumps(request) + '\n')
    process.stdin.flush()
    returncode = json.loads(process.stdout.readline())['returncode']
    with open(out) as f_out, open(err) as f_err:
        return subprocess.CompletedProcess(cmd, returncode, f_out.read(), f_err.read())


def train(cwd, *args, launcher=None, check=True):
    """ train.py with args in cwd; launcher: what runs it instead of python, e.g. torchrun """
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, 'train.py'), *args]
    p = run_python(cmd, cwd, env=dict(os.environ, OMP_NUM_THREADS='1'))
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def logged(out_dir, key='loss'):
    """ (iter, value) of every record of out_dir/log.jsonl that has key """
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [(r['iter'], r[key]) for r in map(json.loads, f) if key in r]


def assert_muon_runs_agree(a, b, seed=1337):
    """ out_dirs a and b hold Muon runs of the same steps whose gradients differ only in the order of their
    float32 sums (several processes against one). Muon's bfloat16 Newton-Schulz turns those roundings into
    bfloat16 ulps of its updates, which the later steps carry on: each weight and optimizer state of a lies
    within a fifth of the distance b's moved from its start (train.py's initial weights of seed, zero state)
    from b's. A matrix orthogonalised in two halves misses by half that distance or more """
    import torch
    from model import GPT, GPTConfig
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (a, b))
    torch.manual_seed(seed)
    start = GPT(GPTConfig(**b['model_args'])).state_dict()
    pairs = [(k, a['model'][k], v, start[k]) for k, v in b['model'].items()]
    pairs += [(f'{i} {k}', a['optimizer']['state'][i][k], v, torch.zeros_like(v))
              for i, state in b['optimizer']['state'].items() for k, v in state.items() if k != 'step']
    for name, x, y, y0 in pairs:
        assert (x - y).norm() <= 0.2 * (y - y0).norm(), name
    assert [s['step'] for s in a['optimizer']['state'].values() if 'step' in s] == \
        [s['step'] for s in b['optimizer']['state'].values() if 'step' in s]
