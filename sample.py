"""
Sample from a trained model (dense or MoE) or from OpenAI's GPT-2.
$ python sample.py --out_dir=out-shakespeare-char          # a checkpoint written by train.py
$ python sample.py --init_from=out-shakespeare-char        # the same, as train.py names another run
$ python sample.py --init_from=gpt2-xl --start="FILE:prompt.txt" --num_samples=5 --max_new_tokens=100
$ python sample.py --init_from=hf-shakespeare-char         # a directory export.py wrote, with its tokenizer
Run it from the repository root: a character-level checkpoint decodes with
data/<dataset>/meta.json (or meta.pkl), looked up from the current directory; others with GPT-2 BPE.
"""
import os
import sys
from contextlib import nullcontext

import torch

from model import GPT
from machine import pick_device
from checkpoint import load_checkpoint, model_from_checkpoint, exported_moe, model_from_export
from tokenizer import gpt2_encoding, dataset_dir, char_meta_path, load_char_meta

# -----------------------------------------------------------------------------
# 'resume' (out_dir's ckpt.pt), a run's out_dir, a GPT-2 name ('gpt2', ...), an export.py or save_pretrained dir
init_from = 'resume'
out_dir = 'out'  # the run directory to resume from, when init_from == 'resume'
start = "\n"  # prompt text, or "FILE:prompt.txt" to read it from a file
num_samples = 10  # number of samples to draw
batch_size = 0  # samples generated together, as one batch; 0: all num_samples (lower it if memory runs short)
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random
top_k = 200  # sample from the top_k most likely tokens only
seed = 1337
device = ''  # '' picks: cuda if there, else mps, else cpu. Or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = ''  # '' picks: bfloat16 where CUDA supports it, else float16 on CUDA, float32 elsewhere
compile = False  # torch.compile the model: slower start, faster tokens
# the configurator lives beside this script, whatever the current directory
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

torch.manual_seed(seed)
torch.cuda.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
if dtype not in ('', *dtypes):
    sys.exit(f"error: dtype='{dtype}' is not one of {', '.join(dtypes)} ('' picks one for the device)")
device, device_type, dtype = pick_device(device, dtype)
for name, value in (('num_samples', num_samples), ('max_new_tokens', max_new_tokens), ('top_k', top_k)):
    if value < 1:
        sys.exit(f"error: {name}={value} must be >= 1")
if batch_size < 0:
    sys.exit(f"error: batch_size={batch_size} must be >= 0 (0: all num_samples in one batch)")
if temperature <= 0:
    sys.exit(f"error: temperature={temperature} must be > 0: for the most likely tokens use --top_k=1")
ptdtype = dtypes[dtype]
# autocast on every device, CPU included, as train.py does: --dtype=bfloat16 samples the way it trained
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

# model: a run's, with the settings it trained with (generate routes dropless, without capacity or losses),
# or GPT-2's
data_dir = None  # the run's dataset, whose meta.json decodes a character-level model
if init_from == 'resume' or os.path.exists(os.path.join(init_from, 'ckpt.pt')):
    try:  # on the CPU: AdamW's state, twice the model's size, never reaches the device
        run_dir = out_dir if init_from == 'resume' else init_from
        checkpoint = load_checkpoint(os.path.join(run_dir, 'ckpt.pt'), 'cpu')
        model = model_from_checkpoint(checkpoint)
    except ValueError as e:
        sys.exit(f"error: {e}")
    dataset = checkpoint.get('config', {}).get('dataset')
    try:  # a checkpoint from elsewhere must not pick a vocabulary file outside data/
        data_dir = dataset_dir(dataset) if dataset is not None else None
    except ValueError:
        sys.exit(f"error: {run_dir}/ckpt.pt names its dataset {dataset!r}, not a folder of data/: refused (its "
                 "vocabulary would be read from there). Sample checkpoints you trust")
    del checkpoint  # keep only the model in memory
elif exported_moe(init_from):  # export.py's directory of an MoE run
    model = model_from_export(init_from, {'dropout': 0.0})
elif init_from.startswith('gpt2') or os.path.isdir(init_from):
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=0.0))
    except ValueError as e:
        sys.exit(f"error: {e}")
else:
    sys.exit(f"error: init_from='{init_from}' is neither 'resume', a run's out_dir nor a GPT-2 model: use "
             "'resume', a directory holding a ckpt.pt, 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a "
             "save_pretrained directory")
model.eval()
model.to(device)
if compile:
    # in place: generate calls self(...), which torch.compile(model) would leave uncompiled. Three
    # graphs per batch size, none per token: the prompt's forward, a one-token step, past block_size the window
    model.compile()

# prompt
if start.startswith('FILE:'):
    prompt_path = start[5:]
    if not os.path.isfile(prompt_path):
        sys.exit(f"error: no file {prompt_path} for --start=FILE:...: give the path of a text file")
    with open(prompt_path, encoding='utf-8') as f:
        start = f.read()
if not start:
    sys.exit("error: the prompt is empty: give --start some text, e.g. --start=ROMEO:")

# tokenizer: an exported directory's own, the character-level one of the checkpoint's dataset, else GPT-2's
meta_path = char_meta_path(data_dir) if data_dir else None
tokenizer_path = os.path.join(init_from, 'tokenizer.json')
if os.path.exists(tokenizer_path):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(tokenizer_path)
    try:
        tokenizer.encode(start)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a character not in a char-level vocab
        sys.exit(f"error: the prompt cannot be tokenized by {tokenizer_path} ({e}): leave out what it does "
                 "not know")
    encode = lambda s: tokenizer.encode(s).ids
    decode = lambda l: tokenizer.decode(l, skip_special_tokens=False)
elif meta_path is not None:
    print(f"Loading meta from {meta_path}...")
    try:
        meta = load_char_meta(data_dir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    stoi, itos = meta['stoi'], meta['itos']
    unknown = sorted(set(start) - set(stoi))
    if unknown:
        sys.exit(f"error: the prompt has characters not in {meta_path}: {''.join(unknown)!r}: leave them out")
    encode = lambda s: [stoi[c] for c in s]
    decode = lambda l: ''.join([itos[i] for i in l])
else:
    if model.config.vocab_size < 50257:
        # fewer tokens than GPT-2's 50257: a character-level model, which BPE would crash or garble
        sys.exit(f"error: the model has {model.config.vocab_size} tokens, fewer than GPT-2's, and no "
                 f"{data_dir or 'data/<dataset>'}/meta.json to decode them: run from the repository root")
    enc = gpt2_encoding()
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    decode = lambda l: enc.decode(l)
x = torch.tensor(encode(start), dtype=torch.long, device=device)[None, ...]  # (1, T)

# generate, batch_size samples at a time
batch_size = batch_size or num_samples
with torch.no_grad():
    with ctx:
        for first in range(0, num_samples, batch_size):
            y = model.generate(x.expand(min(batch_size, num_samples - first), -1), max_new_tokens,
                               temperature=temperature, top_k=top_k)
            for sample in y:
                print(decode(sample.tolist()))
                print('---------------')
