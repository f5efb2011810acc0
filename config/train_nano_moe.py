# The earlier nanoMoE recipe: a small MoE GPT (6 layers, 6 heads, 384 dims, 8 experts,
# top-2, MoE in every other block: 54.7M parameters, 33.5M active per token, position
# embeddings not counted, as nanoGPT) on OpenWebText, ~0.5M tokens per step for 50k steps
# (~25B tokens).
# First: python data/openwebtext/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_nano_moe.py
# Its val loss is not yet measured with this repository.

out_dir = 'out-nano-moe'
wandb_log = True
wandb_project = 'nano-moe'
wandb_run_name = 'nano-moe'

dataset = 'openwebtext'
# 12 sequences * 1024 tokens * 40 accumulation steps = 491,520 tokens per step; train.py splits
# the 40 steps among the GPUs, so the tokens per step do not depend on their number
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40

n_layer = 6
n_head = 6
n_embd = 384

n_exp = 8
top_k = 2
stride = 2  # blocks 0, 2, 4 are MoE
use_aux_loss = True  # Switch load balancing
aux_loss_weight = 0.01
use_router_z_loss = True  # ST-MoE z-loss
router_z_loss_weight = 0.001
train_capacity = 1.25
eval_capacity = 2.0
use_switch_tfm_init = True
router_use_full_prec = True  # float32 router under bf16 autocast

max_iters = 50000
lr_decay_iters = 50000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
