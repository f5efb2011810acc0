"""
HellaSwag scoring (hellaswag.py), its data (data/hellaswag/prepare.py) and train.py's hellaswag=True, on a
3-item stand-in for HellaSwag's validation file, against a hand computation of each ending's losses.
"""
import json
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT, TORCHRUN, TINY, TIKTOKEN_CACHE, needs_gpt2_bpe, train, run_python
import hellaswag
from model import GPT, GPTConfig
from tokenizer import gpt2_encoding

os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)  # for this process and the scripts it runs

# made-up items in HellaSwag's form; the endings' lengths differ, so summed and mean losses pick differently
ITEMS = [
    dict(ctx="A woman is standing in a kitchen holding a bowl. She", label=0,
         endings=["stirs the batter with a wooden spoon.", "jumps.", "throws the bowl out of the window and "
                  "laughs loudly at the neighbours walking their dogs.", "puts the bowl on the counter."]),
    dict(ctx="Two men are playing chess in a park. One of them", label=0,
         endings=["moves his knight.", "eats the rook while the other man watches the pigeons fly over the "
                  "trees.", "sleeps.", "shakes hands with the other man and they start a new game."]),
    dict(ctx="A boy rides a bike down the street. He", label=0,
         endings=["stops at the corner.", "rings the bell twice as a dog runs across the road in front of "
                  "him.", "flies.", "waves to a friend."]),
]
TINY_GPT = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=50304)
MOE_GPT = dict(n_exp=4, top_k=2, eval_capacity=0.5)  # 0.5: an expert in eval keeps a quarter of the tokens


def write_items(path, items):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.writelines(json.dumps(item) + '\n' for item in items)


def tiny_model(**moe):
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY_GPT, **moe)).eval()


@torch.no_grad()
def hand_scores(model, item):
    """ each ending's summed and mean loss, one unpadded row at a time: -log p(token | the tokens before) """
    enc = gpt2_encoding()
    context = enc.encode(item['ctx'])
    sums, means = [], []
    for ending in item['endings']:
        tokens = context + enc.encode(' ' + ending)
        logits, _ = model(torch.tensor([tokens]), torch.tensor([tokens]))  # targets: logits at every position
        logp = F.log_softmax(logits[0], dim=-1)  # (T, V)
        losses = [-logp[t - 1, tokens[t]] for t in range(len(context), len(tokens))]
        sums.append(sum(losses).item())
        means.append(sums[-1] / len(losses))
    return torch.tensor(sums), torch.tensor(means)


def labelled(model):
    """ ITEMS labelled with the hand computation's lowest mean loss (acc_norm 1), and the acc that gives """
    sums, means = zip(*(hand_scores(model, item) for item in ITEMS))
    labels = [int(m.argmin()) for m in means]
    acc = sum(int(s.argmin()) == label for s, label in zip(sums, labels)) / len(ITEMS)
    assert acc < 1  # summed and mean losses pick differently at least once: a swap of acc and acc_norm shows
    return [{**item, 'label': label} for item, label in zip(ITEMS, labels)], acc


@needs_gpt2_bpe
def test_scores_and_choices_are_those_of_a_hand_computation():
    model = tiny_model()
    x, y, labels = hellaswag.render(ITEMS, model.config.block_size)
    total, mean = hellaswag.scores(model, x, y)
    for i, item in enumerate(ITEMS):
        hand_sum, hand_mean = hand_scores(model, item)
        torch.testing.assert_close(total[i], hand_sum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mean[i], hand_mean, rtol=1e-5, atol=1e-5)
    items, acc = labelled(model)
    result = hellaswag.evaluate(model, hellaswag.render(items, model.config.block_size), 8, 'cpu', torch.no_grad())
    assert result == {'hellaswag_acc': acc, 'hellaswag_acc_norm': 1.0}


@needs_gpt2_bpe
def test_padding_does_not_change_a_score():
    model = tiny_model()
    x, y, _ = hellaswag.render(ITEMS, model.config.block_size)
    # 7 more positions of any tokens: later tokens never reach earlier ones, and their targets are -1
    pad = torch.randint(50257, (3, 4, 7), generator=torch.Generator().manual_seed(0))
    padded = hellaswag.scores(model, torch.cat([x, pad], -1), torch.cat([y, torch.full_like(pad, -1)], -1))
    for a, b in zip(hellaswag.scores(model, x, y), padded):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


@needs_gpt2_bpe
def test_a_row_longer_than_the_block_loses_its_first_tokens():
    enc = gpt2_encoding()
    x, y, _ = hellaswag.render(ITEMS[:1], 8)
    tokens = enc.encode(ITEMS[0]['ctx']) + enc.encode(' ' + ITEMS[0]['endings'][1])  # "jumps.": 2 tokens
    assert x[0, 1].tolist() == tokens[-9:-1]
    assert y[0, 1].tolist() == [-1] * 6 + tokens[-2:]


@needs_gpt2_bpe
def test_moe_scores_do_not_depend_on_the_other_items_in_the_batch():
    model = tiny_model(**MOE_GPT)
    x, y, _ = hellaswag.render(ITEMS, model.config.block_size)
    alone, batched = hellaswag.scores(model, x[:1], y[:1]), hellaswag.scores(model, x, y)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-5)
    # with capacity, the same rows' logits do change with the batch: the test can tell
    T = x.size(-1)
    with torch.no_grad():
        logits_alone, _ = model(x[:1].view(-1, T), y[:1].view(-1, T))
        logits_batched, _ = model(x.view(-1, T), y.view(-1, T))
    assert not torch.allclose(logits_alone, logits_batched[:4], atol=1e-4)


@pytest.fixture(scope='module')
def bpe_workdir(tmp_path_factory):
    """ a GPT-2 BPE dataset of random tokens, and the stand-in items labelled by an MoE model saved as a run
    (ITEMS labelled as labelled() does, the acc that gives) """
    work = tmp_path_factory.mktemp('hellaswag')
    (work / 'data' / 'bpe').mkdir(parents=True)
    tokens = np.random.default_rng(0).integers(50257, size=5000).astype(np.uint16)
    tokens.tofile(work / 'data' / 'bpe' / 'train.bin')
    tokens.tofile(work / 'data' / 'bpe' / 'val.bin')
    model = tiny_model(**MOE_GPT)
    (work / 'model').mkdir()
    torch.save(dict(model=model.state_dict(), model_args=asdict(model.config)), work / 'model' / 'ckpt.pt')
    dropless = tiny_model(**{**MOE_GPT, 'eval_capacity': 0.0})  # the same weights, dropless by its config
    items, acc = labelled(dropless)
    return work, items, acc


@needs_gpt2_bpe
def test_two_processes_score_as_one(bpe_workdir):
    """ train.py eval_only under torchrun with FSDP, 3 items, 1 a forward: rank 1 runs a last forward past the
    items. It prints the acc and acc_norm of one process's hand computation """
    work, items, acc = bpe_workdir
    write_items(work / hellaswag.PATH, items)
    out = work / 'out'
    p = train(work, '--dataset=bpe', '--device=cpu', '--compile=False', '--eval_iters=2', '--batch_size=4',
              '--block_size=64', f'--init_from={work / "model"}', '--eval_only=True', '--hellaswag=True',
              f'--out_dir={out}', '--fsdp=True', launcher=TORCHRUN)
    assert "step 0: train loss " in p.stdout and f", hellaswag acc {acc:.4f}, acc_norm 1.0000" in p.stdout
    assert not out.exists()  # the eval of a model that is no run in out_dir: printed only


@needs_gpt2_bpe
def test_an_eval_without_a_prepared_data_set_scores_hellaswag_alone_and_writes_nothing(bpe_workdir, tmp_path):
    work, items, acc = bpe_workdir
    write_items(work / hellaswag.PATH, items)
    (work / 'data' / 'unprepared').mkdir(exist_ok=True)  # as data/openwebtext/ before its prepare.py runs
    out = tmp_path / 'out'
    p = train(work, '--dataset=unprepared', '--device=cpu', '--compile=False', '--batch_size=4', '--block_size=64',
              f'--init_from={work / "model"}', '--eval_only=True', '--hellaswag=True', f'--out_dir={out}')
    assert f"step 0: hellaswag acc {acc:.4f}, acc_norm 1.0000" in p.stdout.splitlines()
    assert not out.exists()  # the eval of a model that is no run in out_dir: printed only


@needs_gpt2_bpe
def test_missing_hellaswag_file_is_one_error_line_naming_prepare(bpe_workdir, tmp_path):
    work, _, _ = bpe_workdir
    (tmp_path / 'data').mkdir()
    os.symlink(work / 'data' / 'bpe', tmp_path / 'data' / 'bpe')
    p = train(tmp_path, '--dataset=bpe', '--device=cpu', '--hellaswag=True', check=False)
    assert p.returncode == 1 and not os.path.exists(tmp_path / 'out')
    assert p.stderr.splitlines() == [f"error: {hellaswag.PATH} not found: run python data/hellaswag/prepare.py "
                                     "first"]


def test_char_level_dataset_with_hellaswag_is_one_error_line(workdir):
    p = train(workdir, *TINY, '--hellaswag=True', f'--out_dir={workdir / "out-hellaswag"}', check=False)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("error: hellaswag=True scores a GPT-2 BPE model, but shakespeare_char has its "
                               "own vocabulary")
    assert not os.path.exists(workdir / 'out-hellaswag')


def prepare(tmp_path, *args):
    script = os.path.join(ROOT, 'data', 'hellaswag', 'prepare.py')
    return run_python([sys.executable, script, f'--out_dir={tmp_path / "out"}', *args], os.getcwd(), timeout=60)


def test_prepare_takes_a_local_file(tmp_path):
    write_items(tmp_path / 'val.jsonl', ITEMS)
    p = prepare(tmp_path, f'--input={tmp_path / "val.jsonl"}')
    assert p.returncode == 0, p.stderr
    assert os.listdir(tmp_path / 'out') == ['hellaswag_val.jsonl']
    assert hellaswag.read_items(tmp_path / 'out' / 'hellaswag_val.jsonl') == ITEMS


def test_prepare_with_a_missing_or_foreign_file_is_one_error_line_and_writes_nothing(tmp_path):
    p = prepare(tmp_path, f'--input={tmp_path / "missing.jsonl"}')
    assert p.returncode == 1 and p.stderr.splitlines() == [
        f"error: no file {tmp_path / 'missing.jsonl'} for --input: give the path of hellaswag_val.jsonl"]
    assert not os.path.exists(tmp_path / 'out')
    write_items(tmp_path / 'val.jsonl', [*ITEMS, {**ITEMS[0], 'endings': ITEMS[0]['endings'][:3]}])
    p = prepare(tmp_path, f'--input={tmp_path / "val.jsonl"}')
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith(f"error: {tmp_path / 'val.jsonl'} line 4 is not a HellaSwag item")
    assert not os.path.exists(tmp_path / 'out')
