"""
Export a trained run to a Hugging Face directory: weights (model.safetensors), config.json, the tokenizer and a
model card (README.md), for transformers, the Hub and lm-evaluation-harness.
$ python export.py --out_dir=out-shakespeare-char --hf_dir=hf-shakespeare-char
A dense run becomes a standard GPT2LMHeadModel (exact GELU; zero biases where the run had none); an MoE run a
directory with its own model code, modeling_nanomoe.py, that transformers loads with trust_remote_code=True.
The tokenizer is GPT-2's BPE (from tiktoken's cached files), or for a character-level run its characters, from
data/<dataset>/ looked up from the current directory: run it from the repository root.
train.py --init_from=<hf_dir> trains on from such a directory, sample.py --init_from=<hf_dir> samples it.
"""
import os
import sys
import json
import shutil
from dataclasses import asdict

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from tokenizer import gpt2_encoding, dataset_dir, load_char_meta

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to export: its ckpt.pt and run.json
hf_dir = ''  # the directory to write
overwrite = False  # True: replace hf_dir if it holds an earlier export
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

# GPT-2's BPE files as tiktoken fetches and caches them: the vocabulary and merges of Hugging Face's gpt2
GPT2_FILES = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
ENDOFTEXT = '<|endoftext|>'


def bpe_tokenizer():
    """ GPT-2's BPE as a tokenizers.Tokenizer: byte-level, GPT-2's split regex, <|endoftext|> the one special """
    from tiktoken.load import read_file_cached
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors
    gpt2_encoding()  # one error line and exit if tiktoken cannot get the files
    vocab = json.loads(read_file_cached(GPT2_FILES + 'encoder.json'))  # token -> id
    merges = read_file_cached(GPT2_FILES + 'vocab.bpe').decode('utf-8').splitlines()[1:]  # after a version line
    tok = Tokenizer(models.BPE(vocab, [tuple(merge.split()) for merge in merges if merge]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([ENDOFTEXT])
    return tok


def char_tokenizer(meta):
    """ every character a token, ids as the dataset's prepare.py numbered them """
    from tokenizers import Tokenizer, Regex, models, pre_tokenizers, decoders
    tok = Tokenizer(models.WordLevel(vocab=meta['stoi'], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')  # newlines too
    tok.decoder = decoders.Fuse()  # the characters joined with nothing between them
    return tok


def hf_gpt2(model, eos_id):
    """ the dense GPT as transformers' GPT2LMHeadModel; a bias the run has not is zero there """
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function='gelu', resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, bos_token_id=eos_id, eos_token_id=eos_id))
    ours = model.state_dict()
    # GPT-2's Conv1D stores these weights as (in, out), nn.Linear as (out, in)
    transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
    theirs = {}
    for k, v in hf.state_dict().items():
        if k not in ours:
            assert k.endswith('.bias'), k
            theirs[k] = torch.zeros_like(v)
        else:
            theirs[k] = ours[k].t() if k.endswith(transposed) else ours[k]
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    hf.load_state_dict(theirs)
    return hf


def hf_nanomoe(model, eos_id):
    """ the MoE GPT as modeling_nanomoe's model, registered so that save_pretrained writes its code beside the
    weights and config.json's auto_map """
    from modeling_nanomoe import NanoMoEConfig, NanoMoEForCausalLM
    NanoMoEConfig.register_for_auto_class()
    NanoMoEForCausalLM.register_for_auto_class('AutoModelForCausalLM')
    args = asdict(model.config)
    args['num_experts_per_tok'] = args.pop('top_k')  # modeling_nanomoe's name for it
    hf = NanoMoEForCausalLM(NanoMoEConfig(**args, bos_token_id=eos_id, eos_token_id=eos_id))
    hf.load_state_dict(model.state_dict())
    return hf


def model_card(model, checkpoint, run, tokenizer_name):
    """ README.md: what the model is, how it was trained (run.json, else the checkpoint's config), how to load
    it """
    cfg, moe = model.config, model.config.n_exp > 1
    config = run.get('config', checkpoint.get('config', {}))
    n_moe = sum(i % cfg.stride == 0 for i in range(cfg.n_layer)) if moe else 0
    kind = (f"A Mixture-of-Experts GPT: {n_moe} of its {cfg.n_layer} blocks MoE, {cfg.n_exp} experts each, "
            f"top_k={cfg.top_k}, expert hidden size {cfg.expert_hidden_size}, {cfg.n_shared_exp} shared experts"
            if moe else f"A dense GPT-2 of {cfg.n_layer} blocks")
    n_params, n_active = model.get_num_params(), model.get_num_params(active=True)
    remote = ', trust_remote_code=True' if moe else ''
    lines = [
        "---", "library_name: transformers", f"tags: [nanoMoE{', mixture-of-experts' if moe else ''}]", "---", "",
        f"# {os.path.basename(os.path.abspath(hf_dir))}", "",
        f"{kind}, trained with nanoMoE: {cfg.n_head} heads, n_embd {cfg.n_embd}, context {cfg.block_size} "
        f"tokens, {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active per token), "
        f"{tokenizer_name}.", "",
        "## Training", "",
        f"Dataset `{config.get('dataset', '?')}`, {checkpoint.get('iter_num', '?')} iterations, best val loss "
        f"{checkpoint.get('best_val_loss', float('nan')):.4f}; torch {run.get('torch', '?')}, nanoMoE commit "
        f"{run.get('git_commit') or '?'}. The run's config:", "",
        "```json", json.dumps(config, indent=1), "```", "",
        "## Use", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "path = '<this directory, or its name on the Hub>'",
        f"model = AutoModelForCausalLM.from_pretrained(path{remote})",
        f"tokenizer = AutoTokenizer.from_pretrained(path{remote})", "```", ""]
    if moe:
        lines += [
            "The model code (`modeling_nanomoe.py`, inference only, for transformers 5) routes every token "
            "dropless, with no expert capacity, and causally, as nanoMoE's `generate` does: a token's output "
            "never depends on later tokens, and transformers' key/value cache holds.", ""]
    lines += ["Back in nanoMoE: `python train.py --init_from=<this directory>` trains on from these weights, "
              "`python sample.py --init_from=<this directory>` samples them.", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
if not hf_dir:
    sys.exit("error: no --hf_dir: name the directory to write, e.g. --hf_dir=hf-model")
if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
    sys.exit(f"error: hf_dir '{hf_dir}' is a file: name a directory")
if os.path.isdir(hf_dir) and os.listdir(hf_dir):
    if not overwrite:
        sys.exit(f"error: hf_dir '{hf_dir}' is not empty: pick another --hf_dir, or --overwrite=True to replace "
                 "an earlier export")
    # overwrite deletes the directory: only one that holds an export, never a run or anything else
    if not os.path.exists(os.path.join(hf_dir, 'config.json')) or os.path.exists(os.path.join(hf_dir, 'ckpt.pt')):
        sys.exit(f"error: hf_dir '{hf_dir}' is not an earlier export (it has no config.json, or a run's ckpt.pt): "
                 "--overwrite=True replaces only an export; pick another --hf_dir")
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
try:
    checkpoint = load_checkpoint(ckpt_path, 'cpu')
    model = model_from_checkpoint(checkpoint)  # the run's dropout too, for a finetune in transformers
except ValueError as e:
    sys.exit(f"error: {e}")
except (TypeError, RuntimeError) as e:  # GPTConfig's unknown keys, load_state_dict's mismatched weights
    sys.exit(f"error: {ckpt_path} is not a GPT of this repository ({str(e).strip().splitlines()[0]}): "
             "export a checkpoint that train.py wrote")
model.eval()
run_path = os.path.join(out_dir, 'run.json')
run = {}
if os.path.exists(run_path):
    with open(run_path) as f:
        run = json.load(f)
dataset = checkpoint.get('config', {}).get('dataset')
try:  # a checkpoint from elsewhere names its dataset: a plain folder of data/, never a path
    meta = load_char_meta(dataset_dir(dataset)) if dataset else None
except ValueError as e:
    sys.exit(f"error: {e}")
if meta is None and model.config.vocab_size < 50257:
    sys.exit(f"error: the model has {model.config.vocab_size} tokens, fewer than GPT-2's, and there is no "
             f"character-level metadata in data/{dataset or '<dataset>'}/: run export.py from the repository "
             "root")

from transformers import PreTrainedTokenizerFast
block_size = model.config.block_size
if meta is None:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(), bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                        unk_token=ENDOFTEXT, model_max_length=block_size)
    eos_id, tokenizer_name = 50256, "GPT-2's BPE tokenizer"
else:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(meta),
                                        model_max_length=block_size)
    eos_id, tokenizer_name = None, f"a character-level tokenizer of {meta['vocab_size']} characters"
hf = hf_gpt2(model, eos_id) if model.config.n_exp == 1 else hf_nanomoe(model, eos_id)

# the files go to a temporary directory, renamed to hf_dir once complete, so that a failure leaves hf_dir untouched
work_dir = os.path.abspath(hf_dir).rstrip(os.sep) + '.tmp'
shutil.rmtree(work_dir, ignore_errors=True)
try:
    hf.save_pretrained(work_dir)
    tokenizer.save_pretrained(work_dir)
    with open(os.path.join(work_dir, 'README.md'), 'w') as f:
        f.write(model_card(model, checkpoint, run, tokenizer_name))
except BaseException:
    shutil.rmtree(work_dir, ignore_errors=True)
    raise
if os.path.isdir(hf_dir):
    shutil.rmtree(hf_dir)
os.replace(work_dir, hf_dir)
print(f"exported {out_dir} ({'MoE' if model.config.n_exp > 1 else 'dense'}) to {hf_dir}: "
      f"{', '.join(sorted(os.listdir(hf_dir)))}")
