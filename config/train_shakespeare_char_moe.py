# The baby GPT of train_shakespeare_char.py with an MoE MLP in every other block: blocks 0, 2, 4
# route each character to 2 of 8 experts: 35.5M parameters, 14.2M of them active per token.
# Same data: python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_moe.py
# On one H100 (README): best val 1.4957 at iter 1500, against the dense run's 1.4631 at 2000. With
# 3.3x the parameters it overfits these 1M characters sooner.
# On a CPU, shrink it as the dense run: the README's quick start, best val 1.7141 at iteration 1750 (one
# thread; the count changes the losses), against dense's 1.920 at 2000 (python assets/quick_start.py checks it):
# $ OMP_NUM_THREADS=1 python train.py config/train_shakespeare_char_moe.py --eval_iters=20 --log_interval=10
#   --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
#   --dropout=0.0
# then: python sample.py --out_dir=out-shakespeare-char-moe

out_dir = 'out-shakespeare-char-moe'
eval_interval = 250  # often: this small dataset overfits quickly
eval_iters = 200
log_interval = 10

# it will overfit, so keep only the checkpoint with the best val loss
always_save_checkpoint = False

wandb_log = False  # --wandb_log=True to log
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-moe'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # 256 characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2  # a small dataset: regularise

# MoE, as train_nano_moe.py
n_exp = 8
top_k = 2
stride = 2  # every other block is MoE
use_aux_loss = True  # Switch load balancing, weight 0.01
aux_loss_weight = 0.01
use_router_z_loss = True  # ST-MoE z-loss, weight 0.001
router_z_loss_weight = 0.001
train_capacity = 1.25
eval_capacity = 2.0
use_switch_tfm_init = True
router_use_full_prec = True  # float32 router under bf16 autocast

learning_rate = 1e-3  # a small model tolerates a higher learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # few tokens per iter: average the second moment over more steps
warmup_iters = 100
