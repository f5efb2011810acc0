"""
Tiny Shakespeare for character-level language modeling: every character is a token.
Writes train.bin and val.bin (uint16 token ids, the first 90% of the text and the rest) and meta.json
({"vocab_size": V, "itos": [each id's character]}: tokenizer.load_char_meta reads it) next to this script.
$ python data/shakespeare_char/prepare.py                     # downloads input.txt if missing
$ python data/shakespeare_char/prepare.py --input=my_text.txt # any UTF-8 text file instead
"""
import os
import sys
import json
import argparse
import urllib.request

import numpy as np
from tqdm import tqdm

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--input',
                    help="text file to use; default: input.txt next to the outputs, downloaded if missing")
parser.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)),
                    help="where the .bin and meta.json go")
args = parser.parse_args()

if args.input is not None and not os.path.isfile(args.input):
    sys.exit(f"error: no file {args.input} for --input: give the path of a text file")
input_file_path = args.input or os.path.join(args.out_dir, 'input.txt')
if not os.path.exists(input_file_path):
    print(f"downloading {URL} to {input_file_path}")
    os.makedirs(args.out_dir, exist_ok=True)
    try:  # into a temporary file first: a failed download leaves no partial input.txt
        urllib.request.urlretrieve(URL, input_file_path + '.tmp')
    except OSError as e:
        sys.exit(f"error: cannot download {URL} ({getattr(e, 'reason', e)}): "
                 "download it yourself and pass --input=<path>")
    os.replace(input_file_path + '.tmp', input_file_path)
with open(input_file_path, encoding='utf-8') as f:
    data = f.read()
print(f"length of dataset in characters: {len(data):,}")

chars = sorted(set(data))
vocab_size = len(chars)
print("all the unique characters:", ''.join(chars))
print(f"vocab size: {vocab_size:,}")
stoi = {ch: i for i, ch in enumerate(chars)}

n = len(data)
os.makedirs(args.out_dir, exist_ok=True)
for split, text in (('train', data[:int(n * 0.9)]), ('val', data[int(n * 0.9):])):
    ids = np.fromiter((stoi[c] for c in tqdm(text, desc=f"tokenizing {split}", unit='char', unit_scale=True)),
                      dtype=np.uint16, count=len(text))
    print(f"{split} has {len(ids):,} tokens")
    ids.tofile(os.path.join(args.out_dir, f'{split}.bin'))

with open(os.path.join(args.out_dir, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump({'vocab_size': vocab_size, 'itos': chars}, f)
