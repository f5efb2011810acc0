"""
Runs the README's quick start training command exactly as printed there (its thread setting included), into a
temporary out_dir, and checks the best val loss and its iteration against what the README's quick start says.
Run it before changing the README's numbers, from the repository root with data/shakespeare_char prepared:
$ python assets/quick_start.py
Prints the README's numbers, this run's, the time the run took and the machine; exits 1 if the numbers differ.
"""
import os
import re
import sys
import json
import time
import shlex
import tempfile
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = 'python train.py config/train_shakespeare_char_moe.py'  # the quick start's training line holds this
PROMISE = r'best val loss\s+(\d\.\d{4})\s+at\s+iteration\s+(\d+)'  # how the quick start states its result


def readme_quick_start(readme):
    """ the quick start's training command as (environment variables, arguments after `python`), and the best
    val loss and iteration its text promises """
    section = readme.split('## Quick start')[1].split('\n## ')[0]
    line = next(line for line in section.splitlines() if COMMAND in line)
    words = shlex.split(line.split('#')[0])
    python = words.index('python')
    env = dict(word.split('=', 1) for word in words[:python])
    promise = re.search(PROMISE, section)
    if promise is None:
        sys.exit("error: the README's quick start states no 'best val loss <x.xxxx> at iteration <n>'")
    loss, iteration = promise.groups()
    return env, words[python + 1:], (float(loss), int(iteration))


env, argv, (loss, iteration) = readme_quick_start(open(os.path.join(ROOT, 'README.md')).read())
print(f"README: {' '.join(f'{k}={v}' for k, v in env.items())} python {' '.join(argv)}")
print(f"README: best val loss {loss:.4f} at iteration {iteration}")
with tempfile.TemporaryDirectory() as out_dir:
    t0 = time.time()
    p = subprocess.run([sys.executable, *argv, f'--out_dir={out_dir}'], cwd=ROOT, env={**os.environ, **env},
                       stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"error: the quick start's command failed (exit {p.returncode}, its error above)")
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        evals = [r for r in map(json.loads, f) if 'val_loss' in r]
best = min(evals, key=lambda r: r['val_loss'])
threads = env.get('OMP_NUM_THREADS', os.environ.get('OMP_NUM_THREADS', f'unset: {torch.get_num_threads()}'))
print(f"this run: best val loss {best['val_loss']:.4f} at iteration {best['iter']}, {seconds:.0f} s in all "
      f"({best['train_s']:.0f} s of training steps to it); {os.cpu_count()} cores, OMP_NUM_THREADS {threads}, "
      f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
agrees = (round(best['val_loss'], 4), best['iter']) == (loss, iteration)
print("agrees with the README" if agrees else "differs from the README")
sys.exit(0 if agrees else 1)
