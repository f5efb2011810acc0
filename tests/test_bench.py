"""
bench.py run the way a user runs it, as a subprocess at tiny configs: each mode prints its lines,
in mode='layer' the one-hot and loop baselines agree with MOELayer, drops included, and in
mode='sample' cached generate and the recompute loop give the same tokens.
Timings are printed, never asserted.
"""
import functools
import json
import os
import re
import sys

import numpy as np
import pytest

from conftest import ROOT, run_python
TINY = ['--device=cpu', '--compile=False', '--real_data=False', '--vocab_size=64', '--batch_size=2',
        '--block_size=16', '--n_layer=2', '--n_head=2', '--n_embd=32', '--n_exp=4', '--num_steps=2']


def bench(*args, cwd=ROOT):
    p = run_python([sys.executable, os.path.join(ROOT, 'bench.py'), *TINY, *args], cwd)
    return p.returncode, p.stdout, p.stderr.strip()


def layer_checks(out):
    checks = re.findall(r"^check: (\S+) agrees with ours to (\S+) \(relative, outputs and input grads\), ([\d.]+)% dropped$",
                        out, re.M)
    assert [name for name, _, _ in checks] == ['one-hot', 'loop'], out
    return [(float(diff), float(dropped)) for _, diff, dropped in checks]


# top-2 with half the slots: second choices dropped. Enough tokens that activations, not the
# weight gradients, dominate the peak memory.
LAYER_RUNS = {'top2': ['--train_capacity=0.5', '--batch_size=8', '--block_size=64', '--n_embd=16'],
              'top1_without_bias': ['--train_capacity=0.5', '--top_k=1', '--bias=False']}


@functools.cache
def layer_mode(run):
    """ bench.py --mode=layer with LAYER_RUNS[run], run once for every test that reads it """
    return bench('--mode=layer', *LAYER_RUNS[run])


@pytest.mark.parametrize('run', list(LAYER_RUNS))
def test_layer_mode_baselines_agree_with_moe_layer_drops_included(run):
    code, out, err = layer_mode(run)
    assert code == 0, err
    for diff, dropped in layer_checks(out):
        assert diff <= 1e-5 and dropped > 0


def test_layer_mode_times_each_formulation_and_ours_grows_linearly_in_memory_unlike_one_hot():
    code, out, err = layer_mode('top2')
    assert code == 0, err
    for name in ('ours', 'one-hot', 'loop'):
        assert re.search(rf"^ *{name}: +[\d.]+ ms, +[\d.]+x ours, peak memory +[\d.]+ MiB$", out, re.M), out
    sizes = [(int(n), float(ours), float(onehot)) for n, ours, onehot in
             re.findall(r"^N= *(\d+): ours +([\d.]+), one-hot +([\d.]+)$", out, re.M)]
    assert [n for n, _, _ in sizes] == [128, 256, 512, 1024]
    (_, ours1, onehot1), (_, ours2, onehot2) = sizes[-2:]
    assert ours2 / ours1 < 2.2  # twice the tokens, about twice the memory
    assert onehot2 / onehot1 > 3.0  # its (N, E, cap) tensors: about four times


def test_step_mode_times_moe_against_dense_and_flop_equivalent_dense_with_each_optimizer_and_profiles():
    code, out, err = bench('--mode=step', '--optimizer=adamw,muon', '--profile=True')
    assert code == 0, err
    assert err == ''
    assert re.search(r"^ +aten::mm +[\d.]+ \( *\d+\) +[\d.]+ \( *\d+\)$", out, re.M), out
    for name in ('dense', 'dense-eq', 'moe'):
        for opt in ('adamw', 'muon'):
            assert re.search(rf"^ *{name} {opt}: +[\d.]+ ms/step, +[\d,]+ tok/s, [\d.]+ GFLOP/step, "
                             r"optimizer [\d.]+%$", out, re.M), out
    for opt in ('adamw', 'muon'):
        ratios = re.search(rf"^{opt} moe/dense: time [\d.]+x, FLOPs ([\d.]+)x; moe/dense-eq: time [\d.]+x, "
                           r"FLOPs ([\d.]+)x$", out, re.M)
        assert ratios, out
        flops_vs_dense, flops_vs_dense_eq = map(float, ratios.groups())
        assert flops_vs_dense > 1.1  # the MoE blocks run top_k = 2 experts per token
        assert flops_vs_dense_eq == pytest.approx(1.0, abs=0.01)  # the same but for the router


def test_model_mode_on_real_data_with_mfu(tmp_path):
    data_dir = tmp_path / 'data' / 'tiny'
    data_dir.mkdir(parents=True)
    np.random.default_rng(0).integers(0, 50, 1000).astype(np.uint16).tofile(data_dir / 'train.bin')
    (data_dir / 'meta.json').write_text(json.dumps({'vocab_size': 50, 'itos': [chr(65 + i) for i in range(50)]}))
    code, out, err = bench('--real_data=True', '--dataset=tiny', '--peak_flops=1e12', cwd=tmp_path)
    assert code == 0, err
    assert re.search(r"^time per iteration: [\d.]+ms, [\d,]+ tok/s, MFU [\d.]+%$", out, re.M), out
    assert re.search(r"^optimizer.step: [\d.]+ms, [\d.]+% of the iteration$", out, re.M), out
    assert re.search(r"^peak memory of a step: [\d.]+ MiB beyond the [\d.]+ MiB of weights and optimizer state$", out, re.M)


# the CPU memory measurement of mode='layer' and profile=True's trace both run torch's profiler,
# whose kineto logs each start and stop unless told not to

def test_layer_mode_memory_measurement_leaves_stderr_empty():
    code, out, err = layer_mode('top2')
    assert code == 0, err
    assert err == ''


def test_profile_trace_leaves_stderr_empty(tmp_path):
    code, out, err = bench('--profile=True', cwd=tmp_path)  # writes ./bench_log
    assert code == 0, err
    assert err == ''


def test_sample_mode_times_cached_generate_against_recompute_on_the_same_tokens():
    # 30 tokens after a 5-token prompt: past block_size 16, where generate recomputes the window too
    code, out, err = bench('--mode=sample', '--prompt_len=5', '--max_new_tokens=30')
    assert code == 0, err
    for name in ('dense', 'moe'):
        assert re.search(rf"^ *{name}: cached +[\d.]+, recompute +[\d.]+, +[\d.]+x; 100.0% of the tokens the same$",
                         out, re.M), out


@pytest.mark.parametrize('args,message', [
    (['--mode=layers'], "error: mode='layers' is not 'model', 'layer', 'step' or 'sample'"),
    (['--mode=sample', '--prompt_len=17'], "error: mode='sample' needs 1 <= prompt_len <= block_size and "
     "max_new_tokens >= 1, got prompt_len=17, block_size=16, max_new_tokens=200"),
    (['--real_data=True', '--dataset=nope'],
     "error: data/nope/train.bin not found: run python data/nope/prepare.py first, or use --real_data=False"),
    (['--dtype=fp16'], "error: dtype='fp16' is not one of float32, bfloat16, float16 ('' picks one for the device)"),
    (['--optimizer=adamw,muon'], "error: optimizer='adamw,muon' is not 'adamw' or 'muon' (mode='step': or both, "
     "'adamw,muon')"),
    (['--mode=layer', '--dropout=0.1'],
     "error: mode='layer' first checks that the formulations agree, which dropout=0.1 prevents: leave dropout at 0"),
])
def test_bad_settings_stop_with_one_line(args, message):
    code, out, err = bench(*args)
    assert code != 0
    assert err == message
