"""
The data/*/prepare.py scripts, run as a user runs them, on the shared offline copies of tiny
Shakespeare and of GPT-2's BPE files, writing into tmp dirs. Token counts are nanoGPT's.
"""
import os
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, '..', 'shared', 'data')
SHAKESPEARE = os.path.join(SHARED, 'tinyshakespeare', 'input.txt')
TIKTOKEN_CACHE = os.path.join(SHARED, 'tiktoken_cache')


def prepare(name, tmp_path, *args):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=TIKTOKEN_CACHE, HF_DATASETS_CACHE=str(tmp_path / 'hf_cache'))
    script = os.path.join(ROOT, 'data', name, 'prepare.py')
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=tmp_path, env=env)


def gpt2():
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
    import tiktoken
    return tiktoken.get_encoding('gpt2')


def test_shakespeare_char_vocab_and_split_sizes(tmp_path):
    out = tmp_path / 'out'
    p = prepare('shakespeare_char', tmp_path, f'--input={SHAKESPEARE}', f'--out_dir={out}')
    assert p.returncode == 0, p.stderr
    with open(out / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    text = open(SHAKESPEARE, encoding='utf-8').read()
    assert meta['vocab_size'] == 65 and sorted(meta['stoi']) == sorted(set(text))
    train = np.fromfile(out / 'train.bin', dtype=np.uint16)
    val = np.fromfile(out / 'val.bin', dtype=np.uint16)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val]).tolist()) == text


def test_shakespeare_bpe_matches_tiktoken_and_nanogpt_counts(tmp_path):
    out = tmp_path / 'out'
    p = prepare('shakespeare', tmp_path, f'--input={SHAKESPEARE}', f'--out_dir={out}')
    assert p.returncode == 0, p.stderr
    train = np.fromfile(out / 'train.bin', dtype=np.uint16)
    val = np.fromfile(out / 'val.bin', dtype=np.uint16)
    assert (len(train), len(val)) == (301_966, 36_059)  # 338,025 in all
    text = open(SHAKESPEARE, encoding='utf-8').read()
    n = int(len(text) * 0.9)
    enc = gpt2()
    # the script encodes line by line; tiktoken on each whole split is the reference
    assert train.tolist() == enc.encode_ordinary(text[:n])
    assert val.tolist() == enc.encode_ordinary(text[n:])


@pytest.mark.parametrize('fmt', ['save_to_disk', 'jsonl'])
def test_openwebtext_local_dataset_decodes_back_to_documents(tmp_path, fmt):
    docs = [f"Document {i}: the quick brown fox.\n\nIt's {i * 7} lines <|endoftext|> long." for i in range(5)]
    if fmt == 'save_to_disk':
        from datasets import Dataset, DatasetDict
        source = tmp_path / 'owt'
        DatasetDict(train=Dataset.from_dict({'text': docs, 'url': ['x'] * len(docs)})).save_to_disk(source)
    else:
        source = tmp_path / 'owt.jsonl'
        source.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    out = tmp_path / 'out'
    p = prepare('openwebtext', tmp_path, f'--input={source}', f'--out_dir={out}', '--num_proc=2')
    assert p.returncode == 0, p.stderr
    enc = gpt2()
    decoded = {}
    for split in ('train', 'val'):
        ids = np.memmap(out / f'{split}.bin', dtype=np.uint16, mode='r').tolist()
        assert ids[-1] == enc.eot_token  # every document ends with <|endoftext|>
        cuts = [i for i, t in enumerate(ids) if t == enc.eot_token]
        decoded[split] = [enc.decode(ids[a + 1:b]) for a, b in zip([-1] + cuts, cuts)]
    assert len(decoded['val']) == 1  # ceil(0.0005 * 5) documents
    assert sorted(decoded['train'] + decoded['val']) == sorted(docs)


@pytest.mark.parametrize('name', ['shakespeare_char', 'shakespeare', 'openwebtext'])
def test_missing_input_stops_with_one_line_and_writes_nothing(tmp_path, name):
    out = tmp_path / 'out'
    p = prepare(name, tmp_path, f'--input={tmp_path / "missing.txt"}', f'--out_dir={out}')
    assert p.returncode != 0
    assert p.stderr.startswith(f"error: no ") and str(tmp_path / 'missing.txt') in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()
