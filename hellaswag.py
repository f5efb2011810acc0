"""
HellaSwag (Zellers et al. 2019, https://arxiv.org/abs/1905.07830): pick the likeliest of 4 endings of a
sentence, scored the completion way of build-nanogpt and llm.c. Each ending is appended to the context; the
cross-entropy of the ending's tokens alone, summed, picks one ending (acc) and, averaged per token, another
(acc_norm). train.py scores it at every eval with --hellaswag=True:
$ python data/hellaswag/prepare.py  # once: data/hellaswag/hellaswag_val.jsonl
$ python train.py config/eval_gpt2.py --hellaswag=True
Shapes: n items, B items a forward, 4 rows an item (context and one ending), T tokens a row, V vocabulary.
"""
import os
import json
import math

import torch
from torch.nn import functional as F
from tqdm import tqdm

from tokenizer import gpt2_encoding

PATH = os.path.join('data', 'hellaswag', 'hellaswag_val.jsonl')  # where prepare.py writes, train.py reads


def read_items(path, n_items=0):
    """ The first n_items (0: all) of a HellaSwag jsonl, each a dict with a 'ctx' string, 4 'endings' strings
    and a 'label' 0-3. ValueError names the fix for a missing file or the first line that is no such item """
    if n_items < 0:
        raise ValueError(f"hellaswag_items={n_items} must be >= 0 (0: all)")
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: run python data/hellaswag/prepare.py first")
    items = []
    with open(path, encoding='utf-8') as f:
        for i, line in enumerate(f, 1):
            try:
                item = json.loads(line)
                ok = isinstance(item['ctx'], str) and item['label'] in (0, 1, 2, 3) \
                    and len(item['endings']) == 4 and all(isinstance(e, str) and e for e in item['endings'])
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"{path} line {i} is not a HellaSwag item (a JSON object with 'ctx', 4 "
                                 "non-empty 'endings' and a 'label' 0-3): give the HellaSwag authors' file")
            items.append(item)
            if len(items) == n_items:
                break
    return items


def render(items, block_size):
    """ The items as inputs x and targets y, (n, 4, T) each, T = the longest row's tokens less one, at most
    block_size, for every item alike: one shape for torch.compile. Row j is the context, a space and ending j;
    y is the next token at the ending's tokens and -1 (no loss) elsewhere, padding too. A longer row loses
    its first tokens, as nanoGPT crops a prompt. Returns x, y and the labels (n,) """
    enc = gpt2_encoding()
    rows = []
    for item in items:
        context = enc.encode_ordinary(item['ctx'])
        endings = [enc.encode_ordinary(' ' + ending) for ending in item['endings']]
        rows.append([(context + ending, len(ending)) for ending in endings])
    T = min(block_size, max(len(tokens) for item in rows for tokens, _ in item) - 1)
    x = torch.zeros(len(items), 4, T, dtype=torch.long)  # padding after a row: causal attention never sees it
    y = torch.full((len(items), 4, T), -1, dtype=torch.long)
    for i, item in enumerate(rows):
        for j, (tokens, n_ending) in enumerate(item):
            tokens = torch.tensor(tokens[-(T + 1):])
            x[i, j, :len(tokens) - 1] = tokens[:-1]
            first = max(len(tokens) - 1 - n_ending, 0)  # where the target is the ending's first token
            y[i, j, first:len(tokens) - 1] = tokens[first + 1:]
    return x, y, torch.tensor([item['label'] for item in items])


def scores(model, x, y):
    """ The summed and the mean cross-entropy of each row's ending, (B, 4) each, for x, y (B, 4, T). MoE
    layers route dropless: a row's experts, and so its score, never depend on the other rows in the batch """
    B, _, T = x.size()
    logits, _ = model(x.view(-1, T), y.view(-1, T), dropless=True)  # (4B, T, V)
    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction='none')
    total = losses.view(B, 4, T).sum(-1)  # (B, 4)
    return total, total / (y != -1).sum(-1)


@torch.no_grad()
def evaluate(model, data, batch_size, device, autocast, rank=0, world_size=1):
    """ HellaSwag's acc and acc_norm of model (in eval mode) on data, render's (x, y, labels): B = batch_size
    // 4 items a forward (4B rows), each process scoring every world_size-th batch. Under FSDP every process
    runs as many forwards, a last one past the items not counted. One all-reduce of the counts: every process
    gets one process's result """
    x, y, labels = data
    n, B = len(labels), max(batch_size // 4, 1)
    batches = math.ceil(n / B)
    correct = torch.zeros(2, device=device)  # items right by the summed loss, by the mean loss
    local_batches = range(rank, math.ceil(batches / world_size) * world_size, world_size)
    for b in tqdm(local_batches, desc="hellaswag", unit='forward', leave=False, disable=rank != 0, delay=2):
        items = torch.arange(b * B, (b + 1) * B)  # (B,)
        counted = (items < n).to(device)
        items = items.clamp(max=n - 1)
        with autocast:
            total, mean = scores(model, x[items].to(device), y[items].to(device))
        label = labels[items].to(device)
        correct[0] += ((total.argmin(-1) == label) & counted).sum()
        correct[1] += ((mean.argmin(-1) == label) & counted).sum()
    if world_size > 1:
        torch.distributed.all_reduce(correct)  # counts below 2^24: exact in float32
    right, right_norm = correct.tolist()
    return {'hellaswag_acc': right / n, 'hellaswag_acc_norm': right_norm / n}


def line(scores):
    """ evaluate's scores as a part of train.py's eval line; [] for none """
    if not scores:
        return []
    return [f"hellaswag acc {scores['hellaswag_acc']:.4f}, acc_norm {scores['hellaswag_acc_norm']:.4f}"]
