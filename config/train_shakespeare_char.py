# A baby GPT (6 layers, 6 heads, 384 dims, ~10.7M parameters) on character-level Shakespeare,
# quick enough for debugging and laptops. First: python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char.py
# nanoGPT reports ~3 minutes on one A100 and a best val loss of 1.4697.
# On a CPU, shrink it (nanoGPT reports val loss ~1.88; here 1.920 in 2000 iterations, README):
# $ OMP_NUM_THREADS=1 python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
#   --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
#   --lr_decay_iters=2000 --dropout=0.0
# then: python sample.py --out_dir=out-shakespeare-char

out_dir = 'out-shakespeare-char'
eval_interval = 250  # often: this small dataset overfits quickly
eval_iters = 200
log_interval = 10

# it will overfit, so keep only the checkpoint with the best val loss
always_save_checkpoint = False

wandb_log = False  # --wandb_log=True to log
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # 256 characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2  # a small dataset: regularise

learning_rate = 1e-3  # a small model tolerates a higher learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # few tokens per iter: average the second moment over more steps
warmup_iters = 100
