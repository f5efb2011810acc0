"""
Every config/*.py, read by configurator.py the way train.py reads it: it may set only train.py's
config keys, each with the type of its default.
"""
import os
import ast
import builtins
import sys
from dataclasses import fields

import pytest
import torch

from model import GPTConfig

from conftest import ROOT, run_python
CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, 'config')) if f.endswith('.py'))

def train_py_defaults():
    """ train.py's config keys and defaults: the assignments above its `config_keys` line """
    tree = ast.parse(open(os.path.join(ROOT, 'train.py')).read())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == 'config_keys':
                break
            defaults[node.targets[0].id] = eval(builtins.compile(ast.Expression(node.value), 'train.py', 'eval'), {'torch': torch})
    return defaults


TRAIN_KEYS = train_py_defaults()

SCRIPT = """
{defaults}
exec(open({configurator!r}).read())
"""


def test_train_py_has_every_gpt_config_key_with_its_type():
    # vocab_size comes from the dataset, not from a config
    assert {f.name for f in fields(GPTConfig)} - {'vocab_size'} <= set(TRAIN_KEYS)
    for f in fields(GPTConfig):
        if f.name in TRAIN_KEYS:
            assert type(TRAIN_KEYS[f.name]) is f.type, f.name


@pytest.mark.parametrize('name', CONFIGS)
def test_config_file_sets_only_train_py_keys_with_their_types(tmp_path, name):
    script = tmp_path / 'script.py'
    defaults = '\n'.join(f'{k} = {v!r}' for k, v in TRAIN_KEYS.items())
    script.write_text(SCRIPT.format(defaults=defaults, configurator=os.path.join(ROOT, 'configurator.py')))
    p = run_python([sys.executable, str(script), os.path.join(ROOT, 'config', name)], tmp_path)
    assert p.returncode == 0 and p.stderr == '', p.stderr
