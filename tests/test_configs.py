"""
Every config/*.py, read by configurator.py the way train.py reads it: it may set only train.py's
config keys, each with the type of its default.
"""
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from model import GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, 'config')) if f.endswith('.py'))

# train.py's config keys and the type of each default (nanoGPT's keys, then GPTConfig's);
# keep in sync with train.py
TRAIN_KEYS = dict(
    out_dir='out', eval_interval=2000, log_interval=1, eval_iters=200, eval_only=False,
    always_save_checkpoint=True, init_from='scratch', wandb_log=False, wandb_project='owt',
    wandb_run_name='gpt2', dataset='openwebtext', gradient_accumulation_steps=40, batch_size=12,
    block_size=1024, learning_rate=6e-4, max_iters=600000, weight_decay=1e-1, beta1=0.9, beta2=0.95,
    grad_clip=1.0, decay_lr=True, warmup_iters=2000, lr_decay_iters=600000, min_lr=6e-5,
    backend='nccl', device='cuda', dtype='bfloat16', compile=True,
    n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=False, n_exp=1, top_k=2, use_aux_loss=False,
    use_router_z_loss=False, use_noisy_top_k=False, aux_loss_weight=0.01, router_z_loss_weight=0.001,
    train_capacity=1.25, eval_capacity=2.0, min_capacity=4, stride=2, use_switch_tfm_init=False,
    switch_tfm_init_scale=1.0, router_use_full_prec=False,
)

SCRIPT = """
{defaults}
exec(open({configurator!r}).read())
"""


def test_train_keys_cover_gpt_config():
    # vocab_size comes from the dataset, not from a config
    assert {f.name for f in fields(GPTConfig)} - {'vocab_size'} <= set(TRAIN_KEYS)
    for f in fields(GPTConfig):
        if f.name in TRAIN_KEYS:
            assert type(TRAIN_KEYS[f.name]) is f.type, f.name


@pytest.mark.parametrize('name', CONFIGS)
def test_config_sets_only_known_keys(tmp_path, name):
    script = tmp_path / 'script.py'
    defaults = '\n'.join(f'{k} = {v!r}' for k, v in TRAIN_KEYS.items())
    script.write_text(SCRIPT.format(defaults=defaults, configurator=os.path.join(ROOT, 'configurator.py')))
    p = subprocess.run([sys.executable, str(script), os.path.join(ROOT, 'config', name)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == '', p.stderr
