"""
GPT-2's BPE tokenizer, from tiktoken, for the scripts that read or write GPT-2 tokens.
tiktoken downloads GPT-2's two BPE files (~1.5 MB) on first use and keeps them in its cache,
TIKTOKEN_CACHE_DIR if set. Offline, point TIKTOKEN_CACHE_DIR at a cache filled elsewhere.
"""
import sys

import tiktoken


def gpt2_encoding():
    """ tiktoken's 'gpt2' encoding, or one error line and exit when its files cannot be had """
    try:
        return tiktoken.get_encoding('gpt2')
    except OSError as e:  # requests' ConnectionError and the like: no network and no cached files
        sys.exit(f"error: tiktoken cannot get GPT-2's BPE files ({type(e).__name__}): "
                 "set TIKTOKEN_CACHE_DIR to a directory that holds them, filled on a machine with network by: "
                 "TIKTOKEN_CACHE_DIR=<dir> python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"")
