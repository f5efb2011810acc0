"""
What train.py checks of its config, data and out_dir's setup before any work: run_problem returns the first
mistake as one line naming the fix (train.py says it and exits 1), loaded_model_problem and model_problem the
same once the model is loaded and its config known, run_warnings the lines to print and go on.
"""
import os
import netrc
import importlib.util
from types import SimpleNamespace

import torch

from parallel import parallel_setup_problem
from tokenizer import char_meta_path


def wandb_cannot_log():
    """ Why wandb.init would fail, or '': offline, from WANDB_MODE, WANDB_API_KEY and wandb login's ~/.netrc """
    if importlib.util.find_spec('wandb') is None:
        return "wandb is not installed: pip install wandb"
    host = os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai').split('//')[-1].split('/')[0]
    path = os.environ.get('NETRC') or os.path.expanduser('~/.netrc')
    if os.environ.get('WANDB_MODE') in ('offline', 'disabled') or os.environ.get('WANDB_API_KEY') or \
            (os.path.exists(path) and netrc.netrc(path).authenticators(host)):
        return ""
    return f"wandb is not logged in (no WANDB_API_KEY, no {host} in {path}): run `wandb login`, " \
        "or set WANDB_MODE=offline"


def run_problem(config, device, device_type, dtype, ddp, world_size, master_process, data_dir, splits, meta):
    """ The first mistake in train.py's config (device and dtype as pick_device made them) for these processes
    and the data in data_dir (splits: its .bin files, meta: its character vocabulary or None), as one line
    naming the fix; None if there is none """
    c = SimpleNamespace(**config)
    for key in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters',
                'log_interval'):
        if config[key] < 1:
            return f"{key}={config[key]} must be >= 1"
    if c.seed < 0:
        return f"seed={c.seed} must be >= 0 (numpy seeds the batches with it)"
    if c.optimizer not in ('adamw', 'muon'):
        return f"optimizer='{c.optimizer}' is not 'adamw' or 'muon'"
    if dtype not in ('float32', 'bfloat16', 'float16'):
        return f"dtype='{dtype}' is not one of float32, bfloat16, float16 ('' picks one for the device)"
    if device_type == 'cuda' and not torch.cuda.is_available():
        return f"device='{device}' but torch finds no CUDA GPU: use --device=cpu, or leave device empty to pick"
    if (problem := parallel_setup_problem(c.fsdp, c.ep_size, ddp, world_size, dtype, c.backend)):
        return problem
    if c.gradient_accumulation_steps % world_size != 0:
        return (f"gradient_accumulation_steps={c.gradient_accumulation_steps} is not divisible by the "
                f"{world_size} processes: it counts the micro-steps of all of them; add "
                f"--gradient_accumulation_steps={-(-c.gradient_accumulation_steps // world_size) * world_size} "
                "(or another multiple)")
    if c.wandb_log and master_process and (problem := wandb_cannot_log()):
        return f"wandb_log=True but {problem}; or pass --wandb_log=False"
    if not os.path.isdir(data_dir):
        names = sorted(d for d in os.listdir('data') if os.path.isdir(f'data/{d}') and d[0] not in '._') \
            if os.path.isdir('data') else []
        if not names:
            return f"there is no data/ directory in {os.getcwd()}: run train.py from the repository root"
        return (f"no dataset '{c.dataset}' in data/ (it has {', '.join(names)}): pick one, or prepare yours into "
                f"data/{c.dataset}/")
    for split in ('train', 'val'):
        # an eval evaluates the splits there are: HellaSwag alone if no data set is prepared
        if split not in splits and not (c.eval_only and (splits or c.hellaswag)):
            prepare = f"data/{c.dataset}/prepare.py" if os.path.exists(f'{data_dir}/prepare.py') else \
                f"data/openwebtext/prepare.py --input=<your documents> --out_dir={data_dir}"
            return f"{os.path.join(data_dir, f'{split}.bin')} not found: run python {prepare} first"
    if c.hellaswag and meta is not None:  # the items are text, in GPT-2's tokens
        return (f"hellaswag=True scores a GPT-2 BPE model, but {c.dataset} has its own vocabulary "
                f"({char_meta_path(data_dir)}): train on a GPT-2 BPE dataset, or leave hellaswag off")
    return None


def model_problem(cfg, ep_size, data_dir, splits):
    """ The first mistake that shows once the model's GPTConfig cfg is known, as one line naming the fix; None if
    there is none """
    for split in splits:
        path = os.path.join(data_dir, f'{split}.bin')
        if os.path.getsize(path) // 2 < cfg.block_size + 1:
            return (f"{path} has {os.path.getsize(path) // 2} tokens, fewer than block_size + 1 = "
                    f"{cfg.block_size + 1}: use a smaller --block_size or more data")
    if cfg.n_exp % ep_size != 0:
        return f"n_exp={cfg.n_exp} is not divisible by ep_size={ep_size}: each process holds n_exp/ep_size experts"
    return None


def loaded_model_problem(cfg, checkpoint, optimizer, meta, data_dir, ckpt_path, out_dir):
    """ The first mismatch between the data or the config and the model start_model made (cfg, and checkpoint if
    the run resumes), as one line naming the fix; None if there is none """
    if meta is not None and meta['vocab_size'] != cfg.vocab_size:
        return (f"{char_meta_path(data_dir)} has a vocabulary of {meta['vocab_size']} tokens but the model has "
                f"{cfg.vocab_size}: prepare the data with the model's tokenizer")
    if checkpoint is not None:
        saved_optimizer = checkpoint.get('config', {}).get('optimizer', 'adamw')  # nanoGPT's runs: AdamW
        if optimizer != saved_optimizer:  # the saved state is the other optimizer's, which this one cannot load
            return (f"optimizer='{optimizer}' but {ckpt_path} was trained with '{saved_optimizer}': resume "
                    f"with --optimizer={saved_optimizer}, or start a new run from its weights with "
                    f"--init_from={out_dir}")
    return None


def run_warnings(config, data_dir, splits):
    """ The lines train.py prints about a config or data that trains, but not as its user likely meant """
    c = SimpleNamespace(**config)
    lines = []
    path = os.path.join(data_dir, 'val.bin')
    if 'val' in splits and os.path.getsize(path) // 2 < 10_000:  # a val loss on few tokens is noisy and overfits
        lines.append(f"warning: {path} holds only {os.path.getsize(path) // 2:,} tokens, too few for a steady val "
                     "loss: prepare more data, to hold 10,000 or more")
    if c.decay_lr and not c.eval_only and c.warmup_iters >= c.max_iters:
        lines.append(f"warning: warmup_iters={c.warmup_iters} >= max_iters={c.max_iters}: the learning rate never "
                     "leaves warm-up (set a smaller --warmup_iters)")
    if c.decay_lr and not c.eval_only and not 0.5 * c.max_iters <= c.lr_decay_iters <= 1.1 * c.max_iters:
        lines.append(f"warning: lr_decay_iters={c.lr_decay_iters} is far from max_iters={c.max_iters}: the cosine "
                     f"decay ends {'after' if c.lr_decay_iters > c.max_iters else 'long before'} the run "
                     f"(set --lr_decay_iters={c.max_iters})")
    return lines
