"""
OpenWebText in GPT-2 BPE tokens, as nanoGPT: each document's tokens followed by the end-of-text
token, all documents back to back in train.bin and val.bin (uint16 memmaps) next to this
script; 0.05% of the documents (seed 2357) go to val. nanoGPT reports ~9B train tokens (17GB)
and ~4M val tokens, and ~54GB of disk for the Hugging Face cache.
$ python data/openwebtext/prepare.py                          # downloads it from the Hugging Face hub
$ python data/openwebtext/prepare.py --input=PATH --num_proc=8
--input takes a local dataset with a 'text' column instead: a directory written by
Dataset.save_to_disk or DatasetDict.save_to_disk (its 'train' split), or a JSON Lines file
(.jsonl, .json) with one {"text": ...} object per line. datasets keeps its cache files of the
split and the tokens beside a save_to_disk directory, and in HF_DATASETS_CACHE for a JSON file.
"""
import os
import sys
import argparse

import numpy as np
import tiktoken
from tqdm import tqdm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--input', help="local dataset (see above); default: openwebtext from the hub")
parser.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)), help="where the .bin files go")
parser.add_argument('--num_proc', type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="worker processes for loading and tokenizing (default: half the CPU cores)")
args = parser.parse_args()

if args.input is not None and not os.path.exists(args.input):
    sys.exit(f"error: no dataset at {args.input} for --input: give a save_to_disk directory or a .jsonl file")
try:
    # imported here, not at the top, so that a machine without datasets still gets the line above
    from datasets import load_dataset, load_from_disk, DatasetDict
except ImportError:
    sys.exit("error: openwebtext needs Hugging Face datasets: pip install datasets")

if args.input is None:
    dataset = load_dataset("openwebtext", num_proc=args.num_proc)['train']
elif os.path.isdir(args.input):
    dataset = load_from_disk(args.input)
    if isinstance(dataset, DatasetDict):
        if 'train' not in dataset:
            sys.exit(f"error: {args.input} has splits {list(dataset)} but no 'train': save the documents as 'train'")
        dataset = dataset['train']
elif args.input.endswith(('.jsonl', '.json')):
    dataset = load_dataset('json', data_files=args.input, split='train')
else:
    sys.exit(f"error: cannot read {args.input}: give a save_to_disk directory or a .jsonl file")
if 'text' not in dataset.column_names:
    sys.exit(f"error: {args.input} has columns {dataset.column_names} but no 'text': name the document column 'text'")
if len(dataset) < 2:
    sys.exit(f"error: {args.input} has {len(dataset)} document(s): train and val need at least one each")

# openwebtext has only a train split; hold out 0.05% of the documents (~4000) for val
split_dataset = dataset.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split_dataset['val'] = split_dataset.pop('test')

enc = tiktoken.get_encoding("gpt2")


def process(example):
    ids = enc.encode_ordinary(example['text'])  # ignores special tokens in the text
    ids.append(enc.eot_token)  # 50256, <|endoftext|>: marks where a document ends
    return {'ids': ids, 'len': len(ids)}


tokenized = split_dataset.map(process, remove_columns=dataset.column_names, desc="tokenizing the splits",
                              num_proc=args.num_proc)

os.makedirs(args.out_dir, exist_ok=True)
for split, dset in tokenized.items():
    arr_len = np.sum(dset['len'], dtype=np.uint64)
    filename = os.path.join(args.out_dir, f'{split}.bin')
    arr = np.memmap(filename, dtype=np.uint16, mode='w+', shape=(arr_len,))  # GPT-2's 50257 ids fit
    # write in contiguous shards: a few hundred MB of ids at a time, never the whole split in memory
    total_batches = min(1024, len(dset))
    idx = 0
    for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}"):
        batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format('numpy')
        arr_batch = np.concatenate(batch['ids'])
        arr[idx:idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    print(f"{split} has {int(arr_len):,} tokens")
