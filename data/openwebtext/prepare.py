"""
OpenWebText, or your own documents, in GPT-2 BPE tokens, as nanoGPT: each document's tokens
followed by the end-of-text token, all documents back to back in train.bin and val.bin (uint16
memmaps); 0.05% of the documents (seed 2357) go to val. For OpenWebText nanoGPT reports ~9B train
tokens (17GB), ~4M val tokens, and ~54GB of disk for the Hugging Face cache.
$ python data/openwebtext/prepare.py                                  # OpenWebText from the Hugging Face hub
$ python data/openwebtext/prepare.py --input=PATH --out_dir=data/mine --num_proc=8   # your own documents
--input takes, instead of the hub's OpenWebText:
  a directory of .txt and .md files, searched recursively: each file one document, UTF-8, as is
  a .parquet file, or a directory of them (searched recursively), with a 'text' column
  a JSON Lines file (.jsonl, .json) with one {"text": ...} object per line
  a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk (its 'train' split)
Files are read in sorted path order. The documents and their tokens go to datasets' cache on disk
(HF_DATASETS_CACHE; beside a save_to_disk directory), num_proc processes tokenize, and the .bin files
are written a shard at a time: a corpus larger than memory only needs the disk.
"""
import os
import sys
import hashlib
import argparse

import numpy as np
from tqdm import tqdm

# the repository root, for tokenizer.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tokenizer import gpt2_encoding

# the hub's OpenWebText as parquet files (datasets >= 4 runs no loading scripts; the main branch still
# holds the script). The hub's conversion pull request has all 80 files; refs/convert/parquet holds
# only the first 5 GB of a dataset this large
HUB_FILES = 'hf://datasets/Skylion007/openwebtext@refs/pr/19/data/train-*-of-00080.parquet'
TEXT_EXTENSIONS = ('.txt', '.md')

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--input', help="your own documents (see above); default: OpenWebText from the hub")
parser.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)),
                    help="where the .bin files go")
parser.add_argument('--num_proc', type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="worker processes for loading and tokenizing (default: half the CPU cores)")
args = parser.parse_args()


def fail(message):
    sys.exit(f"error: {message}")


def files_under(directory, extensions):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                  for name in names if name.endswith(extensions))


def read_documents(paths):
    for path in paths:
        with open(path, 'rb') as f:
            data = f.read()
        try:
            text = data.decode('utf-8')  # bytes, not text mode: '\r\n' stays as it is in the file
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                             "convert it, or move it out of the directory") from None
        yield {'text': text}


KINDS = "a directory of text or parquet files, a .parquet or .jsonl file, or a save_to_disk directory"
if args.input is not None and not os.path.exists(args.input):
    fail(f"no dataset at {args.input} for --input: give {KINDS}")
if args.num_proc < 1:
    fail(f"--num_proc={args.num_proc} must be >= 1")
try:
    # imported here, not at the top, so that a machine without datasets still gets the line above
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
    from datasets.exceptions import DatasetGenerationError
except ImportError:
    fail("preparing documents needs Hugging Face datasets: pip install datasets")

if args.input is None:
    try:
        dataset = load_dataset('parquet', data_files=HUB_FILES, split='train', num_proc=args.num_proc)
    except Exception as e:  # the hub client's network errors differ between versions; all end here, named
        reason = str(e).split('\n')[0]
        fail(f"cannot load OpenWebText from the Hugging Face hub ({type(e).__name__}: {reason}): connect to the "
             "network and unset HF_HUB_OFFLINE, or download its parquet files and pass --input=<their directory>")
elif os.path.isdir(args.input) and any(os.path.exists(os.path.join(args.input, f))
                                       for f in ('dataset_dict.json', 'state.json')):
    dataset = load_from_disk(args.input)
    if isinstance(dataset, DatasetDict):
        if 'train' not in dataset:
            fail(f"{args.input} has splits {list(dataset)} but no 'train': save the documents as 'train'")
        dataset = dataset['train']
elif os.path.isdir(args.input):
    parquet_files = files_under(args.input, '.parquet')
    text_files = files_under(args.input, TEXT_EXTENSIONS)
    if parquet_files and text_files:
        fail(f"{args.input} holds both .parquet and text files: give a directory of one kind")
    if parquet_files:
        dataset = load_dataset('parquet', data_files=parquet_files, split='train', num_proc=args.num_proc)
    elif text_files:
        # the cache is keyed by each file's path, size and modification time: an edited file is read again
        stamps = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in text_files]
        try:
            # one process reads: the disk is the limit, and a bad file's error comes back as raised
            dataset = Dataset.from_generator(read_documents, gen_kwargs={'paths': text_files},
                                             fingerprint=hashlib.sha256(repr(stamps).encode()).hexdigest())
        except DatasetGenerationError as e:
            fail(e.__cause__ or e)
    else:
        fail(f"{args.input} holds no {', '.join(TEXT_EXTENSIONS)} or .parquet files: give {KINDS}")
elif args.input.endswith('.parquet'):
    dataset = load_dataset('parquet', data_files=args.input, split='train')
elif args.input.endswith(('.jsonl', '.json')):
    dataset = load_dataset('json', data_files=args.input, split='train')
else:
    fail(f"cannot read {args.input}: give {KINDS}")
if 'text' not in dataset.column_names:
    fail(f"{args.input} has columns {dataset.column_names} but no 'text': name the document column 'text'")
if len(dataset) < 2:
    fail(f"{args.input} has {len(dataset)} document(s): train and val need at least one each")

# openwebtext has only a train split; hold out 0.05% of the documents (~4000) for val
split_dataset = dataset.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split_dataset['val'] = split_dataset.pop('test')

enc = gpt2_encoding()


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
    # into a temporary file first: an interrupted run leaves no partial .bin for train.py to read
    arr = np.memmap(filename + '.tmp', dtype=np.uint16, mode='w+', shape=(arr_len,))  # GPT-2's 50257 ids fit
    # write in contiguous shards: a few hundred MB of ids at a time, never the whole split in memory
    total_batches = min(1024, len(dset))
    idx = 0
    for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}"):
        batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format('numpy')
        arr_batch = np.concatenate(batch['ids'])
        arr[idx:idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    del arr
    os.replace(filename + '.tmp', filename)
    print(f"{split} has {int(arr_len):,} tokens")
