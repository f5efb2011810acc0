"""
Mutation check of the test suite: each mutant below is one fault put into the code by a one-line edit; the
test named beside it must fail. Run from the repository root (it takes a few minutes: one pytest per mutant):
$ python tests/mutants.py            # all of them
$ python tests/mutants.py capacity   # those whose description holds 'capacity'
The edits go to a copy of the repository in a temporary directory, never to the repository itself. Prints
caught / NOT caught per mutant and exits 1 if any mutant passes its test (or no longer applies to the code).
"""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = 'tests/test_moe_layer.py::test_layer_matches_reference'
CAPACITY = 'tests/test_moe_layer.py::test_capacity_drops_second_choices_first'
LOSSES = 'tests/test_model.py::test_train_loss_adds_the_enabled_router_losses_with_their_weights'
ROUTER_TRAINS = 'tests/test_moe_layer.py::test_top1_router_learns_from_the_task_loss'
LR = 'tests/test_train.py::test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_min_lr'
SORT = 'sorted_expert, sorted_assignment = torch.sort(topk_idx.t().reshape(-1), stable=True)'
ASSIGNMENT = 'torch.arange(k * N, device=x.device)'  # a = j*N + t: assignment j of token t

# (what the fault is, file, the line's text, its mutated text, the test that catches it). The list is issue 31's
# (43 mutants, 42 here: its count took one twice); where the code has changed since, the same fault in today's
# code, marked "today:".
MUTANTS = [
    ('top-k picks the smallest logits', 'model.py', 'topk_logits, topk_idx = logits.topk(self.top_k, dim=-1)',
     'topk_logits, topk_idx = logits.topk(self.top_k, dim=-1, largest=False)', LAYER),
    ('capacity without k', 'model.py', 'math.floor(self.top_k * cf * N / self.n_exp + 1e-6)',
     'math.floor(cf * N / self.n_exp + 1e-6)', LAYER),
    ('capacity not rounded to even', 'model.py', 'cap += cap % 2', 'cap += 0', LAYER),
    ('grouped path keeps cap + 1', 'model.py', '- expert_start[sorted_expert] < cap',
     '- expert_start[sorted_expert] <= cap', LAYER),
    ('padded path keeps one less', 'model.py', 'row_kept = slot < tokens_per_expert[row_expert]',
     'row_kept = slot < tokens_per_expert[row_expert] - 1', LAYER),
    # today: a dropped assignment's row writes to the zero row N, so its gate reaches no token; the fault adds
    # its gated output to its token
    ('dropped gate kept', 'model.py', 'out.new_zeros(N + 1, C).index_add(0, row_token,',
     'out.new_zeros(N + 1, C).index_add(0, row_assignment % N,', LAYER),
    ('wrong gate order in the combine', 'model.py', 'row_gate = gates.t().reshape(-1)',
     'row_gate = gates.reshape(-1)', LAYER),
    ('min_capacity ignored', 'model.py', 'return min(max(cap, self.min_capacity), N)', 'return min(cap, N)',
     'tests/test_moe_layer.py::test_capacity_is_switch_eq3_rounded_up_to_even_between_min_capacity_and_n_tokens'),
    # today: the fill order is the stable sort's; the faults sort each expert's assignments another way
    ('capacity fills token by token', 'model.py', SORT,
     f'sorted_assignment = torch.sort(topk_idx.t().reshape(-1) * k * N + {ASSIGNMENT} % N * k + {ASSIGNMENT} // N)'
     f'[1]; sorted_expert = topk_idx.t().reshape(-1)[sorted_assignment]', CAPACITY),
    ('capacity fills from the last token', 'model.py', SORT,
     f'sorted_assignment = torch.sort(topk_idx.t().reshape(-1) * k * N + k * N - 1 - {ASSIGNMENT})[1]; '
     'sorted_expert = topk_idx.t().reshape(-1)[sorted_assignment]', CAPACITY),
    ('aux loss f divided by N alone', 'model.py', 'f = tokens_per_expert.float() / (N * self.top_k)',
     'f = tokens_per_expert.float() / N', LOSSES),
    ('aux loss without E', 'model.py', 'MANAGER.add_aux_loss(self.n_exp * torch.dot(f, P))',
     'MANAGER.add_aux_loss(torch.dot(f, P))', LOSSES),
    ('z-loss not squared', 'model.py', 'torch.logsumexp(logits.float(), dim=-1).pow(2).mean()',
     'torch.logsumexp(logits.float(), dim=-1).mean()', LOSSES),
    ('aux and z weights swapped', 'model.py',
     'loss = loss + self.config.aux_loss_weight * MANAGER.aggregate_aux_loss()',
     'loss = loss + self.config.router_z_loss_weight * MANAGER.aggregate_aux_loss()', LOSSES),
    ('top-1 gate a softmax of one logit', 'model.py', 'gates = probs.gather(-1, topk_idx)  # (N, 1)',
     'gates = F.softmax(topk_logits, dim=-1, dtype=torch.float32)', ROUTER_TRAINS),
    ('gates detached', 'model.py', 'row_gate = gates.t().reshape(-1)', 'row_gate = gates.detach().t().reshape(-1)',
     ROUTER_TRAINS),
    ('router noise in eval', 'model.py', 'if self.w_noise is not None and self.training:',
     'if self.w_noise is not None:', 'tests/test_moe_layer.py::test_noisy_top_k_adds_no_noise_in_eval'),
    ('routing bias sign flipped', 'model.py', 'torch.sign(load.mean() - load)', 'torch.sign(load - load.mean())',
     'tests/test_moe_features.py::test_bias_update_moves_toward_balance'),
    ('routing bias changes the gates', 'model.py', 'topk_logits = logits.gather(-1, topk_idx)',
     'topk_logits = (logits + self.expert_bias).gather(-1, topk_idx)',
     'tests/test_moe_features.py::test_bias_picks_experts_but_gates_come_from_unbiased_logits'),
    ('proj_bias not upcycled', 'model.py',
     'experts.proj_bias.copy_(mlp.c_proj.bias.expand_as(experts.proj_bias))', 'pass',
     'tests/test_moe_features.py::test_upcycled_gpt2_from_local_dir_has_the_dense_logits'),
    # today: a dropped assignment reads and writes the zero row N; the fault reads and writes its token
    ('dropped rows not zeroed', 'model.py', 'row_token = torch.where(row_kept, row_assignment % N, N)',
     'row_token = row_assignment % N',
     'tests/test_moe_layer.py::test_an_expert_that_overflows_reaches_only_the_tokens_it_keeps'),
    ('eval at train capacity', 'model.py', 'cf = self.train_capacity if self.training else self.eval_capacity',
     'cf = self.train_capacity',
     'tests/test_moe_layer.py::test_eval_drops_by_eval_capacity_and_training_by_train_capacity'),
    ('generate ignores temperature', 'model.py', 'logits = logits[:, -1, :] / temperature',
     'logits = logits[:, -1, :]',
     'tests/test_model.py::test_generate_samples_as_nanogpts_loop_with_temperature_and_top_k'),
    ('generate ignores top_k', 'model.py', 'if top_k is not None:', 'if False:',
     'tests/test_model.py::test_generate_samples_as_nanogpts_loop_with_temperature_and_top_k'),
    ('sample.py drops temperature', 'sample.py', 'temperature=temperature, top_k=top_k)', 'top_k=top_k)',
     'tests/test_sample.py::test_sampling_defaults_to_temperature_0_8_and_top_k_200'),
    ('crop keeps the last rows', 'model.py', 'self.transformer.wpe.weight[:block_size]',
     'self.transformer.wpe.weight[-block_size:]',
     'tests/test_model.py::test_crop_block_size_keeps_the_first_positions_and_the_logits'),
    ('MFU with 3 flops per parameter, not 6', 'model.py', 'flops_per_token = 6 * self.get_num_params',
     'flops_per_token = 3 * self.get_num_params',
     'tests/test_model.py::test_mfu_counts_6_flops_per_active_parameter_and_the_attention_per_token'),
    ('active params with the wrong k', 'model.py', '(self.config.top_k if active else self.config.n_exp)',
     '(1 if active else self.config.n_exp)',
     'tests/test_model.py::test_active_params_count_top_k_of_n_exp_experts'),
    ('from_pretrained ignores dropout', 'model.py', 'vocab_size=hf.vocab_size, bias=True, **override_args))',
     'vocab_size=hf.vocab_size, bias=True))',
     'tests/test_model.py::test_from_pretrained_overrides_dropout_in_every_dropout_module'),
    ('resid_dropout fixed at 0', 'model.py', 'self.resid_dropout = nn.Dropout(config.dropout)',
     'self.resid_dropout = nn.Dropout(0.0)',
     'tests/test_model.py::test_from_pretrained_overrides_dropout_in_every_dropout_module'),
    ('residual init unscaled', 'model.py', 'std=0.02 / math.sqrt(2 * self.config.n_layer)', 'std=0.02',
     'tests/test_model.py::test_gpt2_init_scales_residual_projections_including_experts'),
    ('LR warm-up from 0', 'train.py', 'return learning_rate * (it + 1) / (warmup_iters + 1)',
     'return learning_rate * it / warmup_iters', LR),
    ('cosine upside down', 'train.py', 'coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))',
     'coeff = 0.5 * (1.0 - math.cos(math.pi * decay_ratio))', LR),
    ('resume restores no iteration', 'train.py', "iter_num = saved_iter = checkpoint['iter_num']",
     "saved_iter = checkpoint['iter_num']",
     'tests/test_train.py::test_eval_only_on_a_run_resumed_between_evals_evaluates_and_changes_nothing'),
    ('resume restores no optimizer state', 'checkpoint.py',
     "optimizer.load_state_dict(local_optimizer_state(model, optimizer, checkpoint['optimizer']))", 'pass',
     'tests/test_train.py::test_resume_replays_the_uninterrupted_run_bit_for_bit'),
    ('resume restores no GradScaler', 'checkpoint.py', "scaler.load_state_dict(checkpoint['scaler'])", 'pass',
     'tests/test_reliability.py::test_a_float16_resume_restores_the_grad_scaler'),
    ('non-atomic save', 'checkpoint.py', "torch.save(checkpoint, path + '.tmp')",
     "torch.save(checkpoint, path); torch.save(checkpoint, path + '.tmp')",
     'tests/test_reliability.py::test_kill_during_checkpoint_write_keeps_previous_checkpoint'),
    ('saved_iter not set at the save', 'train.py', 'saved_iter = iter_num', 'pass',
     'tests/test_train.py::test_ctrl_c_during_a_save_names_the_iteration_on_disk'),
    ('configurator type rules off', 'configurator.py', 'if type(value) is not want:', 'if False:',
     'tests/test_configurator.py::test_bad_command_line_stops_with_one_line'),
    ('trim_log off by one', 'checkpoint.py', 'is not None and it < iter_num]', 'is not None and it <= iter_num]',
     'tests/test_train.py::test_resume_log_reads_as_one_runs_without_records_past_the_checkpoint'),
    ('grouped-mm alignment rule removed', 'model.py', 'if any(size * dtype.itemsize % 16 for size in sizes):',
     'if False:',
     'tests/test_moe_layer.py::test_grouped_matmul_on_cpu_exactly_where_torchs_kernel_takes_the_shapes'),
    ('weight decay on expert biases', 'optim.py', "if p.dim() >= 2 and not n.endswith('bias')}",
     'if p.dim() >= 2}', 'tests/test_optim.py::test_optimizer_decays_weights_not_biases'),
]


def main():
    chosen = [m for m in MUTANTS if not sys.argv[1:] or any(word in m[0] for word in sys.argv[1:])]
    survived = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, 'repo')
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns('.git', '*.bin', 'out*', '__pycache__'))
        if os.path.isdir(os.path.join(ROOT, '..', 'shared')):  # the offline data the tests find beside the repo
            os.symlink(os.path.join(ROOT, '..', 'shared'), os.path.join(tmp, 'shared'))
        for what, path, line, mutated, test in chosen:
            source = open(os.path.join(copy, path)).read()
            if source.count(line) != 1:
                print(f"NOT APPLIED  {what}: {path} holds {line!r} {source.count(line)} times")
                survived.append(what)
                continue
            with open(os.path.join(copy, path), 'w') as f:
                f.write(source.replace(line, mutated))
            p = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', test],
                               cwd=copy, capture_output=True, text=True, timeout=900)
            with open(os.path.join(copy, path), 'w') as f:
                f.write(source)
            caught = p.returncode == 1  # a test failed (2-5: pytest itself could not run)
            print(f"{'caught' if caught else 'NOT caught':10}  {what}: {test.split('::')[-1]}", flush=True)
            if not caught:
                survived.append(what)
                if p.returncode != 0:
                    print(p.stdout[-1500:] + p.stderr[-1500:])
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants caught")
    sys.exit(1 if survived else 0)


if __name__ == '__main__':
    main()
