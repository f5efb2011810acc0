"""
The tokenizers the scripts read or write: GPT-2's BPE, from tiktoken, and a character-level dataset's
vocabulary, data/<dataset>/meta.json as data/shakespeare_char/prepare.py writes it:
{"vocab_size": V, "itos": [the character of id 0, of id 1, ...]}.
tiktoken downloads GPT-2's two BPE files (~1.5 MB) on first use and keeps them in its cache,
TIKTOKEN_CACHE_DIR if set. Offline, point TIKTOKEN_CACHE_DIR at a cache filled elsewhere.
"""
import os
import sys
import json
import pickle

import tiktoken


def gpt2_encoding():
    """ tiktoken's 'gpt2' encoding, or one error line and exit when its files cannot be had """
    try:
        return tiktoken.get_encoding('gpt2')
    except OSError as e:  # requests' ConnectionError and the like: no network and no cached files
        sys.exit(f"error: tiktoken cannot get GPT-2's BPE files ({type(e).__name__}): "
                 "set TIKTOKEN_CACHE_DIR to a directory that holds them, filled on a machine with network by: "
                 "TIKTOKEN_CACHE_DIR=<dir> python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"")


def dataset_dir(dataset):
    """ data/<dataset>. The name comes from the command line or from a checkpoint someone else made: a path (a
    separator, '..', an absolute path) would read a vocabulary from outside data/, so it is a ValueError """
    separators = [sep for sep in ('/', os.sep, os.altsep) if sep]
    if not isinstance(dataset, str) or dataset in ('', '.', '..') or any(sep in dataset for sep in separators):
        raise ValueError(f"dataset={dataset!r} is not the name of a folder in data/: give --dataset=<a folder of "
                         "data/>, without '/' or '..'")
    return os.path.join('data', dataset)


def char_meta_path(data_dir):
    """ the file holding data_dir's character vocabulary: meta.json, else the meta.pkl nanoGPT's prepare scripts
    write, else None (a GPT-2 BPE dataset) """
    for name in ('meta.json', 'meta.pkl'):
        if os.path.exists(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    return None


class _RefusedGlobal(Exception):
    """ the class or function a meta.pkl names """


class _PlainDataUnpickler(pickle.Unpickler):
    """ Builds only what pickle's opcodes build on their own (dicts, lists, tuples, strings, numbers): every class
    or function, the way a pickle runs code as it loads, goes through find_class, which refuses it """

    def find_class(self, module, name):
        raise _RefusedGlobal(f"{module}.{name}")


def load_char_meta(data_dir):
    """ data_dir's character vocabulary, {'vocab_size': V, 'stoi': {char: id}, 'itos': {id: char}}, or None when
    it has neither meta.json nor meta.pkl. A file of another shape, or a meta.pkl holding anything but plain data,
    is a ValueError naming it """
    path = char_meta_path(data_dir)
    if path is None:
        return None
    fix = "prepare the data again with data/shakespeare_char/prepare.py --input=<its text>, which writes meta.json"
    try:
        if path.endswith('.json'):
            with open(path, encoding='utf-8') as f:
                meta = json.load(f)
        else:
            with open(path, 'rb') as f:
                meta = _PlainDataUnpickler(f).load()
    except _RefusedGlobal as e:
        raise ValueError(f"{path} holds a pickled object ({e}) that could run code as it loads: refused. {fix}")
    except Exception as e:  # not there to read, truncated, not JSON, not a pickle: say which
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}): {fix}")
    itos = meta.get('itos') if isinstance(meta, dict) else None
    if isinstance(itos, dict) and set(itos) == set(range(len(itos))):  # nanoGPT's meta.pkl: {id: char}
        itos = [itos[i] for i in range(len(itos))]
    if not (isinstance(itos, list) and all(isinstance(c, str) for c in itos)
            and meta.get('vocab_size') == len(itos)):
        raise ValueError(f"{path} is not a character vocabulary {{'vocab_size': V, 'itos': [V chars]}}: {fix}")
    return {'vocab_size': len(itos), 'stoi': {c: i for i, c in enumerate(itos)}, 'itos': dict(enumerate(itos))}
