"""
configurator.py run the way train.py runs it: exec'd into a script's globals, as a subprocess.
"""
import os
import sys

import pytest

from conftest import ROOT, run_python

SCRIPT = """
batch_size = 12
learning_rate = 6e-4
compile = True
device = 'cuda'
n_exp = 1
exec(open({configurator!r}).read())
print('RESULT', repr((batch_size, learning_rate, compile, device, n_exp)))
"""


def run(tmp_path, *args):
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT.format(configurator=os.path.join(ROOT, 'configurator.py')))
    p = run_python([sys.executable, str(script), *args], tmp_path)
    result = [line for line in p.stdout.splitlines() if line.startswith('RESULT')]
    return p.returncode, (eval(result[0][7:]) if result else None), p.stderr.strip()


def test_overrides_from_file_then_command_line(tmp_path):
    (tmp_path / 'cfg.py').write_text("import math\nbatch_size = 32\n_helper = 3\nn_exp = 4 * _helper\ndevice = 'cpu'\n")
    code, values, err = run(tmp_path, 'cfg.py', '--batch_size=8', '--learning_rate=1', '--compile=False')
    assert code == 0, err
    assert values == (8, 1.0, False, 'cpu', 12)


def test_each_config_file_and_the_command_line_print_one_line_of_the_keys_they_set(tmp_path):
    (tmp_path / 'cfg.py').write_text("# a comment\nbatch_size = 32\n_helper = 3\nn_exp = 4 * _helper\n")
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT.format(configurator=os.path.join(ROOT, 'configurator.py')) +
                      "print(sorted(given_keys))\n")
    p = run_python([sys.executable, str(script), 'cfg.py', '--device=cpu', '--compile=False'], tmp_path)
    assert p.stdout.splitlines()[:2] == ["cfg.py sets batch_size=32, n_exp=12",
                                         "the command line sets device=cpu, compile=False"]
    assert p.stdout.splitlines()[-1] == "['batch_size', 'compile', 'device', 'n_exp']"  # learning_rate not given


@pytest.mark.parametrize('args,message', [
    (['--n_expp=8'], "error: unknown config key 'n_expp' on the command line (did you mean 'n_exp'?)"),
    (['--n_exp=2.5'], "error: config key 'n_exp' on the command line must be int, got float 2.5"),
    (['--n_exp=True'], "error: config key 'n_exp' on the command line must be int, got bool True"),
    (['--compile=1'], "error: config key 'compile' on the command line must be bool, got int 1"),
    (['--batch_size'], "error: argument '--batch_size' has no value: write --key=value"),
    (['missing.py'], "error: cannot read config file 'missing.py': No such file or directory"),
])
def test_bad_command_line_stops_with_one_line(tmp_path, args, message):
    code, values, err = run(tmp_path, *args)
    assert code != 0 and values is None
    assert err == message


@pytest.mark.parametrize('source,message', [
    ("batch_szie = 4\n", "error: unknown config key 'batch_szie' in cfg.py (did you mean 'batch_size'?)"),
    ("learning_rate = '3e-4'\n", "error: config key 'learning_rate' in cfg.py must be float, got str '3e-4'"),
])
def test_bad_config_file_stops_with_one_line(tmp_path, source, message):
    (tmp_path / 'cfg.py').write_text(source)
    code, values, err = run(tmp_path, 'cfg.py')
    assert code != 0 and values is None
    assert err == message


@pytest.mark.parametrize('arg,device', [
    ('--device=2024', '2024'),  # an int to literal_eval, as --out_dir=2024 or --start=1999
    ('--device=1e3', '1e3'),  # the text, not str(1000.0)
    ('--device=True', 'True'),
    ("--device='cpu'", 'cpu'),  # a quoted string is unquoted, as before
    ('--device=cpu', 'cpu'),
])
def test_str_key_keeps_command_line_text(tmp_path, arg, device):
    code, values, err = run(tmp_path, arg)
    assert code == 0, err
    assert values == (12, 6e-4, True, device, 1)
