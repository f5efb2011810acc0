"""
sample.py run as a user runs it, on checkpoints in train.py's format (a dense and an MoE GPT,
one saved from a torch.compile'd model) with a character-level meta.pkl, and its one-line errors.
"""
import os
import pickle
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = sorted("\n abcdefghijklmnopqrstuvwxyz.,!")


def write_run(tmp_path, n_exp, compiled_prefix=False):
    """ out_dir/ckpt.pt as train.py writes it, and data/<dataset>/meta.pkl under tmp_path, the cwd """
    config = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32, n_exp=n_exp,
                       top_k=2, use_aux_loss=True, use_router_z_loss=True)
    torch.manual_seed(0)
    model = GPT(config)
    state_dict = {('_orig_mod.' if compiled_prefix else '') + k: v for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = {'model': state_dict, 'optimizer': optimizer.state_dict(), 'model_args': asdict(config),
                  'iter_num': 10, 'best_val_loss': 3.2, 'config': {'dataset': 'tiny_char', 'n_exp': n_exp}}
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    torch.save(checkpoint, out_dir / 'ckpt.pt')
    (tmp_path / 'data' / 'tiny_char').mkdir(parents=True)
    meta = {'vocab_size': len(CHARS), 'itos': dict(enumerate(CHARS)), 'stoi': {c: i for i, c in enumerate(CHARS)}}
    with open(tmp_path / 'data' / 'tiny_char' / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)
    return model.eval(), out_dir


def sample(tmp_path, *args):
    # one thread: on a busy 2-core machine, OpenMP threads waiting on each other make these tiny
    # forwards several times slower
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), '--device=cpu', *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env)


@pytest.mark.parametrize('n_exp,compiled_prefix', [(1, False), (4, True)])
def test_greedy_samples_match_the_checkpointed_model(tmp_path, n_exp, compiled_prefix):
    model, out_dir = write_run(tmp_path, n_exp, compiled_prefix)
    start = 'to be'
    p = sample(tmp_path, f'--out_dir={out_dir}', f'--start={start}', '--num_samples=2', '--max_new_tokens=20',
               '--top_k=1')
    assert p.returncode == 0, p.stderr
    samples = p.stdout.split('Loading meta from data/tiny_char/meta.pkl...\n', 1)[1].split('\n---------------\n')
    assert samples[-1] == '' and len(samples) == 3
    # top_k=1 is greedy: both samples are the model's argmax continuation, 20 tokens past block_size 16
    idx = torch.tensor([[CHARS.index(c) for c in start]])
    expected = ''.join(CHARS[i] for i in model.generate(idx, 20, top_k=1)[0].tolist())
    assert samples[:2] == [expected, expected]
    assert len(expected) == len(start) + 20 and set(expected) <= set(CHARS)


def test_sampling_at_temperature_stays_in_the_vocab(tmp_path):
    _, out_dir = write_run(tmp_path, n_exp=4)
    p = sample(tmp_path, f'--out_dir={out_dir}', '--num_samples=2', '--max_new_tokens=20')
    assert p.returncode == 0, p.stderr
    samples = p.stdout.split('...\n', 1)[1].split('\n---------------\n')[:2]
    assert all(len(s) == 21 and s[0] == '\n' and set(s) <= set(CHARS) for s in samples)


def test_out_dir_without_checkpoint_stops_with_one_line(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    p = sample(tmp_path, f'--out_dir={empty}')
    assert p.returncode != 0
    assert p.stderr == f"error: no checkpoint at {empty / 'ckpt.pt'}: train first, or point --out_dir at a run's directory\n"


def test_missing_prompt_file_stops_with_one_line(tmp_path):
    _, out_dir = write_run(tmp_path, n_exp=4)
    missing = tmp_path / 'prompt.txt'
    p = sample(tmp_path, f'--out_dir={out_dir}', f'--start=FILE:{missing}')
    assert p.returncode != 0
    assert p.stderr == f"error: no file {missing} for --start=FILE:...: give the path of a text file\n"
