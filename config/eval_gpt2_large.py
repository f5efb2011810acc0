# OpenAI's GPT-2 large (774M: 36 layers, 20 heads, 1280 dims) evaluated on OpenWebText, no training.
# nanoGPT reports train 2.66, val 2.67.
# $ python train.py config/eval_gpt2_large.py
batch_size = 8
eval_iters = 500  # more batches than in training, for a tighter estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-large'
