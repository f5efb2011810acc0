"""
The data/*/prepare.py scripts, run as a user runs them, on generated text and documents, with
GPT-2's BPE files from TIKTOKEN_CACHE_DIR (or the offline copy beside the repository), writing into tmp dirs;
the character vocabularies and dataset names tokenizer.py reads.
"""
import os
import glob
import json
import pickle
import sys

import numpy as np
import pytest

from conftest import ROOT, TIKTOKEN_CACHE, needs_gpt2_bpe, generated_text, run_python


def prepare(name, tmp_path, *args, runner=(), env=None):
    """ data/<name>/prepare.py in a subprocess; runner: what python runs the script with, e.g. ['-c', code] """
    env = {**os.environ, 'TIKTOKEN_CACHE_DIR': TIKTOKEN_CACHE, 'HF_DATASETS_CACHE': str(tmp_path / 'hf_cache'), **(env or {})}
    if 'HTTPS_PROXY' in (env or {}):  # no network: the hub client must try it, not be told it is offline
        env.pop('HF_HUB_OFFLINE', None)
    script = os.path.join(ROOT, 'data', name, 'prepare.py')
    return run_python([sys.executable, *runner, script, *args], tmp_path, env=env)


def gpt2():
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
    import tiktoken
    return tiktoken.get_encoding('gpt2')


def write_text(tmp_path):
    """ generated_text() as a UTF-8 file, the path to give as --input, and the text """
    text = generated_text()
    source = tmp_path / 'input.txt'
    source.write_text(text, encoding='utf-8')
    return source, text


def test_shakespeare_char_vocab_and_split_sizes(tmp_path):
    source, text = write_text(tmp_path)
    out = tmp_path / 'out'
    p = prepare('shakespeare_char', tmp_path, f'--input={source}', f'--out_dir={out}')
    assert p.returncode == 0, p.stderr
    with open(out / 'meta.json', encoding='utf-8') as f:
        meta = json.load(f)
    assert meta['vocab_size'] == 65 and meta['itos'] == sorted(set(text))
    train = np.fromfile(out / 'train.bin', dtype=np.uint16)
    val = np.fromfile(out / 'val.bin', dtype=np.uint16)
    n = int(0.9 * len(text))  # nanoGPT's split
    assert (len(train), len(val)) == (n, len(text) - n)
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val]).tolist()) == text


@needs_gpt2_bpe
def test_shakespeare_bpe_matches_tiktoken(tmp_path):
    source, text = write_text(tmp_path)
    out = tmp_path / 'out'
    p = prepare('shakespeare', tmp_path, f'--input={source}', f'--out_dir={out}')
    assert p.returncode == 0, p.stderr
    train = np.fromfile(out / 'train.bin', dtype=np.uint16)
    val = np.fromfile(out / 'val.bin', dtype=np.uint16)
    n = int(len(text) * 0.9)
    enc = gpt2()
    # the script encodes line by line; tiktoken on each whole split is the reference
    assert train.tolist() == enc.encode_ordinary(text[:n])
    assert val.tolist() == enc.encode_ordinary(text[n:])


# documents that GPT-2 BPE must keep apart from each other and from the end-of-text token
DOCS = [f"Document {i}: the quick brown fox.\r\n\nIt's {i * 7} lines <|endoftext|> long, café ✓." for i in range(6)] + ['']

# runs prepare.py with a stand-in for datasets' load_dataset: it checks that the hub's OpenWebText
# parquet files are asked for, and loads a local parquet file
HUB_STAND_IN = """
import runpy, sys
import datasets
load_dataset, local = datasets.load_dataset, sys.argv.pop(1)
def stand_in(path, data_files=None, **kwargs):
    assert path == 'parquet' and data_files.startswith('hf://datasets/Skylion007/openwebtext@'), (path, data_files)
    return load_dataset('parquet', data_files=local, **kwargs)
datasets.load_dataset = stand_in
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def write_documents(tmp_path, kind):
    """ DOCS in one of the forms --input takes, in the order prepare.py reads them; the path to give """
    from datasets import Dataset, DatasetDict
    source = tmp_path / kind
    if kind == 'save_to_disk':
        DatasetDict(train=Dataset.from_dict({'text': DOCS, 'url': ['x'] * len(DOCS)})).save_to_disk(source)
    elif kind == 'jsonl':
        source = tmp_path / 'docs.jsonl'
        source.write_text(''.join(json.dumps({'text': d}) + '\n' for d in DOCS))
    elif kind in ('parquet_file', 'hub'):
        source = tmp_path / 'docs.parquet'
        Dataset.from_dict({'text': DOCS, 'url': ['x'] * len(DOCS)}).to_parquet(source)
    elif kind == 'parquet_dir':  # read in sorted path order: a/0.parquet, then b.parquet
        (source / 'a').mkdir(parents=True)
        Dataset.from_dict({'text': DOCS[:3]}).to_parquet(source / 'a' / '0.parquet')
        Dataset.from_dict({'text': DOCS[3:]}).to_parquet(source / 'b.parquet')
    elif kind == 'text_dir':  # one document per file, recursively, .txt and .md; other files left out
        for i, doc in enumerate(DOCS):  # sorted paths: 00.txt, 01/doc.txt, 02.txt, 03/doc.md, ...
            path = source / (f"{i:02d}/doc.{'md' if i == 3 else 'txt'}" if i % 2 else f"{i:02d}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(doc.encode('utf-8'))
        (source / '01' / 'notes.csv').write_text('not a document')
    return source


@needs_gpt2_bpe
@pytest.mark.parametrize('kind', ['hub', 'save_to_disk', 'jsonl', 'parquet_file', 'parquet_dir', 'text_dir'])
def test_openwebtext_tokens_are_the_documents_gpt2_tokens_split_as_nanogpt(tmp_path, kind):
    source = write_documents(tmp_path, kind)
    out = tmp_path / 'out'
    if kind == 'hub':
        p = prepare('openwebtext', tmp_path, f'--out_dir={out}', '--num_proc=2', runner=['-c', HUB_STAND_IN, str(source)])
    else:
        p = prepare('openwebtext', tmp_path, f'--input={source}', f'--out_dir={out}', '--num_proc=2')
    assert p.returncode == 0, p.stderr
    # datasets' train_test_split(test_size=0.0005, seed=2357): the first ceil(0.0005 * n) documents
    # of a permutation drawn with numpy's default_rng(2357) are val, the rest train, in that order
    perm = np.random.default_rng(2357).permutation(len(DOCS))
    enc = gpt2()
    expected = lambda idx: [t for i in idx for t in enc.encode_ordinary(DOCS[i]) + [enc.eot_token]]
    assert np.fromfile(out / 'val.bin', dtype=np.uint16).tolist() == expected(perm[:1])
    assert np.fromfile(out / 'train.bin', dtype=np.uint16).tolist() == expected(perm[1:])
    assert sorted(os.listdir(out)) == ['train.bin', 'val.bin']


@pytest.mark.parametrize('env', [{'HF_HUB_OFFLINE': '1'}, {'HTTPS_PROXY': 'http://127.0.0.1:9'}], ids=['offline', 'no_network'])
def test_openwebtext_from_the_hub_without_network_stops_with_one_line(tmp_path, env):
    out = tmp_path / 'out'
    p = prepare('openwebtext', tmp_path, f'--out_dir={out}', '--num_proc=1', env=env)
    assert p.returncode != 0
    assert p.stderr.startswith("error: cannot load OpenWebText from the Hugging Face hub (")
    assert p.stderr.rstrip().endswith("download its parquet files and pass --input=<their directory>")
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_openwebtext_text_file_not_utf8_stops_with_one_line(tmp_path):
    docs = tmp_path / 'docs'
    docs.mkdir()
    (docs / 'good.txt').write_text('fine')
    (docs / 'bad.txt').write_bytes(b'caf\xe9 noir')  # Latin-1
    out = tmp_path / 'out'
    p = prepare('openwebtext', tmp_path, f'--input={docs}', f'--out_dir={out}')
    assert p.returncode != 0
    # after datasets' progress bar, which ends in a carriage return
    assert p.stderr.strip().splitlines()[-1].split('\r')[-1] == (
        f"error: {docs / 'bad.txt'} is not UTF-8 text (invalid continuation byte at byte 3): convert it, or move it out of the directory")
    assert 'Traceback' not in p.stderr
    assert not out.exists()


@pytest.mark.parametrize('name', ['shakespeare', 'openwebtext'])
def test_tokenizer_without_bpe_files_or_network_stops_with_one_line(tmp_path, name):
    source = tmp_path / 'input.txt'
    source.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n')
    if name == 'openwebtext':
        source = write_documents(tmp_path, 'jsonl')
    out = tmp_path / 'out'
    empty_cache = tmp_path / 'tiktoken_cache'
    empty_cache.mkdir()
    p = prepare(name, tmp_path, f'--input={source}', f'--out_dir={out}',
                env={'TIKTOKEN_CACHE_DIR': str(empty_cache), 'HTTPS_PROXY': 'http://127.0.0.1:9'})
    assert p.returncode != 0
    line = p.stderr.strip().splitlines()[-1].split('\r')[-1]
    assert line.startswith("error: tiktoken cannot get GPT-2's BPE files (") and 'set TIKTOKEN_CACHE_DIR to a directory' in line
    assert 'Traceback' not in p.stderr
    assert not out.exists()


@pytest.mark.parametrize('name', ['shakespeare_char', 'shakespeare', 'openwebtext'])
def test_missing_input_stops_with_one_line_and_writes_nothing(tmp_path, name):
    out = tmp_path / 'out'
    p = prepare(name, tmp_path, f'--input={tmp_path / "missing.txt"}', f'--out_dir={out}')
    assert p.returncode != 0
    assert p.stderr.startswith("error: no ") and str(tmp_path / 'missing.txt') in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# character-level vocabularies (tokenizer.py): meta.json, nanoGPT's meta.pkl as plain data only, and dataset
# names that stay inside data/

class RunsCode:
    """ unpickled, it would create a file: what a crafted meta.pkl could do with os.system """
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def test_char_meta_reads_meta_json_then_nanogpts_meta_pkl(tmp_path):
    from tokenizer import load_char_meta
    chars = ['\n', ' ', 'a', 'é']
    want = {'vocab_size': 4, 'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))}
    assert load_char_meta(tmp_path) is None  # a GPT-2 BPE dataset
    with open(tmp_path / 'meta.pkl', 'wb') as f:  # as nanoGPT's prepare script writes it
        pickle.dump({'vocab_size': 4, 'itos': dict(enumerate(chars)), 'stoi': want['stoi']}, f)
    assert load_char_meta(tmp_path) == want
    (tmp_path / 'meta.json').write_text(json.dumps({'vocab_size': 4, 'itos': chars}))
    (tmp_path / 'meta.pkl').write_bytes(b'not read: meta.json comes first')
    assert load_char_meta(tmp_path) == want


@pytest.mark.parametrize('name,content,message', [
    ('meta.pkl', 'code', "holds a pickled object (io.open) that could run code as it loads: refused."),
    ('meta.pkl', pickle.dumps({'vocab_size': 2, 'itos': {0: 'a', 1: 'b'}})[:-5], "cannot be read (UnpicklingError"),
    ('meta.pkl', pickle.dumps({'vocab_size': 50}), "is not a character vocabulary"),
    ('meta.json', b'{"vocab_size": 3, "itos": ["a", "b"]}', "is not a character vocabulary"),
    ('meta.json', b'{"vocab_size": 2, "itos": ["a", 7]}', "is not a character vocabulary"),
    ('meta.json', b'{"vocab_size": 2,', "cannot be read (JSONDecodeError"),
])
def test_char_meta_of_another_shape_or_that_runs_code_is_one_error_naming_the_file(tmp_path, name, content,
                                                                                    message):
    from tokenizer import load_char_meta
    marker = tmp_path / 'code-ran'
    path = tmp_path / name
    path.write_bytes(pickle.dumps({'vocab_size': 1, 'itos': [RunsCode(str(marker))]}) if content == 'code'
                     else content)
    with pytest.raises(ValueError) as e:
        load_char_meta(tmp_path)
    assert str(e.value).startswith(f"{path} {message}"), str(e.value)
    assert str(e.value).endswith("prepare the data again with data/shakespeare_char/prepare.py --input=<its text>, "
                                 "which writes meta.json")
    assert not marker.exists()


@pytest.mark.parametrize('name', ['../x', '/etc', 'a/b', '..', '.', ''])
def test_a_dataset_is_a_folder_of_data_never_a_path(name):
    from tokenizer import dataset_dir
    assert dataset_dir('shakespeare_char') == os.path.join('data', 'shakespeare_char')
    with pytest.raises(ValueError, match=r"is not the name of a folder in data/"):
        dataset_dir(name)


def test_the_product_code_loads_no_pickle_that_could_run_code():
    # the scripts and modules, and data/*/prepare.py; the tests pickle on purpose
    paths = glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'data', '*', '*.py'))
    assert len(paths) > 10
    for path in paths:
        with open(path, encoding='utf-8') as f:
            source = f.read()
        assert 'pickle.load' not in source and 'weights_only=False' not in source, path
