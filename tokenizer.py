"""
GPT-2's BPE tokenizer, from tiktoken, for the scripts that read or write GPT-2 tokens.
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


def load_char_meta(data_dir):
    """ A character-level dataset's vocabulary, {'vocab_size', 'stoi', 'itos'}, from data_dir's meta.json (or
    nanoGPT's meta.pkl); None when data_dir has neither """
    json_path, pkl_path = os.path.join(data_dir, 'meta.json'), os.path.join(data_dir, 'meta.pkl')
    if os.path.exists(json_path):
        with open(json_path, encoding='utf-8') as f:
            itos = dict(enumerate(json.load(f)['itos']))
    elif os.path.exists(pkl_path):
        with open(pkl_path, 'rb') as f:
            itos = pickle.load(f)['itos']
    else:
        return None
    return {'vocab_size': len(itos), 'stoi': {c: i for i, c in itos.items()}, 'itos': itos}
