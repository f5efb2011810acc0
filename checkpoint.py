"""
What a run starts from and keeps in its out_dir, written so that a run killed at any moment can resume from it:
ckpt.pt, nanoGPT's checkpoint (model, optimizer, model_args, iter_num, best_val_loss, config) with the float16
GradScaler's state and train_s; log.jsonl, one JSON record per log line and eval; and run.json, the record of
the run (its config, the versions and the git commit that made it).
Under FSDP and expert parallelism the state is gathered whole on rank 0 and written as one process writes
it: a checkpoint resumes under DDP, FSDP, expert parallelism or one process alike.
"""
import os
import re
import sys
import json
import pickle
import tempfile
import subprocess
from dataclasses import asdict, fields

import torch

from model import GPT, GPTConfig, DENSE_KEYS, RUN_SETTINGS
from parallel import gather_experts, local_optimizer_state

# The keys of where and how a run runs, not of what it is. A resumed run takes them from this command line and the
# defaults, so that it can go on with another device, dtype, parallelism, compile or wandb setting.
WHERE_AND_HOW = ('init_from', 'out_dir', 'eval_only', 'device', 'dtype', 'compile', 'backend', 'fsdp', 'ep_size',
                 'wandb_log')


def check_run_dirs(init_from, out_dir, eval_only):
    """ Returns None if init_from names a model to start from and out_dir can take this run (and can be made, for
    a training run). Raises a ValueError naming the fix otherwise """
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    named = init_from in ('scratch', 'resume') or init_from.startswith('gpt2') or os.path.isdir(init_from)
    if not named:
        raise ValueError(f"init_from='{init_from}' is not 'scratch', 'resume', a GPT-2 name (gpt2, gpt2-medium, "
                         "gpt2-large, gpt2-xl) or a local GPT-2 directory")
    if os.path.isdir(init_from) and os.path.abspath(init_from) == os.path.abspath(out_dir):
        raise ValueError(f"init_from is out_dir '{out_dir}': use init_from='resume' to continue that run, "
                         "or another --out_dir")
    if init_from == 'resume' and not os.path.exists(ckpt_path):
        raise ValueError(f"init_from='resume' but there is no checkpoint at {ckpt_path}: train with "
                         "init_from='scratch' first, or set --out_dir")
    if init_from != 'resume' and not eval_only and os.path.exists(ckpt_path):
        raise ValueError(f"out_dir '{out_dir}' holds a run's checkpoint: continue it with --init_from=resume, "
                         "or pick another --out_dir")
    # out_dir is made after the model is built: make and remove a directory in it now, to fail before any work
    if not eval_only and not os.path.isdir(out_dir):
        parent = os.path.normpath(out_dir)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        parent = parent or '.'
        try:
            os.rmdir(tempfile.mkdtemp(dir=parent))
        except OSError as e:
            raise ValueError(f"out_dir '{out_dir}' cannot be made in {parent} ({e.strerror}): "
                             "pick another --out_dir")


def saved_settings(ckpt_path, config, given):
    """ Returns the settings the run in ckpt_path goes on with: its saved config's values of the keys of config,
    but for WHERE_AND_HOW and the keys given now (config files, --key=value), which keep config's. It prints one
    line of the given keys that change a saved value, leaving out the model's keys, which model_args_with lists.
    A key the run did not save (a checkpoint of nanoGPT, or of an older version) is not in the result """
    saved = load_checkpoint(ckpt_path, 'cpu').get('config', {})
    model_keys = {f.name for f in fields(GPTConfig)}
    restored, changed = {}, []
    for key, value in saved.items():
        if key not in config or key in WHERE_AND_HOW:
            continue
        if key not in given:
            restored[key] = value
        elif value != config[key] and key not in model_keys:
            changed.append(f"{key} {value} -> {config[key]}")
    if changed:
        print(f"given over the run's saved config: {', '.join(changed)}")
    return restored


def load_checkpoint(path, device):
    """ Returns the checkpoint at path, written by train.py, nanoGPT or the earlier nanoMoE. It loads with
    weights_only=True, which unpickles tensors and plain data only, so a file from elsewhere cannot run code as it
    loads. A missing, truncated, foreign or code-carrying file raises a one-line ValueError """
    try:
        # memory-mapped: a tensor's bytes are read when used, and a process that uses a part reads that part
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {path}: train first, or point --out_dir at a run's directory")
    except pickle.UnpicklingError as e:  # weights_only met something other than tensors and plain data
        found = re.search(r'GLOBAL (\S+)', str(e))
        what = found[1] if found else 'not plain data'
        raise ValueError(f"{path} holds a pickled object ({what}) that could run "
                         "code as it loads: refused. Load only checkpoints you made, or re-save its tensors and "
                         "plain data from a trusted copy")
    except Exception as e:  # a truncated file, a denied permission, too little memory: the message says which
        message = str(e).strip().splitlines()
        raise ValueError(f"{path} cannot be loaded: {type(e).__name__}{': ' + message[0] if message else ''}")
    if not isinstance(checkpoint, dict) or not {'model', 'model_args'} <= set(checkpoint):
        raise ValueError(f"{path} is not a nanoMoE checkpoint (it has no 'model' and 'model_args')")
    return checkpoint


def model_args_with(saved, given, source):
    """ Returns a saved model's GPTConfig args with the given ones (a config file's or the command line's) over
    them. A given run setting (RUN_SETTINGS) replaces the saved one, and one printed line lists what changed. A
    given key that shapes the weights must equal the saved one, else it raises a ValueError. A key not given
    keeps its saved value """
    args = {**asdict(GPTConfig()), **saved}  # the earlier nanoMoE saved no expert_hidden, n_shared_exp, ...
    changed = []
    for key, value in given.items():
        if value == args[key]:
            continue
        if key not in RUN_SETTINGS:
            raise ValueError(f"{key}={value} is not {source}'s {args[key]}, and of a saved model only the run "
                             f"settings can change: leave {key} out or give --{key}={args[key]}")
        changed.append(f"{key} {args[key]} -> {value}")
        args[key] = value
    if changed:
        print(f"run settings given over {source}'s: {', '.join(changed)}")
    return args


def model_from_checkpoint(checkpoint, given=None, source='the checkpoint'):
    """ Returns the GPT a train.py checkpoint describes, with its weights, and the given keys as model_args_with
    applies them """
    model = GPT(GPTConfig(**model_args_with(checkpoint['model_args'], given or {}, source)))
    # torch.compile'd models save their parameters under an '_orig_mod.' prefix
    model.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()})
    return model


def exported_moe(path):
    """ Returns whether path is a directory export.py wrote for an MoE run (a dense one is a GPT-2 directory) """
    config_path = os.path.join(path, 'config.json')
    if not os.path.exists(config_path):
        return False
    with open(config_path) as f:
        return json.load(f).get('model_type') == 'nanomoe'


def model_from_export(hf_dir, given=None):
    """ Returns the GPT of an MoE run's export.py directory: its config.json's GPTConfig keys with the given ones
    as model_args_with applies them, and the weights of its safetensors """
    from safetensors.torch import load_file
    with open(os.path.join(hf_dir, 'config.json')) as f:
        hf_config = json.load(f)
    saved = {k: v for k, v in hf_config.items() if k in GPTConfig.__dataclass_fields__}
    saved['top_k'] = hf_config['num_experts_per_tok']  # transformers reserves the name top_k for sampling
    model = GPT(GPTConfig(**model_args_with(saved, given or {}, hf_dir)))
    weights = {}
    for name in sorted(os.listdir(hf_dir)):  # model.safetensors, or the shards save_pretrained splits a big one in
        if name.startswith('model') and name.endswith('.safetensors'):
            weights.update(load_file(os.path.join(hf_dir, name)))
    weights.setdefault('lm_head.weight', weights['transformer.wte.weight'])  # tied: the file holds one of them
    model.load_state_dict(weights)
    return model


def load_weights(init_from, given):
    """ Returns a new run's model: another run's (a directory with a ckpt.pt) or GPT-2's (a name or a
    save_pretrained directory), with the given keys as model_args_with applies them. A dense model takes only the
    dense keys, as start_model upcycles it with the others """
    run_ckpt_path = os.path.join(init_from, 'ckpt.pt')
    dense_given = {k: v for k, v in given.items() if k in DENSE_KEYS}
    if os.path.exists(run_ckpt_path):
        print(f"Initializing from the weights of the run in {init_from}")
        checkpoint = load_checkpoint(run_ckpt_path, 'cpu')
        dense = checkpoint['model_args'].get('n_exp', 1) == 1
        return model_from_checkpoint(checkpoint, dense_given if dense else given, init_from)
    if exported_moe(init_from):
        print(f"Initializing from the MoE model exported to {init_from}")
        return model_from_export(init_from, given)
    print(f"Initializing from OpenAI GPT-2 weights: {init_from}")
    model = GPT.from_pretrained(init_from, {k: v for k, v in given.items() if k == 'dropout'})
    model_args_with(asdict(model.config), dense_given, init_from)  # GPT-2's shape: the given keys must agree
    return model


def start_model(init_from, out_dir, args, given, vocab_size):
    """ Returns what a run starts from: the model's GPTConfig, its weights as a state dict on the CPU (None for a
    new model), and the checkpoint it goes on from (None unless init_from='resume'). The model is a new one of
    args (the config's model keys, vocab_size from the data or GPT-2's 50304), out_dir's run, or another run's
    or GPT-2's weights, upcycled if dense and args' n_exp > 1 and cropped to a smaller given block_size. A saved
    model takes the given keys as model_args_with applies them. A bad input raises a ValueError """
    if init_from == 'scratch':
        print("Initializing a new model from scratch")
        if vocab_size is None:
            print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
        return GPTConfig(**args, vocab_size=vocab_size or 50304), None, None
    block_size = given.get('block_size')
    if init_from == 'resume':
        print(f"Resuming training from {out_dir}")
        checkpoint = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), 'cpu')
        saved_block_size = checkpoint['model_args']['block_size']
        if block_size not in (None, saved_block_size):  # a crop would leave AdamW's state for wpe at the old size
            raise ValueError(f"block_size={block_size} is not the checkpoint's {saved_block_size}: resume with "
                             f"--block_size={saved_block_size}, or start a new run from its weights with "
                             f"--init_from={out_dir} --out_dir=<a new directory>")
        # torch.compile'd models save their parameters under an '_orig_mod.' prefix
        weights = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
        return GPTConfig(**model_args_with(checkpoint['model_args'], given, 'the checkpoint')), weights, checkpoint
    model = load_weights(init_from, {k: v for k, v in given.items() if k != 'block_size'})
    if model.config.n_exp == 1 and args['n_exp'] > 1:
        model = model.upcycle(**{k: v for k, v in args.items() if k not in DENSE_KEYS})
        print(f"upcycled: every expert starts as a copy of its block's MLP ({args['n_exp']} experts, "
              f"top_k={args['top_k']})")
    if block_size is not None and block_size > model.config.block_size:
        raise ValueError(f"block_size={block_size} is larger than {init_from}'s {model.config.block_size}: "
                         f"use --block_size={model.config.block_size} or less")
    if block_size is not None and block_size < model.config.block_size:  # e.g. GPT-2's 1024 to a shorter one
        model.crop_block_size(block_size)
    return model.config, model.state_dict(), None


def _rekey(optim_state, key):
    """ Returns AdamW's state with its parameters renamed by key. ckpt.pt names them by index, as
    optimizer.state_dict() does, and FSDP's state-dict functions name them as the model does """
    return {'state': {key[k]: v for k, v in optim_state['state'].items()},
            'param_groups': [{**g, 'params': [key[k] for k in g['params']]} for g in optim_state['param_groups']]}


def _param_names(model, optimizer):
    """ Returns the names of the optimizer's parameters in the model, in the optimizer's order, which gives their
    indices in ckpt.pt """
    name = {p: n for n, p in model.named_parameters()}
    return [name[p] for group in optimizer.param_groups for p in group['params']]


def load_optimizer_state(model, optimizer, scaler, checkpoint):
    """ Loads AdamW's and the GradScaler's state from ckpt.pt. Under FSDP and expert parallelism each process
    keeps its part of the whole state (parallel.local_optimizer_state) """
    kernels = [{k: g[k] for k in ('fused', 'foreach') if k in g} for g in optimizer.param_groups]
    if checkpoint.get('scaler'):  # an empty dict unless the run trains in float16; absent in nanoGPT's format
        scaler.load_state_dict(checkpoint['scaler'])
    optimizer.load_state_dict(local_optimizer_state(model, optimizer, checkpoint['optimizer']))
    for group, kernel in zip(optimizer.param_groups, kernels):  # this run's AdamW kernels, not the saved one's
        group.update(kernel)


def save_checkpoint(path, model, optimizer, scaler, fsdp, **run_state):
    """ Writes ckpt.pt from rank 0, to a temporary file renamed over path, so that a kill mid-write leaves the old
    one. Every process calls it: under FSDP each sends its shards and under expert parallelism its experts to rank
    0, which receives the whole state on the CPU """
    expert_weights, expert_moments = gather_experts(model, optimizer)  # under expert parallelism, from all
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
        names = _param_names(model, optimizer)  # once FSDP holds the sharded parameters again
    else:
        names = _param_names(model, optimizer)
        model_state, optim_state = model.state_dict(), _rekey(optimizer.state_dict(), dict(enumerate(names)))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    model_state.update(expert_weights)
    optim_state['state'].update(expert_moments)
    optim_state = _rekey(optim_state, {name: i for i, name in enumerate(names)})
    print(f"saving checkpoint to {os.path.dirname(path)}")
    checkpoint = dict(model=model_state, optimizer=optim_state, scaler=scaler.state_dict(), **run_state)
    torch.save(checkpoint, path + '.tmp')
    os.replace(path + '.tmp', path)


def _logged_iter(line):
    """ Returns the iteration of a log.jsonl line, None for one cut short by a crash mid-write """
    try:
        return json.loads(line)['iter']
    except ValueError:
        return None


def trim_log(path, iter_num):
    """ Drops, atomically, log.jsonl's records from iter_num on: the steps (and an eval) a resumed run does
    again, and all of them for a new run. The log then reads as that of one run that never stopped """
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if (it := _logged_iter(line)) is not None and it < iter_num]
    with open(path + '.tmp', 'w') as f:
        f.writelines(kept)
    os.replace(path + '.tmp', path)


def write_run_record(out_dir, **setup):
    """ Writes run.json: the run's config and setup next to its log, with the versions and the git commit """
    git = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(out_dir, 'run.json'), 'w') as f:
        json.dump(dict(**setup, torch=torch.__version__, python=sys.version.split()[0],
                       git_commit=git.stdout.strip() or None), f, indent=1)
