"""One training run's skeleton, written once, so that each train_*.py's main() shows its algorithm:

    run = Run("sft", cfg, per_rank=["batch_size"])       # cfg.check(), device, DDP, an --out that can be written
    ckpt, init, tok = run.load(["pretrain", "sft"])     # --resume's checkpoint or --init's, and the tokenizer
    ...                                                  # the stage's own: model, data
    model = run.start(model, ckpt)                       # AdamW, the data order and the step; the log
    for step in run.steps():        # the step's learning rate is set; Ctrl-C ends the step, saves, exits
        ...                         # batch, forward, loss, backward
        run.check(loss)             # stop on a non-finite loss; then the update, written out in the loop:
        ...                         # clip the gradient, AdamW's step, run.step += 1
        run.check_after_update(fn)  # on checkpoint steps: the weights just made give a finite fn(model)
        run.log(metrics, save=run.due())      # the row in log.jsonl, then the checkpoint
    run.finish(metrics)             # metrics.json, the last line, DDP torn down

Every stage logs to out/<stage>/log.jsonl in one vocabulary, namespaced as CleanRL and TRL do, which
report.py and the tests read:
    loss/train, loss/val, loss/replay, loss/policy, loss/value    the losses
    rollout/reward, /score, /spread, /gold, /kl, /accuracy, /worked, /all_equal, /length, /ended
                                                  what the step's sampled replies got (PPO, GRPO)
    policy/clipfrac, /approx_kl, /kl, /entropy    how far the update moved the policy (PPO, GRPO)
    train/accuracy, train/margin; rewards/...     the reward model's, and DPO's implicit reward, on the batch
    eval/...                                      held-out measures: eval/accuracy, eval/pass@1, eval/qa_accuracy
    lr, perf/tokens_per_s, perf/pairs_per_s, perf/mfu

Also here: the learning-rate schedule, the stop on Ctrl-C, the log and the device's peak FLOP/s.
"""
import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import common
import loaders
from cli import UserError
from common import all_mean, is_master, print0
from data.tokenizer import load_tokenizer
from gpt_lora import AdaptersOff, add_lora


class Run:
    """The plumbing every stage shares: set up, start, step, log, save, finish. The attributes a loop
    reads: device, rank, world, step, lr, model (compiled and DDP-wrapped as asked), raw (the model
    itself), reference (see start), optimizer, data_gen (orders the data), logger."""

    def __init__(self, stage, cfg, per_rank=("batch_size",)):
        """per_rank: the flags (batch sizes) that DDP splits over the processes, so must divide by their number."""
        cfg.check()
        self.stage, self.cfg = stage, cfg
        self.rank, self.world, self.device = common.setup_ddp(common.pick_device(cfg.device))
        for name in per_rank:
            if getattr(cfg, name) % self.world:
                raise UserError(f"--{name}={getattr(cfg, name)} must be a multiple of the number of processes "
                                f"({self.world})")
        if is_master():
            cli.check_writable(cfg.out)
        self.ckpt_path = Path(cfg.out) / "ckpt.pt"
        self.end = cfg.stop_at if 0 < cfg.stop_at < cfg.max_steps else cfg.max_steps
        self.step, self.lr, self.since = 0, cfg.lr, 0
        self.train_seconds, self.t_loop = 0.0, None  # training seconds before this run's loop (--resume), its start

    def load(self, stages, made_by="python train_sft.py", init=None, keeps_init=True):
        """(ckpt, init_ckpt, tok): the checkpoint the model starts from (under --resume, this stage's
        own), the one the run first started from (init, by default --init; None for "scratch"), which
        must be of one of stages, and the tokenizer: --tokenizer, else the checkpoint's, else
        out/tokenizer. A stage that does not keep the init model beside its own (keeps_init=False:
        no reference, no policy to compare with) does not read it under --resume. self.init keeps
        init's path; every checkpoint records it."""
        ckpt = common.load_checkpoint(self.ckpt_path, [self.stage], made_by=f"python train_{self.stage}.py") \
            if self.cfg.resume else None
        self.init = (ckpt or {}).get("init") or init or self.cfg.init
        unread = self.init == "scratch" or (ckpt is not None and not keeps_init)
        init_ckpt = None if unread else common.load_checkpoint(self.init, stages, made_by=made_by)
        ckpt = ckpt or init_ckpt
        self.tokenizer = self.cfg.tokenizer or (ckpt["tokenizer"] if ckpt else "out/tokenizer")
        self.tok = load_tokenizer(self.tokenizer)
        return ckpt, init_ckpt, self.tok

    def start(self, model, ckpt, keep=dict, seed=None, unit=None, flops_per_unit=None, reference=None):
        """The optimizer over the model, the generator that orders the data, and the step: all restored exactly
        from ckpt under --resume. seed: the global RNG's seed from here on (None: left as it is); keep()
        returns the stage's own fields for each checkpoint; unit names the speed each printed line shows
        (of what run.count counts), flops_per_unit adds MFU to it. reference: the checkpoint of what a
        post-training stage compares the model with; self.reference is then its model, frozen, built before
        the seed (building a model draws on the RNG), or with LoRA the model trained with its adapters off
        (one copy of the weights). Returns the model to call: compiled and DDP-wrapped as the config asks."""
        cfg = self.cfg
        self.lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets} \
            if getattr(cfg, "lora_rank", 0) else None
        self.reference_ckpt = reference
        self.reference = self.frozen(reference) if reference is not None and not self.lora else None
        if seed is not None:
            torch.manual_seed(seed)
        if self.lora:  # train a low-rank update beside the frozen weights (gpt_lora.LoRALinear)
            model = add_lora(model, **self.lora)
            if cfg.resume:  # the base weights and the adapters as saved, not the merged ones the stage loaded
                model.load_state_dict(ckpt["model"])
        self.raw = model.to(self.device)
        if reference is not None and self.lora:
            self.reference = AdaptersOff(self.raw)
        # pre-training chooses its optimizer and schedule (configs.Pretrain); the other stages take AdamW on a cosine
        self.optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay,
                                                   optimizer=getattr(cfg, "optimizer", "adamw"))
        self.cooldown = cfg.cooldown if getattr(cfg, "schedule", "cosine") == "wsd" else None
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.resume:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as e:
                raise UserError(f"--resume: {e}") from None
            self.step, self.train_seconds = ckpt["step"], ckpt.get("train_seconds", 0.0)
            self.data_gen.set_state(ckpt["data_rng"])
            rng = ckpt["rng"]  # under DDP, a list: each rank's own (PPO and GRPO sample other replies on each)
            common.set_rng_state(rng[self.rank % len(rng)] if isinstance(rng, list) else rng)
        self.model = self.ddp(torch.compile(self.raw) if cfg.compile else self.raw)
        self.keep = keep
        self.unit, self.flops_per_unit = unit, flops_per_unit
        self.peak = peak_flops(self.device) if flops_per_unit else None
        self.logger = Logger(cfg.out, self.stage, cfg.max_steps, resume=cfg.resume, start_step=self.step)
        self.logger.phase("evaluation")  # what a stage does before its loop: the figures at the start
        self.trained = trained = sum(p.numel() for p in self.raw.parameters() if p.requires_grad)
        own = sum(p.numel() for n, p in self.raw.named_parameters() if "lora_" not in n)  # the model without adapters
        lora = f" (LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {trained:,} trained, {trained / own:.1%})" if self.lora else ""
        print0(f"{self.stage}: {self.raw.num_params() / 1e6:.2f}M parameters{lora}, on {self.device} x{self.world}, "
               f"from {self.ckpt_path if cfg.resume else self.init} (step {self.step} of {cfg.max_steps})")
        return self.model

    def frozen(self, ckpt, **kind):
        """ckpt's model (of the kind common.gpt_from_checkpoint's flags say) on the device, not trained."""
        return common.gpt_from_checkpoint(ckpt, self.tok, **kind).to(self.device).eval().requires_grad_(False)

    def reference_to_evaluate(self):
        """The reference as a model of its own, for evaluations that generate from it (with LoRA, a copy built now)."""
        return self.frozen(self.reference_ckpt) if self.lora and self.reference is not None else self.reference

    def ddp(self, net):
        """net wrapped for DDP when there are several processes (it averages the gradients), else net."""
        if self.world == 1:
            return net
        return DDP(net, device_ids=[torch.device(self.device).index] if self.device.startswith("cuda") else None)

    def save(self):
        """The checkpoint: enough to rebuild the model, and to resume exactly. Written by rank 0, atomically."""
        rng = common.rng_state()
        if self.world > 1:  # every rank saves at the same steps, so each can hand rank 0 its random state
            rng = [None] * self.world
            torch.distributed.all_gather_object(rng, common.rng_state())
        if is_master():
            common.save_checkpoint(self.ckpt_path, {
                "stage": self.stage, "model_args": dataclasses.asdict(self.raw.config), "model": self.raw.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "config": dataclasses.asdict(self.cfg),
                "tokenizer": self.tokenizer, "init": self.init, "data_rng": self.data_gen.get_state(), "rng": rng,
                "tokenizer_fingerprint": self.tok.fingerprint, "train_seconds": self.seconds(),
                **({"lora": self.lora} if self.lora else {}), **self.keep()})
            if self.lora:  # the adapters alone: what a LoRA run adds to the checkpoint it started from
                common.save_checkpoint(self.ckpt_path.with_name("adapters.pt"), {"lora": self.lora, "init": self.init, "adapters": {
                    k: v for k, v in self.raw.state_dict().items() if ".lora_" in k}})

    def seconds(self):
        """Seconds of training of this checkpoint: earlier runs' (--resume) and this run's loop so far."""
        return self.train_seconds + (time.time() - self.t_loop if self.t_loop is not None else 0.0)

    def steps(self):
        """The loop: yields each step's number with its learning rate set. Ctrl-C or SIGTERM ends the loop
        after the step in progress, saves, says how to go on and exits; a loop that runs out saves too."""
        self.logger.phase("training")
        self.t_loop = self.t_last = time.time()
        with StopOnSignal() as stop:
            while self.step < self.end and not stop.requested():
                self.lr = lr_at(self.step, self.cfg.lr, self.cfg.min_lr, self.cfg.warmup_steps, self.cfg.max_steps,
                                self.cooldown)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr
                yield self.step
        self.train_seconds, self.t_loop = self.seconds(), None  # evaluations and checkpoints included
        self.logger.phase("evaluation")
        self.save()
        if stop.stopped:
            print0(f"\ninterrupted at step {self.step}: checkpoint saved to {self.ckpt_path}; "
                   f"continue with: python train_{self.stage}.py --resume (and the same flags)")
            common.teardown_ddp()
            raise SystemExit(128 + (stop.signum or signal.SIGINT))  # the shell's convention: 130 for Ctrl-C

    def sync(self, now):
        """Under DDP, whether the next backward all-reduces the gradients: once a step, on its last micro-batch."""
        if self.world > 1:
            self.model.require_backward_grad_sync = now

    def replay_loss(self, ids):
        """The mean next-token loss of the model trained on a fresh batch of --replay_batch windows of the
        replayed pre-training text ids (loaders.replay): what SFT, DPO and GRPO add against forgetting."""
        x, y = loaders.get_replay_batch(ids, self.cfg.replay_batch, self.raw.config.block_size, self.data_gen,
                                        self.rank, self.world)
        with common.autocast(self.device):
            return self.model(x.to(self.device), y.to(self.device))

    def apply_gradients(self, net=None, optimizer=None):
        """Clip the gradient of net (the model) to --grad_clip, take optimizer's (AdamW's) step, clear the
        gradients. A stage with a second network (PPO's critic) passes it and its optimizer."""
        net, optimizer = net or self.model, optimizer or self.optimizer
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def check(self, value, what="loss", step=None):
        """Stop when value is NaN or infinite, before weights that produce it can be saved: the checkpoint
        on disk stays the last good one. Under DDP the ranks agree first: a rank that stopped alone would
        leave the others waiting for it at their next all-reduce."""
        value = all_mean(value)
        if not math.isfinite(value):
            kept = (f"the last good checkpoint is kept in {self.ckpt_path}: continue from it with --resume and a "
                    "lower --lr" if self.ckpt_path.is_file() else "no checkpoint was written: lower --lr")
            raise UserError(f"the {what} became {value} at step {step or self.step}; {kept} (or check the data)")

    @torch.no_grad()
    def check_after_update(self, fn, what="loss after the update", step=None):
        """Stop when fn(model), a loss or log-probability under the weights just updated (no dropout, no
        gradient), is not finite: a finite loss can still leave weights that are not, or whose logits
        overflow, and those must not be saved. Every rank calls it at once."""
        self.raw.eval()
        with common.autocast(self.device):
            value = float(fn(self.raw))
        self.raw.train()
        self.check(value, what, step)

    def due(self):
        """Whether this step ends with a checkpoint (and the evaluations that go with it): every
        eval_every steps, and the last."""
        return self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps

    def count(self, n):
        """Work done on this rank (tokens, pairs) for the speed on the next printed line."""
        self.since += n

    def log(self, metrics, printed=False, save=False):
        """The step's row in log.jsonl, and a line on stdout every log_every steps, at the last, or when
        printed; then the checkpoint, when save. The row goes first: a kill between the two leaves a row
        that --resume drops and redoes, never a checkpoint whose step has no row."""
        printed = printed or self.step % self.cfg.log_every == 0 or self.step == self.end
        if printed and self.unit:  # the speed since the last printed line
            rate = all_mean(self.since) * self.world / (time.time() - self.t_last)
            metrics[self.unit] = round(rate) if rate >= 100 else round(rate, 1)
            if self.peak:
                metrics["mfu"] = rate * self.flops_per_unit / self.peak
            self.t_last, self.since = time.time(), 0
        self.logger.log(self.step, printed=printed, **metrics)
        if save:
            self.save()

    def finish(self, metrics, said=""):
        """metrics.json (with the steps and the training's seconds), the run's last line, DDP torn down."""
        if self.lora and is_master():
            size = self.ckpt_path.with_name("adapters.pt").stat().st_size
            metrics = {**metrics, "adapters_bytes": size}
            said += f"; its adapters alone {size / 1e6:.2f} MB in {self.ckpt_path.with_name('adapters.pt')}"
        self.logger.finish({"steps": self.step, "train_seconds": self.train_seconds, "trained_params": self.trained,
                            **metrics})
        print0(f"{self.stage}: done in {self.train_seconds:.0f}s of training{said}, checkpoint {self.ckpt_path}")
        common.teardown_ddp()


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (how schedulers and torchrun stop a job) during training: the loop
    finishes the step it is in, then saves and exits. Stopping mid-step instead would save a data order
    already advanced past a batch that was never learned, so --resume would not continue exactly.

    There is no second-Ctrl-C escape hatch: torchrun passes the terminal's Ctrl-C on to its workers,
    so each worker sees it twice. A step is short; kill -9 stops at once, leaving the last checkpoint.
    """

    def __init__(self):
        self.signum = None  # the signal this process received, if any
        self.stopped = False  # whether the loop was told to stop (on every rank alike)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._receive) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _receive(self, signum, frame):
        self.signum = self.signum or signum

    def requested(self):
        """Whether to stop now. Under DDP every rank must stop at the same step, so they agree first."""
        self.stopped = all_mean(self.signum is not None) > 0
        return self.stopped


def lr_at(step, max_lr, min_lr, warmup, total, cooldown=None):
    """Linear warm-up to max_lr over `warmup` steps, then a cosine down to min_lr at `total`; or, given
    cooldown (a fraction of total), warm-up-stable-decay: max_lr until the last cooldown * total steps,
    then a straight line down to min_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if cooldown is not None:
        start = total - cooldown * total
        return max_lr if step < start else max_lr + (min_lr - max_lr) * min(1.0, (step - start) / max(1, total - start))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def peak_flops(device):
    """The device's peak FLOP/s for MFU: bf16 dense from the data sheet on known GPUs; on a CPU, the
    rate this machine reaches on a large fp32 matmul, measured now (so CPU MFU is relative to that)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}
        return next((v for k, v in table.items() if k in name), None)
    if device != "cpu":
        return None
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def process_start():
    """When this process began, imports included (Linux: from /proc); elsewhere, now."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


class Logger:
    """The per-interval line on stdout, every step in out/<stage>/log.jsonl, metrics.json at the end.
    Only rank 0 writes. It also times the run's phases: start-up (imports, data, model) until the logger
    exists, then "training" and "evaluation" as the script names them (log.phase); metrics.json gets
    the seconds of each."""

    def __init__(self, out_dir, stage, total_steps, resume=False, start_step=None):
        """resume=True appends to log.jsonl; start_step, the step resumed from, first drops the rows an
        interrupted run wrote after its last checkpoint (the resumed run logs those steps again)."""
        self.out, self.stage, self.total = Path(out_dir), stage, total_steps
        self.t0 = time.time()
        self.seconds, self.current, self.since = {"start-up": self.t0 - process_start()}, "start-up", self.t0
        self.first_step = None
        if is_master():  # Run made self.out (cli.check_writable)
            if resume and start_step is not None:
                self.keep_rows_up_to(start_step)
            self.file = open(self.out / "log.jsonl", "a" if resume else "w")

    def keep_rows_up_to(self, step):
        """Rewrite log.jsonl with its rows up to step, so it holds each step once. A line a kill cut
        short is dropped too."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)

    def log(self, step, printed=True, **metrics):
        if not is_master():
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if printed:
            if self.first_step is None:
                self.first_step, self.t0 = step, time.time()
            done = step - self.first_step
            eta = f"{(time.time() - self.t0) / done * (self.total - step):.0f}s" if done > 0 else "?"
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
            print(f"{self.stage} {step}/{self.total} | " + " | ".join(parts) + f" | eta {eta}", flush=True)

    def phase(self, name):
        """From now on the time counts as name ("training", "evaluation")."""
        now = time.time()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.current, self.since = name, now

    def finish(self, metrics):
        self.phase("done")
        if is_master():
            self.file.close()
            seconds = {k: round(v, 1) for k, v in self.seconds.items()}
            (self.out / "metrics.json").write_text(json.dumps({**metrics, "seconds": seconds}, indent=2) + "\n")
