# GPT-2 small (124M, train.py's default model) on OpenWebText, as nanoGPT: ~0.5M tokens per step
# for 600k steps (~300B tokens). nanoGPT reports a loss of ~2.85 after ~4 days on 8 A100 40GB.
# First: python data/openwebtext/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# 12 sequences * 1024 tokens * 40 accumulation steps (5 per GPU on 8 GPUs) = 491,520 tokens per step
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
