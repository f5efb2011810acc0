# OpenAI's GPT-2 xl (1558M: 48 layers, 25 heads, 1600 dims) evaluated on OpenWebText, no training.
# nanoGPT reports train 2.56, val 2.54.
# $ python train.py config/eval_gpt2_xl.py
batch_size = 8
eval_iters = 500  # more batches than in training, for a tighter estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-xl'
