"""
Tiny Shakespeare in GPT-2 BPE tokens, for finetuning GPT-2 (config/finetune_shakespeare.py).
Writes train.bin and val.bin (uint16 token ids of the first 90% of the characters and of the
rest) next to this script. The whole text gives 301,966 + 36,059 = 338,025 tokens.
$ python data/shakespeare/prepare.py                      # downloads input.txt if missing
$ python data/shakespeare/prepare.py --input=my_text.txt  # any UTF-8 text file instead
"""
import os
import re
import sys
import argparse
import urllib.request

import numpy as np
from tqdm import tqdm

# the repository root, for tokenizer.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tokenizer import gpt2_encoding

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--input',
                    help="text file to use; default: input.txt next to the outputs, downloaded if missing")
parser.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)),
                    help="where the .bin files go")
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

enc = gpt2_encoding()
n = len(data)
os.makedirs(args.out_dir, exist_ok=True)
for split, text in (('train', data[:int(n * 0.9)]), ('val', data[int(n * 0.9):])):
    # Encode line by line for the progress bar. GPT-2's pre-tokenizer never joins a newline that
    # is followed by a non-space to what comes before or after it, so cutting the text just
    # before such a newline gives exactly the tokens of encoding it whole.
    ids = []
    for piece in tqdm(re.split(r'(?=\n\S)', text), desc=f"tokenizing {split}", unit='line'):
        ids.extend(enc.encode_ordinary(piece))
    print(f"{split} has {len(ids):,} tokens")
    np.array(ids, dtype=np.uint16).tofile(os.path.join(args.out_dir, f'{split}.bin'))
