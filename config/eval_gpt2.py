# OpenAI's GPT-2 (124M: 12 layers, 12 heads, 768 dims) evaluated on OpenWebText, no training.
# nanoGPT reports train 3.11, val 3.12.
# $ python train.py config/eval_gpt2.py
batch_size = 8
eval_iters = 500  # more batches than in training, for a tighter estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
