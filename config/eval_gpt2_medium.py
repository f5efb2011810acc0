# OpenAI's GPT-2 medium (350M: 24 layers, 16 heads, 1024 dims) evaluated on OpenWebText, no training.
# nanoGPT reports train 2.85, val 2.84.
# $ python train.py config/eval_gpt2_medium.py
batch_size = 8
eval_iters = 500  # more batches than in training, for a tighter estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-medium'
