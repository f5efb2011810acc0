"""
Turn the log.jsonl files that train.py writes into the README's plots.
$ python assets/plot.py out-dense out-moe --labels=dense,moe --out=assets

Writes <out>/loss.png: val loss of every run over iterations and over seconds of training
(train_s in the log: evals and checkpoints left out; train loss faint), and
<out>/expert_load_<label>.png for each MoE run: the share of assignments each expert received,
per MoE layer, over iterations (1/n_exp everywhere is perfect balance).
"""
import os
import re
import json
import argparse

import numpy as np
import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt


def read_log(out_dir):
    """ train records (iter, loss, dt_ms, routing) and eval records (iter, val_loss, train_s) of a run;
    of two records of one iteration the later wins """
    train, evals = {}, {}
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        for record in map(json.loads, f):
            (evals if 'val_loss' in record else train)[record['iter']] = record
    return [train[i] for i in sorted(train)], [evals[i] for i in sorted(evals)]


def plot_losses(runs, path):
    fig, (ax_iter, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, (train, evals) in runs.items():
        line, = ax_iter.plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], marker='.', label=label)
        ax_iter.plot([r['iter'] for r in train], [r['loss'] for r in train], alpha=0.15, color=line.get_color())
        ax_time.plot([r['train_s'] for r in evals], [r['val_loss'] for r in evals], marker='.', label=label)
    ax_iter.set_xlabel('iteration')
    ax_time.set_xlabel('seconds of training (evals left out)')
    for ax in (ax_iter, ax_time):
        ax.set_ylabel('val loss')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(train, label, path):
    records = [r for r in train if 'routing' in r]
    layers = sorted(records[0]['routing'], key=int)
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2 + 1.6 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        shares = np.array([r['routing'][layer][0] for r in records]).T  # (E, logged iterations)
        iters = [r['iter'] for r in records]
        n_exp = shares.shape[0]
        image = ax.imshow(shares, aspect='auto', cmap='viridis', vmin=0, vmax=min(1.0, 3 / n_exp),
                          extent=(iters[0], iters[-1], n_exp - 0.5, -0.5), interpolation='nearest')
        ax.set_yticks(range(n_exp))
        ax.set_ylabel(f'layer {layer}\nexpert')
        fig.colorbar(image, ax=ax, label='share')
    axes[-1, 0].set_xlabel('iteration')
    axes[0, 0].set_title(f'{label}: share of assignments per expert (balanced = 1/{n_exp})')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('runs', nargs='+', help="train.py out_dir's")
    parser.add_argument('--labels', help='comma-separated names for the runs (default: the directory names)')
    parser.add_argument('--out', default='.', help='where the PNGs go (default: the current directory)')
    args = parser.parse_args()
    labels = args.labels.split(',') if args.labels else [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    missing = [r for r in args.runs if not os.path.exists(os.path.join(r, 'log.jsonl'))]
    if missing:
        parser.error(f"no log.jsonl in {', '.join(missing)}: point at train.py out_dir's")
    runs = {label: read_log(run) for label, run in zip(labels, args.runs)}
    untimed = [run for run, (_, evals) in zip(args.runs, runs.values()) if any('train_s' not in r for r in evals)]
    if untimed:
        parser.error(f"evals without train_s in {', '.join(untimed)}: logs of a train.py that did not record "
                     "train_s; run again")
    os.makedirs(args.out, exist_ok=True)
    plot_losses(runs, os.path.join(args.out, 'loss.png'))
    print(f"wrote {os.path.join(args.out, 'loss.png')}")
    for label, (train, _) in runs.items():
        if any('routing' in r for r in train):
            path = os.path.join(args.out, 'expert_load_' + re.sub(r'[^A-Za-z0-9.-]+', '_', label) + '.png')
            plot_expert_load(train, label, path)
            print(f"wrote {path}")
