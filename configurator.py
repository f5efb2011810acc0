"""
Poor Man's Configurator, as in nanoGPT. Probably a terrible idea. Example usage:
$ python train.py config/train_shakespeare_char.py --batch_size=32
this will first run config/train_shakespeare_char.py, then override batch_size to 32

The code in this file will be run as follows from e.g. train.py:
>>> exec(open('configurator.py').read())

So it's not a Python module, it's just shuttling this code away from train.py.
The config keys are train.py's globals of type bool, int, float or str.

Stricter than nanoGPT's: a name a config file or --key=value sets that is not a config key, or a
value of another type (an int is accepted for a float), stops the script with one line naming
the key and the closest valid one. Helper names in a config file start with '_'; imported
modules are ignored. On the command line a str key keeps the text of any value that is not a
quoted string: --out_dir=2024 is '2024'. Each config file, and the command line, prints one line of
the keys it sets (a file's: the names it assigns); afterwards `given_keys` names them all.
"""
import os
import sys
import builtins
import types
import difflib
import ast
from ast import literal_eval


def _fail(message):
    """ one error line and exit. Under torchrun (train.py) the first process to fail says it: see
    parallel.say_error_once, imported only there, so that the configurator needs no torch """
    if 'RANK' in os.environ:
        from parallel import say_error_once
        say_error_once(message)
    else:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _configure(config, argv):
    """ set config's keys from the config files and --key=value arguments in argv, printing a line of what each
    file and the command line set; returns the keys they set """
    given, set_by_command_line = set(), {}
    known = {k: v for k, v in config.items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))}

    def checked(key, value, where):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _fail(f"unknown config key '{key}' {where}{hint}")
        want = type(known[key])
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            _fail(f"config key '{key}' {where} must be {want.__name__}, got {type(value).__name__} {value!r}")
        return value

    for arg in argv:
        if '=' not in arg:
            # assume it's the name of a config file
            if arg.startswith('--'):
                _fail(f"argument '{arg}' has no value: write --key=value")
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                _fail(f"cannot read config file '{arg}': {e.strerror}")
            namespace, set_by_file = {k: config[k] for k in known}, {}
            tree = ast.parse(source, arg)
            assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            exec(builtins.compile(tree, arg, "exec"), namespace)  # train.py has a `compile` key
            for key, value in namespace.items():
                if key not in assigned or key.startswith('_') or \
                        isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue  # the keys it does not set, helpers, imports, functions
                config[key] = checked(key, value, f"in {arg}")
                given.add(key)
                set_by_file[key] = config[key]
            print(f"{arg} sets " + ", ".join(f"{k}={v}" for k, v in set_by_file.items()))
        else:
            # assume it's a --key=value argument
            if not arg.startswith('--'):
                _fail(f"argument '{arg}' must look like --key=value")
            key, val = arg[2:].split('=', 1)
            try:
                value = literal_eval(val)
            except (SyntaxError, ValueError):
                value = val  # a plain string such as --device=cpu
            if isinstance(config.get(key), str) and not isinstance(value, str):
                value = val  # the text, not str(value): --out_dir=1e3 stays '1e3', not '1000.0'
            config[key] = checked(key, value, "on the command line")
            given.add(key)
            set_by_command_line[key] = config[key]
    if set_by_command_line:
        print("the command line sets " + ", ".join(f"{k}={v}" for k, v in set_by_command_line.items()))
    return given


given_keys = _configure(globals(), sys.argv[1:])  # train.py: a saved model's settings the user gave anew
