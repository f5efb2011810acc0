"""
RunLog, the account train.py's rank 0 keeps of a run: a line per log step and eval on stdout, its record in
out_dir's log.jsonl, the same numbers in wandb, and the running averages the lines carry (step time, MFU, the
last few losses).
"""
import json

import hellaswag


class RunLog:

    def __init__(self, path, start_iter, max_iters, tokens_per_iter, show_aux, show_z):
        """ path: log.jsonl, None to print only; show_aux, show_z: whether step lines carry the aux and z-loss """
        self.file = open(path, 'a', buffering=1) if path else None  # line-buffered: each record on disk at once
        self.wandb = None
        self.start_iter, self.max_iters, self.tokens_per_iter = start_iter, max_iters, tokens_per_iter
        self.show_aux, self.show_z = show_aux, show_z
        self.running_mfu, self.dt_avg = -1.0, None  # running averages once the loop has settled
        self.recent_losses = []  # the last few logged (iter, loss, aux, z), reported if the loss blows up

    def start_wandb(self, **init):
        import wandb  # only where wandb_log asks for it: the GPU machines have no wandb
        wandb.init(**init)
        self.wandb = wandb

    def write(self, record, line, wandb_stats):
        """ One log line on stdout, its record in log.jsonl (if this run keeps one), the same numbers in wandb """
        print(line)
        if self.file is not None:
            self.file.write(json.dumps(record) + '\n')
        if self.wandb is not None:
            self.wandb.log(wandb_stats)

    def eval(self, iter_num, losses, lr, train_s):
        """ Writes an eval's losses: {split: loss}, with HellaSwag's scores if it scored them """
        scores = {k: v for k, v in losses.items() if k.startswith('hellaswag')}  # {} unless hellaswag
        splits = [s for s in losses if s not in scores]
        line = ", ".join([f"{s} loss {losses[s]:.4f}" for s in splits] + hellaswag.line(scores))
        record = dict(iter=iter_num, **{f'{s}_loss': losses[s] for s in splits}, lr=lr, train_s=train_s, **scores)
        wandb_stats = {"iter": iter_num, **{f"{s}/loss": losses[s] for s in splits}, "lr": lr,
                       "mfu": self.running_mfu * 100, **scores}
        self.write(record, f"step {iter_num}: {line}", wandb_stats)

    def step(self, record, dt, mfu):
        """ Writes a training step's record (iter, loss, lr, dt_ms, train_s, MANAGER.log_record()'s routing):
        a step of dt seconds at mfu (None: no GPU peak to measure it by) """
        aux, z = record.get('aux', 0.0), record.get('z', 0.0)
        self.recent_losses = (self.recent_losses + [(record['iter'], round(record['loss'], 4), round(aux, 4),
                                                     round(z, 4))])[-5:]
        if record['iter'] - self.start_iter >= 5:  # the first steps of a process compile and warm up
            self.dt_avg = dt if self.dt_avg is None else 0.9 * self.dt_avg + 0.1 * dt
            if mfu is not None:
                self.running_mfu = mfu if self.running_mfu == -1.0 else 0.9 * self.running_mfu + 0.1 * mfu
        self.write(record, self.step_line(record), {
            "iter": record['iter'], "train/loss_step": record['loss'], "lr": record['lr'],
            **{f"moe/{k}": record[k] for k in ('aux', 'z', 'drop', 'top_share') if k in record},
            **{f"load/layer{layer}/expert{e}": share for layer, (shares, _) in record.get('routing', {}).items()
               for e, share in enumerate(shares)}})

    def step_line(self, r):
        """ The log line of a training step's record r """
        line = f"iter {r['iter']}: loss {r['loss']:.4f}"
        if 'routing' in r:
            line += f", aux {r['aux']:.3f}" if self.show_aux else ""
            line += f", z {r['z']:.3f}" if self.show_z else ""
            line += f", drop {r['drop'] * 100:.1f}%, top {r['top_share'] * 100:.0f}%"
        line += f", {r['dt_ms']:.1f}ms, {self.tokens_per_iter / r['dt_ms']:.1f}k tok/s"
        line += f", mfu {self.running_mfu * 100:.1f}%" if self.running_mfu > 0 else ""
        if self.dt_avg is not None:
            eta = (self.max_iters - r['iter']) * self.dt_avg
            line += ", eta " + (f"{eta / 3600:.1f}h" if eta > 3600 else f"{eta / 60:.1f}m" if eta > 60 else
                                f"{eta:.0f}s")
        return line

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
