import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

# One thread per process, set before torch is imported (and inherited by the scripts the tests
# run): the models here are tiny, and on a busy machine OpenMP threads that outnumber the
# cores slow everything down many times over.
os.environ.setdefault('OMP_NUM_THREADS', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# offline copies of tiny Shakespeare and GPT-2's BPE files, beside the repository; a clone without
# them skips the tests that read them
SHARED_DATA = os.path.join(ROOT, '..', 'shared', 'data')
needs_shared_data = pytest.mark.skipif(not os.path.isdir(SHARED_DATA),
                                       reason=f"needs {SHARED_DATA}: tiny Shakespeare and GPT-2's BPE files")
SHAKESPEARE = os.path.join(SHARED_DATA, 'tinyshakespeare', 'input.txt')

# ---------------------------------------------------------------------------------------------
# train.py end to end (test_train.py, test_reliability.py, test_fsdp.py): a tiny char-level
# model on tiny Shakespeare, run as a subprocess in a directory holding data/shakespeare_char/

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
    """ train.py with args in cwd; launcher: what runs it instead of python, e.g. torchrun """
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, 'train.py'), *args]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def logged(out_dir, key='loss'):
    """ (iter, value) of every record of out_dir/log.jsonl that has key """
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [(r['iter'], r[key]) for r in map(json.loads, f) if key in r]
