# Finetune OpenAI's GPT-2 xl on Shakespeare in GPT-2 BPE tokens, at a constant small learning rate.
# First: python data/shakespeare/prepare.py
# $ python train.py config/finetune_shakespeare.py
# nanoGPT reports a few minutes on one A100; then: python sample.py --out_dir=out-shakespeare
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False  # --wandb_log=True to log
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2

# it overfits within a few epochs, so keep only the checkpoint with the best val loss
always_save_checkpoint = False

# 1 sequence * 1024 tokens * 32 accumulation steps = 32,768 tokens per step;
# the 301,966 train tokens are ~9.2 steps, so 20 steps are ~2 epochs
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

learning_rate = 3e-5
decay_lr = False
