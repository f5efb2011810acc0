"""
train.py under torchrun when one process differs: an error is said once, by whichever process meets it first; a
crash on one process shows its traceback; a NaN on one process stops all at the same iteration; a killed process
leaves a checkpoint that resumes; two nodes train as one node's two processes. CPU, gloo, 2 processes; the
test-only patches run before train.py, in a script torchrun starts (patched).
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TORCHRUN, TINY, MOE, train, logged

ARGS = [*TINY, *MOE, '--gradient_accumulation_steps=2', '--max_iters=4', '--eval_interval=2', '--eval_iters=2']


def patched(tmp_path, patch):
    """ a script that runs `patch` (which knows its process's `rank`), then the train.py its command line names """
    script = tmp_path / 'patched.py'
    script.write_text(f"import os, sys, time, signal, runpy\nsys.path.insert(0, {ROOT!r})\n"
                      f"rank = int(os.environ['RANK'])\n{patch}\n"
                      "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    return [*TORCHRUN, str(script)]


def test_an_error_the_late_rank_0_never_reaches_is_said_once_by_rank_1_naming_what_to_add(workdir, tmp_path):
    # the micro-steps of an iteration are split over the processes: 3 rounds up to the next multiple of 2
    launcher = patched(tmp_path, "if rank == 0:\n    time.sleep(10)  # a slow disk: rank 1 meets the error first")
    p = train(workdir, *ARGS, '--gradient_accumulation_steps=3', f'--out_dir={tmp_path}/out', launcher=launcher,
              check=False)
    assert p.returncode != 0 and not (tmp_path / 'out').exists()
    error = ("error: gradient_accumulation_steps=3 is not divisible by the 2 processes: it counts the micro-steps "
             "of all of them; add --gradient_accumulation_steps=4 (or another multiple)")
    assert p.stderr.count('error: ') == 1 and error + '\n' in p.stderr, p.stderr
    assert p.stderr.index(error) < p.stderr.index('ChildFailedError')  # then torchrun's report


BUG_ON_RANK_1 = """
import model
forward = model.GPT.forward
def forward_with_a_bug_on_rank_1(self, idx, targets=None):
    if rank == 1 and self.training:
        raise RuntimeError('a bug only rank 1 meets')
    return forward(self, idx, targets)
model.GPT.forward = forward_with_a_bug_on_rank_1
"""


def test_a_crash_on_rank_1_shows_its_traceback(workdir, tmp_path):
    p = train(workdir, *ARGS, f'--out_dir={tmp_path}/out', launcher=patched(tmp_path, BUG_ON_RANK_1), check=False)
    assert p.returncode != 0
    assert "in forward_with_a_bug_on_rank_1\n" in p.stderr and "RuntimeError: a bug only rank 1 meets" in p.stderr


NAN_ON_RANK_1_FROM_ITER_3 = """
import model
forward, calls = model.GPT.forward, [0]
def nan_forward(self, idx, targets=None):
    logits, loss = forward(self, idx, targets)
    if self.training:
        calls[0] += 1  # one micro-step per process and iteration
        if rank == 1 and calls[0] > 3:
            loss = loss * float('nan')
    return logits, loss
model.GPT.forward = nan_forward
"""


def test_a_nan_on_rank_1_stops_both_processes_at_its_iteration_with_one_line(workdir, tmp_path):
    out = tmp_path / 'out'
    p = train(workdir, *ARGS, f'--out_dir={out}', launcher=patched(tmp_path, NAN_ON_RANK_1_FROM_ITER_3),
              check=False)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'Connection reset' not in p.stderr, p.stderr
    assert errors[0].startswith("error: loss is [")  # every process's, the one that went bad among them
    assert ", nan] at iter 3; the last good checkpoint is kept" in errors[0]
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 2


KILL_RANK_1_AFTER_THE_FIRST_CHECKPOINT = """
import checkpoint
save = checkpoint.save_checkpoint
def save_then_die(path, *args, **kwargs):
    save(path, *args, **kwargs)
    if rank == 1:
        while not os.path.exists(path):  # rank 0 renames it into place
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_checkpoint = save_then_die
"""


@pytest.fixture(scope='module')
def killed_run(workdir):
    """ one node, two processes, rank 1 killed once the checkpoint at iteration 2 is on disk: the output and the
    losses logged until then """
    out = workdir / 'out-killed'
    launcher = patched(workdir, KILL_RANK_1_AFTER_THE_FIRST_CHECKPOINT)
    p = train(workdir, *ARGS, f'--out_dir={out}', launcher=launcher, check=False)
    return out, p, logged(out, 'val_loss'), logged(out, 'loss')


def test_a_killed_process_ends_the_job_and_its_checkpoint_resumes(workdir, killed_run):
    from checkpoint import load_checkpoint
    out, p, _, _ = killed_run
    assert p.returncode != 0 and 'Signal 9 (SIGKILL)' in p.stderr, p.stderr[-3000:]
    assert load_checkpoint(out / 'ckpt.pt', 'cpu')['iter_num'] == 2
    train(workdir, *ARGS, f'--out_dir={out}', '--init_from=resume')  # on one process
    assert [i for i, _ in logged(out, 'val_loss')] == [0, 2, 4]


def test_two_nodes_train_as_one_nodes_two_processes(workdir, killed_run, tmp_path):
    _, _, one_node_evals, one_node_losses = killed_run  # up to the checkpoint at iteration 2
    with socket.socket() as s:  # a free port for node 0's store
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = tmp_path / 'out'
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={rank}',
                               '--nproc_per_node=1', '--master_addr=127.0.0.1', f'--master_port={port}',
                               os.path.join(ROOT, 'train.py'), *ARGS, f'--out_dir={out}'],
                              cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    assert [i for i, _ in logged(out, 'val_loss')] == [0, 2, 4] and [i for i, _ in one_node_evals] == [0, 2]
    assert logged(out, 'val_loss')[:2] == one_node_evals  # exactly
    assert len(one_node_losses) >= 2 and logged(out, 'loss')[:len(one_node_losses)] == one_node_losses
