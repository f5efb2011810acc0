"""
sample.py run as a user runs it, on checkpoints in train.py's format (a dense and an MoE GPT,
one saved from a torch.compile'd model), decoded with a character-level meta.pkl or with GPT-2
BPE, against the same model's greedy generate, in batches, with --compile and --dtype doing what they say;
and its one-line errors.
"""
import ast
import os
import pickle
import sys
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from conftest import ROOT, TIKTOKEN_CACHE, needs_gpt2_bpe, run_python
CHARS = sorted("\n abcdefghijklmnopqrstuvwxyz.,!")


def write_run(tmp_path, n_exp, compiled_prefix=False, vocab_size=len(CHARS), dataset='tiny_char'):
    """ out_dir/ckpt.pt as train.py writes it, and data/<dataset>/meta.pkl under tmp_path, the cwd """
    config = GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, n_exp=n_exp,
                       top_k=2, use_aux_loss=True, use_router_z_loss=True)
    torch.manual_seed(0)
    model = GPT(config)
    state_dict = {('_orig_mod.' if compiled_prefix else '') + k: v for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = {'model': state_dict, 'optimizer': optimizer.state_dict(), 'model_args': asdict(config),
                  'iter_num': 10, 'best_val_loss': 3.2, 'config': {'dataset': dataset, 'n_exp': n_exp}}
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    torch.save(checkpoint, out_dir / 'ckpt.pt')
    if dataset != 'tiny_char':
        return model.eval(), out_dir
    (tmp_path / 'data' / 'tiny_char').mkdir(parents=True)
    meta = {'vocab_size': len(CHARS), 'itos': dict(enumerate(CHARS)), 'stoi': {c: i for i, c in enumerate(CHARS)}}
    with open(tmp_path / 'data' / 'tiny_char' / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)
    return model.eval(), out_dir


def sample(tmp_path, *args, script=os.path.join(ROOT, 'sample.py'), **env):
    # one thread: on a busy 2-core machine, OpenMP threads waiting on each other make these tiny
    # forwards several times slower
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TIKTOKEN_CACHE_DIR': TIKTOKEN_CACHE, **env}
    return run_python([sys.executable, script, '--device=cpu', *args], tmp_path, env=env)


# sample.py run in a process that then reports what its output cannot show: the dtypes of the
# logits its forwards returned, and how many graphs torch.compile captured
PROBE = """
import runpy
import sys
import torch
sys.path.insert(0, {root!r})
import model
from torch._dynamo.utils import counters

forward = model.GPT.forward
logits_dtypes, shapes = set(), []
def forward_recording(self, idx, *args, **kwargs):
    logits, loss = forward(self, idx, *args, **kwargs)
    logits_dtypes.add(str(logits.dtype))
    if not torch.compiler.is_compiling():  # a list growing under compile would fail its guards
        shapes.append(tuple(idx.shape))
    return logits, loss
model.GPT.forward = forward_recording
sys.argv[0] = {sample!r}
runpy.run_path({sample!r}, run_name='__main__')
print('PROBE', repr((sorted(logits_dtypes), counters['stats']['unique_graphs'], shapes)))
"""


def sample_probed(tmp_path, *args):
    """ sample(), and from PROBE the logits' dtypes, the number of compiled graphs and the shapes
    of the forwards' inputs (eager runs only) """
    probe = tmp_path / 'probe.py'
    probe.write_text(PROBE.format(root=ROOT, sample=os.path.join(ROOT, 'sample.py')))
    p = sample(tmp_path, *args, script=str(probe))
    assert p.returncode == 0, p.stderr
    output, report = p.stdout.rsplit('PROBE ', 1)
    return output, *ast.literal_eval(report)


@pytest.mark.parametrize('n_exp,compiled_prefix,batch_size,batches', [(1, False, 0, [3]), (4, True, 2, [2, 1])])
def test_greedy_samples_match_the_checkpointed_model_in_batches(tmp_path, n_exp, compiled_prefix, batch_size, batches):
    model, out_dir = write_run(tmp_path, n_exp, compiled_prefix)
    start = 'to be'
    output, _, _, shapes = sample_probed(tmp_path, f'--out_dir={out_dir}', f'--start={start}', '--num_samples=3',
                                         '--max_new_tokens=20', '--top_k=1', f'--batch_size={batch_size}')
    samples = output.split('Loading meta from data/tiny_char/meta.pkl...\n', 1)[1].split('\n---------------\n')
    assert samples[-1] == '' and len(samples) == 4
    # top_k=1 is greedy: every sample is the model's argmax continuation, 20 tokens past block_size 16
    idx = torch.tensor([[CHARS.index(c) for c in start]])
    expected = ''.join(CHARS[i] for i in model.generate(idx, 20, top_k=1)[0].tolist())
    assert samples[:3] == [expected] * 3
    assert len(expected) == len(start) + 20 and set(expected) <= set(CHARS)
    # each batch: one generate, with the key/value cache: the prompt, 11 steps of one token, 8 windows
    assert shapes == [s for B in batches for s in [(B, 5)] + [(B, 1)] * 11 + [(B, 16)] * 8]


@needs_gpt2_bpe
def test_checkpoint_without_meta_decodes_with_gpt2_bpe(tmp_path):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    model, out_dir = write_run(tmp_path, n_exp=4, vocab_size=enc.n_vocab, dataset='openwebtext')
    start = 'Hello, world'
    p = sample(tmp_path, f'--out_dir={out_dir}', f'--start={start}', '--num_samples=1', '--max_new_tokens=8',
               '--top_k=1')
    assert p.returncode == 0, p.stderr
    expected = enc.decode(model.generate(torch.tensor([enc.encode(start)]), 8, top_k=1)[0].tolist())
    assert p.stdout.endswith(expected + '\n---------------\n')


def test_gpt2_bpe_without_its_files_or_network_stops_with_one_line(tmp_path):
    _, out_dir = write_run(tmp_path, n_exp=1, vocab_size=50257, dataset='openwebtext')
    empty_cache = tmp_path / 'tiktoken_cache'
    empty_cache.mkdir()
    p = sample(tmp_path, f'--out_dir={out_dir}', '--num_samples=1', '--max_new_tokens=2',
               TIKTOKEN_CACHE_DIR=str(empty_cache), HTTPS_PROXY='http://127.0.0.1:9')
    assert p.returncode != 0
    assert p.stderr.startswith("error: tiktoken cannot get GPT-2's BPE files (") and 'TIKTOKEN_CACHE_DIR' in p.stderr
    assert len(p.stderr.splitlines()) == 1


def test_out_dir_without_checkpoint_stops_with_one_line(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    p = sample(tmp_path, f'--out_dir={empty}')
    assert p.returncode != 0
    assert p.stderr == f"error: no checkpoint at {empty / 'ckpt.pt'}: train first, or point --out_dir at a run's directory\n"


def test_char_model_without_meta_stops_with_one_line(tmp_path):
    _, out_dir = write_run(tmp_path, n_exp=1)
    elsewhere = tmp_path / 'elsewhere'  # a cwd without data/tiny_char/meta.json
    elsewhere.mkdir()
    p = sample(elsewhere, f'--out_dir={out_dir}')
    assert p.returncode != 0
    assert p.stderr == (f"error: the model has {len(CHARS)} tokens, fewer than GPT-2's, and no "
                        "data/tiny_char/meta.json to decode them: run from the repository root\n")


class RunsCode:
    """ unpickled, it would create a file: what a crafted meta.pkl could do with os.system """
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


@pytest.mark.parametrize('dataset', ['../elsewhere', '/abs/elsewhere'])
def test_a_checkpoint_naming_a_dataset_outside_data_is_refused(tmp_path, dataset):
    """ a checkpoint from elsewhere would otherwise pick the vocabulary file sample.py reads: a meta.pkl beside it """
    _, out_dir = write_run(tmp_path, n_exp=1, dataset=dataset.replace('/abs', str(tmp_path)))
    marker = tmp_path / 'code-ran'
    (tmp_path / 'elsewhere').mkdir()
    with open(tmp_path / 'elsewhere' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(CHARS), 'itos': [RunsCode(str(marker))]}, f)
    p = sample(tmp_path, f'--out_dir={out_dir}')
    assert p.returncode == 1 and not marker.exists()
    assert p.stderr == (f"error: {out_dir}/ckpt.pt names its dataset '{dataset.replace('/abs', str(tmp_path))}', "
                        "not a folder of data/: refused (its vocabulary would be read from there). Sample "
                        "checkpoints you trust\n")


def test_missing_prompt_file_stops_with_one_line(tmp_path):
    _, out_dir = write_run(tmp_path, n_exp=4)
    missing = tmp_path / 'prompt.txt'
    p = sample(tmp_path, f'--out_dir={out_dir}', f'--start=FILE:{missing}')
    assert p.returncode != 0
    assert p.stderr == f"error: no file {missing} for --start=FILE:...: give the path of a text file\n"


def test_compile_runs_the_compiled_forward_and_samples_the_same(tmp_path):
    model, out_dir = write_run(tmp_path, n_exp=1)
    # 19 tokens past the prompt, beyond block_size 16: generate's prompt, one-token and window forwards
    start = 'to be'
    output, dtypes, graphs, _ = sample_probed(tmp_path, f'--out_dir={out_dir}', f'--start={start}', '--num_samples=2',
                                              '--max_new_tokens=20', '--top_k=1', '--compile=True')
    assert graphs == 3  # each compiled once, none per token
    idx = torch.tensor([[CHARS.index(c) for c in start]])
    expected = ''.join(CHARS[i] for i in model.generate(idx, 20, top_k=1)[0].tolist())
    assert output.endswith(f'{expected}\n---------------\n{expected}\n---------------\n')


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_dtype_autocasts_on_cpu_as_train_does(tmp_path, dtype):
    _, out_dir = write_run(tmp_path, n_exp=4)
    output, dtypes, graphs, _ = sample_probed(tmp_path, f'--out_dir={out_dir}', '--num_samples=1', '--max_new_tokens=3',
                                              f'--dtype={dtype}')
    assert dtypes == [f'torch.{dtype}'] and graphs == 0


GENERATE_ARGS = """
import runpy
import sys
sys.path.insert(0, {root!r})
import model
generate = model.GPT.generate
def generate_reporting(self, idx, max_new_tokens, **kwargs):
    print('GENERATE', sorted(kwargs.items()))
    return generate(self, idx, max_new_tokens, **kwargs)
model.GPT.generate = generate_reporting
sys.argv[0] = {sample!r}
runpy.run_path({sample!r}, run_name='__main__')
"""


def test_sampling_defaults_to_temperature_0_8_and_top_k_200(tmp_path):
    # generate itself is checked against a nanoGPT sampling loop in test_model.py
    _, out_dir = write_run(tmp_path, n_exp=1)
    probe = tmp_path / 'probe.py'
    probe.write_text(GENERATE_ARGS.format(root=ROOT, sample=os.path.join(ROOT, 'sample.py')))
    p = sample(tmp_path, f'--out_dir={out_dir}', '--num_samples=1', '--max_new_tokens=2', script=str(probe))
    assert p.returncode == 0, p.stderr
    assert "GENERATE [('temperature', 0.8), ('top_k', 200)]" in p.stdout.splitlines()


@pytest.mark.parametrize('arg,message', [
    ('--temperature=0', "error: temperature=0.0 must be > 0: for the most likely tokens use --top_k=1"),
    ('--temperature=-1', "error: temperature=-1.0 must be > 0: for the most likely tokens use --top_k=1"),
    ('--top_k=0', "error: top_k=0 must be >= 1"),
    ('--num_samples=0', "error: num_samples=0 must be >= 1"),
    ('--max_new_tokens=-2', "error: max_new_tokens=-2 must be >= 1"),
    ('--batch_size=-1', "error: batch_size=-1 must be >= 0 (0: all num_samples in one batch)"),
    ('--dtype=fp16', "error: dtype='fp16' is not one of float32, bfloat16, float16 ('' picks one for the device)"),
])
def test_bad_sampling_setting_stops_with_one_line(tmp_path, arg, message):
    _, out_dir = write_run(tmp_path, n_exp=1)
    p = sample(tmp_path, f'--out_dir={out_dir}', '--max_new_tokens=3', arg)
    assert p.returncode != 0
    assert p.stderr == message + '\n'


@pytest.mark.parametrize('init_from', ['gpt2', 'not_saved'])
def test_gpt2_weights_that_cannot_load_stop_with_one_line(tmp_path, init_from):
    (tmp_path / 'not_saved').mkdir()  # a directory without save_pretrained's files
    # offline, with an empty cache: the hub name fails at once, as it does without a network
    p = sample(tmp_path, f'--init_from={init_from}', HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    assert p.returncode != 0
    assert p.stderr.startswith(f"error: cannot load GPT-2 weights '{init_from}' (")
    assert p.stderr.endswith("): give --init_from a directory written by GPT2LMHeadModel.save_pretrained, "
                             "or connect to the Hugging Face hub\n")
    assert p.stderr.count('\n') == 1


def test_init_from_a_runs_out_dir_samples_that_run(tmp_path):
    model, out_dir = write_run(tmp_path, n_exp=4)
    args = ['--start=to be', '--num_samples=1', '--max_new_tokens=10', '--top_k=1']
    by_init_from, by_out_dir = sample(tmp_path, f'--init_from={out_dir}', *args), sample(tmp_path, f'--out_dir={out_dir}', *args)
    assert by_init_from.returncode == 0, by_init_from.stderr
    samples = [p.stdout.split('Loading meta from data/tiny_char/meta.pkl...\n', 1)[1] for p in (by_init_from, by_out_dir)]
    assert samples[0] == samples[1] and samples[0].startswith('to be')
