"""
export.py's directories read by clients this repository did not write: transformers (AutoModelForCausalLM,
AutoTokenizer, generate with its key/value cache) and lm-evaluation-harness, in one process started from another
folder that cannot import this repository; and read back here by train.py --init_from and sample.py --init_from.
Four runs, their weights noised away from the init so that every token, expert and bias matters: a dense
character-level GPT without biases, n_embd 30; a dense GPT-2 BPE one with biases; a character-level MoE with
every feature routing reads (top-2, fine-grained and shared experts, the aux-free bias, noisy top-k's weights, a
float32 router, a capacity that drops); a GPT-2 BPE MoE with top-1 routing, for lm-evaluation-harness against
hellaswag.py.
export.py, prepare.py and sample.py run in this process (runpy, their command lines in sys.argv): each would
spend seconds importing transformers in a subprocess of its own.
"""
import json
import os
import runpy
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import ROOT, TIKTOKEN_CACHE, generated_text, needs_gpt2_bpe, run_python
import hellaswag
from checkpoint import load_checkpoint, load_weights, model_from_checkpoint
from model import GPT, GPTConfig
from tokenizer import load_char_meta

os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)  # for this process and the scripts it runs
HAS_BPE = os.path.isdir(TIKTOKEN_CACHE) and bool(os.listdir(TIKTOKEN_CACHE))
CHAR_TEXT = "ROMEO:\nBut soft, what light"
BPE_TEXT = "Hello world, <|endoftext|> naïve  café\n\t1234"
RUNS = {  # name: GPTConfig args (block_size and vocab_size aside)
    'dense_char': dict(n_layer=2, n_head=3, n_embd=30, bias=False),
    'dense_bpe': dict(n_layer=1, n_head=2, n_embd=32, bias=True),
    'moe_char': dict(n_layer=2, n_head=2, n_embd=32, bias=True, n_exp=4, top_k=2, stride=1, expert_hidden=24,
                     n_shared_exp=1, use_aux_free_bias=True, use_noisy_top_k=True, router_use_full_prec=True,
                     eval_capacity=0.5, min_capacity=1),
    'moe_bpe': dict(n_layer=2, n_head=2, n_embd=32, bias=False, n_exp=4, top_k=1, stride=2),
}
# HellaSwag's format; the contexts end without a space, so that the harness and hellaswag.py split the same tokens
ITEMS = [
    {'ctx': "A man is sitting on a roof. He", 'label': 3,
     'endings': ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {'ctx': "The woman pours water into a glass and", 'label': 0,
     'endings': ["drinks it.", "sings loudly to the moon.", "paints the glass red.", "falls asleep."]},
    {'ctx': "A dog runs across the park", 'label': 2,
     'endings': ["chasing a ball.", "and reads a book.", "to its owner.", "while it rains."]},
    {'ctx': "Two kids build a sandcastle on the beach", 'label': 0,
     'endings': ["then a wave knocks it down.", "and fly away.", "with buckets and spades.", "in the snow."]},
]

# What a machine without this repository does with the exported directories: it runs from its own folder,
# with none of the repository's modules importable, and writes what transformers and the harness computed
HF_SIDE = r"""
import importlib.util, json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
spec = json.load(open(sys.argv[1]))
out = {'repo_importable': [m for m in ('model', 'checkpoint', 'modeling_nanomoe') if importlib.util.find_spec(m)]}
for name, run in spec['runs'].items():
    model = AutoModelForCausalLM.from_pretrained(run['dir'], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(run['dir'], trust_remote_code=True)
    ids = torch.tensor([run['ids']])
    with torch.no_grad():
        logits = model(ids).logits[0]
    generated = {cache: model.generate(ids, max_new_tokens=run['new'], do_sample=False, use_cache=cache)
                 for cache in (True, False)}
    out[name] = {'class': type(model).__name__, 'logits': logits.tolist(),
                 'generated': {cache: g[0].tolist() for cache, g in generated.items()},
                 'ids': tokenizer(run['text'])['input_ids'], 'text': tokenizer.decode(run['ids'])}
    if 'short' in run:  # a batch of the prompt and a shorter one, left-padded with token 0
        pad = len(run['ids']) - len(run['short'])
        batch = torch.tensor([run['ids'], [0] * pad + run['short']])
        mask = torch.ones_like(batch)
        mask[1, :pad] = 0
        out[name]['batch'] = model.generate(batch, attention_mask=mask, max_new_tokens=run['new'], do_sample=False,
                                            pad_token_id=0)[:, -run['new']:].tolist()
if 'lm_eval' in spec:
    import lm_eval
    from lm_eval.tasks import TaskManager
    results = lm_eval.simple_evaluate(model='hf', model_args=spec['lm_eval']['model_args'], tasks=['tiny_swag'],
                                      task_manager=TaskManager(include_path=spec['lm_eval']['tasks']),
                                      device='cpu', batch_size=4, log_samples=True)
    out['lm_eval'] = {'acc': results['results']['tiny_swag']['acc,none'],
                      'samples': [{'doc_id': s['doc_id'], 'acc': s['acc'], 'loglik': [r[0][0] for r in s['resps']]}
                                  for s in results['samples']['tiny_swag']]}
json.dump(out, open(sys.argv[2], 'w'))
"""

TASK_YAML = """task: tiny_swag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def run_script(script, cwd, *args):
    """ a script of the repository run in this process as `python script args` in cwd; its globals """
    cwd_before, argv_before = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = [script, *args]
    try:
        return runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    finally:
        os.chdir(cwd_before)
        sys.argv = argv_before


def error_line(script, cwd, *args):
    """ the one line a script exits with, as `python script args` prints it """
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, cwd, *args)
    message = str(exit_info.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


def write_run(work, name, vocab_size):
    """ work/<name>/ckpt.pt as train.py writes it, with weights noised away from GPT's init """
    config = GPTConfig(block_size=64, vocab_size=vocab_size, **RUNS[name])
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.3 * torch.randn_like(tensor))  # the expert bias too: it moves routing
    dataset = 'openwebtext' if name.endswith('bpe') else 'shakespeare_char'
    os.makedirs(work / name)
    torch.save({'model': model.state_dict(), 'model_args': asdict(config), 'iter_num': 100, 'best_val_loss': 2.5,
                'config': {'dataset': dataset, **RUNS[name]}}, work / name / 'ckpt.pt')
    with open(work / name / 'run.json', 'w') as f:
        json.dump({'config': {'dataset': dataset}, 'torch': torch.__version__, 'git_commit': None}, f)
    return model.eval()


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """ the runs, their exports, and what the process without this repository computed from them """
    work = tmp_path_factory.mktemp('export')
    (work / 'text.txt').write_text(generated_text(n_words=3000))
    run_script('data/shakespeare_char/prepare.py', work, '--input=text.txt', '--out_dir=data/shakespeare_char')
    meta = load_char_meta(str(work / 'data' / 'shakespeare_char'))
    names = [name for name in RUNS if HAS_BPE or not name.endswith('bpe')]
    runs = {}
    for name in names:
        bpe = name.endswith('bpe')
        model = write_run(work, name, 50304 if bpe else meta['vocab_size'])
        run_script('export.py', work, f'--out_dir={name}', f'--hf_dir=hf_{name}')
        if bpe:
            import tiktoken
            ids = tiktoken.get_encoding('gpt2').encode(BPE_TEXT, allowed_special='all')
        else:
            ids = [meta['stoi'][c] for c in CHAR_TEXT]
        runs[name] = {'model': model, 'dir': str(work / f'hf_{name}'), 'ids': ids,
                      'text': BPE_TEXT if bpe else CHAR_TEXT, 'new': 12}
        if name.startswith('moe'):
            runs[name]['short'] = ids[len(ids) // 3:]
    spec = {'runs': {name: {k: v for k, v in run.items() if k != 'model'} for name, run in runs.items()}}
    if HAS_BPE:
        with open(work / 'items.jsonl', 'w') as f:
            f.writelines(json.dumps(item) + '\n' for item in ITEMS)
        (work / 'tasks').mkdir()
        (work / 'tasks' / 'tiny_swag.yaml').write_text(TASK_YAML.format(path=work / 'items.jsonl'))
        spec['lm_eval'] = {'tasks': str(work / 'tasks'),
                           'model_args': f"pretrained={work / 'hf_moe_bpe'},trust_remote_code=True,dtype=float32"}
    elsewhere = tmp_path_factory.mktemp('elsewhere')
    (elsewhere / 'hf_side.py').write_text(HF_SIDE)
    (elsewhere / 'spec.json').write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', HF_MODULES_CACHE=str(elsewhere / 'modules'),
               HF_DATASETS_CACHE=str(elsewhere / 'datasets'), OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, 'hf_side.py', 'spec.json', 'out.json'], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return work, meta, runs, json.loads((elsewhere / 'out.json').read_text())


def test_exported_models_load_where_the_repository_cannot_be_imported(exported):
    _, _, runs, hf = exported
    assert hf['repo_importable'] == []
    assert hf['dense_char']['class'] == 'GPT2LMHeadModel'  # transformers' own, no custom code
    assert all(hf[name]['class'] == ('NanoMoEForCausalLM' if name.startswith('moe') else 'GPT2LMHeadModel')
               for name in runs)
    with open(os.path.join(runs['moe_char']['dir'], 'README.md')) as f:
        card = f.read()
    assert 'trust_remote_code=True' in card and 'dropless' in card and '"dataset": "shakespeare_char"' in card


def test_transformers_logits_equal_the_dropless_forward(exported):
    _, _, runs, hf = exported
    for name, run in runs.items():
        ids = torch.tensor([run['ids']])
        with torch.no_grad():
            # targets: logits at every position
            logits, _ = run['model'](ids, torch.zeros_like(ids), dropless=True)
            capacity_logits, _ = run['model'](ids, torch.zeros_like(ids))
        torch.testing.assert_close(torch.tensor(hf[name]['logits']), logits[0], rtol=0, atol=1e-5, msg=name)
        if name == 'moe_char':  # its capacity drops tokens: the export routes dropless, not as eval does
            assert (capacity_logits - logits).abs().max() > 1e-3


def test_transformers_greedy_generate_equals_generate_with_and_without_its_cache_and_padded(exported):
    _, _, runs, hf = exported
    for name, run in runs.items():
        ids = torch.tensor([run['ids']])
        ours = run['model'].generate(ids, run['new'], top_k=1)[0].tolist()
        assert hf[name]['generated'] == {'true': ours, 'false': ours}, name
        assert len(set(ours[len(run['ids']):])) > 1, name  # the noised weights give varied tokens
        if 'short' in run:  # left padding changes no row: the positions and the attention skip it
            short = run['model'].generate(torch.tensor([run['short']]), run['new'], top_k=1)[0].tolist()
            assert hf[name]['batch'] == [ours[-run['new']:], short[-run['new']:]], name


def test_exported_tokenizers_give_this_repositorys_ids(exported):
    _, _, runs, hf = exported
    for name, run in runs.items():
        assert hf[name]['ids'] == run['ids'], name
        assert hf[name]['text'] == run['text'], name


def test_train_py_init_from_an_exported_dir_trains_on_from_its_weights(exported):
    work, _, runs, _ = exported
    # one step at learning rate 0 saves a checkpoint of the weights train.py started from
    args = ['--dataset=shakespeare_char', '--device=cpu', '--compile=False', '--block_size=64', '--batch_size=2',
            '--max_iters=1', '--eval_interval=1', '--eval_iters=1', '--learning_rate=0', '--min_lr=0',
            '--warmup_iters=0', '--lr_decay_iters=1', '--gradient_accumulation_steps=1', '--bias_update_speed=0']
    p = run_python([sys.executable, os.path.join(ROOT, 'train.py'), f"--init_from={runs['moe_char']['dir']}",
                    '--out_dir=again', *args], work, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    again = model_from_checkpoint(load_checkpoint(work / 'again' / 'ckpt.pt', 'cpu')).eval()
    assert asdict(again.config) == {**asdict(runs['moe_char']['model'].config), 'bias_update_speed': 0}
    # the dense export is GPT-2's format: train.py reads it as GPT-2's (checkpoint.load_weights), biases and all
    dense = load_weights(runs['dense_char']['dir'], {}).eval()
    assert dense.config.bias and all((b == 0).all() for k, b in dense.state_dict().items() if k.endswith('bias'))
    for name, model in (('moe_char', again), ('dense_char', dense)):
        ids = torch.tensor([runs[name]['ids']])
        with torch.no_grad():
            logits, _ = model(ids, torch.zeros_like(ids))
            original, _ = runs[name]['model'](ids, torch.zeros_like(ids))
        torch.testing.assert_close(logits, original, rtol=0, atol=1e-6, msg=name)


def test_sample_py_init_from_an_exported_dir_decodes_with_its_tokenizer(exported, capsys):
    work, meta, runs, _ = exported
    run = runs['moe_char']
    run_script('sample.py', work, f"--init_from={run['dir']}", '--device=cpu', '--num_samples=1',
               '--max_new_tokens=12', '--top_k=1', f"--start={CHAR_TEXT}")
    ids = run['model'].generate(torch.tensor([run['ids']]), 12, top_k=1)[0].tolist()
    assert ''.join(meta['itos'][i] for i in ids) + '\n---------------' in capsys.readouterr().out


@needs_gpt2_bpe
def test_lm_eval_acc_equals_hellaswag_acc_item_by_item(exported):
    _, _, runs, hf = exported
    model = runs['moe_bpe']['model']
    x, y, labels = hellaswag.render(ITEMS, model.config.block_size)
    with torch.no_grad():
        total, _ = hellaswag.scores(model, x, y)  # (n, 4) summed cross-entropy of each ending
    samples = sorted(hf['lm_eval']['samples'], key=lambda s: s['doc_id'])
    assert [s['acc'] for s in samples] == (total.argmin(-1) == labels).float().tolist()
    torch.testing.assert_close(torch.tensor([s['loglik'] for s in samples]), -total, rtol=0, atol=1e-4)
    assert hf['lm_eval']['acc'] == (total.argmin(-1) == labels).float().mean().item()


def test_bad_inputs_are_one_error_line_and_leave_hf_dir_as_it_was(exported, tmp_path):
    work = exported[0]
    assert 'no checkpoint at' in error_line('export.py', tmp_path, '--out_dir=nothing', '--hf_dir=hf')
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep')
    mine = f"--hf_dir={tmp_path / 'mine'}"
    assert '--overwrite=True' in error_line('export.py', work, '--out_dir=dense_char', mine)
    overwrite = '--overwrite=True'
    assert 'not an earlier export' in error_line('export.py', work, '--out_dir=dense_char', mine, overwrite)
    # the run itself
    assert 'not an earlier export' in error_line('export.py', work, '--out_dir=dense_char', '--hf_dir=dense_char',
                                                 overwrite)
    (tmp_path / 'foreign').mkdir()
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / 'foreign' / 'ckpt.pt')
    assert 'not a nanoMoE checkpoint' in error_line('export.py', tmp_path, '--out_dir=foreign', '--hf_dir=new')
    torch.save({'model': torch.nn.Linear(2, 2).state_dict(), 'model_args': {'n_layer': 1}},
               tmp_path / 'foreign' / 'ckpt.pt')
    assert 'not a GPT of this repository' in error_line('export.py', tmp_path, '--out_dir=foreign', '--hf_dir=new')
    assert os.listdir(tmp_path / 'mine') == ['notes.txt']
    assert sorted(os.listdir(tmp_path)) == ['foreign', 'mine']
    assert sorted(os.listdir(work / 'dense_char')) == ['ckpt.pt', 'run.json']
    # an earlier export is replaced
    shutil.copytree(work / 'hf_dense_char', tmp_path / 'earlier')
    run_script('export.py', work, '--out_dir=moe_char', f"--hf_dir={tmp_path / 'earlier'}", overwrite)
    assert sorted(os.listdir(tmp_path / 'earlier')) == sorted(os.listdir(work / 'hf_moe_char'))
