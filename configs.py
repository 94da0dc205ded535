"""Every stage's flags, side by side: one dataclass per train_*.py, one comment per field. The command
line sets them (`--field=value`, or `--preset=NAME` for a named set from PRESETS: "gpu", a real data
set on one GPU; "smoke", the whole journey's plumbing in about a minute on a CPU, nothing learned) and
`--help` prints them with these comments. Each class's check() refuses values the stage cannot run
with, one error line each, before anything is loaded (Run calls it first).
"""
import math
from dataclasses import dataclass

from cli import UserError, require_choice, require_positive, settle_lora
from data import own_data

QA_TOKENS = 96  # the reply budget of held-out QA wherever it is measured, so that one checkpoint has one figure


@dataclass
class Common:
    """The flags every stage has, with the same meaning; a stage redeclares those whose default is its own."""
    out: str = "out"                   # where ckpt.pt, log.jsonl and metrics.json go
    max_steps: int = 100               # optimizer steps
    lr: float = 1e-4                   # peak learning rate
    min_lr: float = 1e-5               # learning rate at the end of the cosine
    warmup_steps: int = 10             # linear warm-up steps
    eval_every: int = 100              # steps between checkpoints
    log_every: int = 10                # steps between printed lines
    tokenizer: str = ""                # default: the one the --init checkpoint was trained with
    resume: bool = False               # continue exactly from <out>/ckpt.pt (optimizer, step, RNG)
    stop_at: int = 0                   # stop early at this step with a checkpoint (0: run to max_steps)
    weight_decay: float = 0.0          # AdamW decay on matrices
    grad_clip: float = 1.0             # clip the gradient norm (of each network trained) to this (0: off)
    device: str = "auto"               # auto (cuda, mps, cpu), or a torch device name
    compile: bool = False              # torch.compile the model trained
    seed: int = 1337                   # seeds initialisation, data order and sampling

    def check(self):
        """Each stage checks its own flags; the shared ones need no check of their own."""

    def settle(self, given):
        """The defaults that hang on the flags given (cli.parse_config calls it): with your own --data,
        TinyWorld's held-out files and measures fall back (data.own_data); LoRA takes LORA_SETTINGS."""
        stage = type(self).__name__.lower()
        own_data.settle(self, given, stage)
        settle_lora(self, given, stage, LORA_SETTINGS.get(stage, []))


# ----------------------------------------------------------------------------- pre-training

@dataclass
class Pretrain(Common):
    data: str = "data/tinyworld/corpus_train.txt"   # training text, documents separated by blank lines
    val_data: str = "data/tinyworld/corpus_val.txt"  # validation text, same format (empty: --held_out of --data)
    held_out: float = 0.0              # share of --data held out (its end) to validate on, not trained on (your own --data: 0.05)
    tokenizer: str = ""                # a directory from `python -m data.tokenizer`, or gpt2; default:
                                       # out/tokenizer, or the one the --init checkpoint was trained with
    init: str = "scratch"              # scratch, a pretrain checkpoint to continue from, or a GPT-2 directory
    out: str = "out/pretrain"
    n_layer: int = 4                   # transformer blocks
    n_head: int = 4                    # attention heads
    n_embd: int = 128                  # residual stream width
    rope: bool = True                  # rotary positions (false: GPT-2's learned position table)
    block_size: int = 128              # context length in tokens
    dropout: float = 0.0               # dropout probability (0: we see the data less than 3 times)
    batch_size: int = 16               # sequences per micro-step, over all processes
    grad_accum: int = 1                # micro-steps per optimizer step
    max_steps: int = 500
    lr: float = 3e-3
    min_lr: float = 3e-4               # the learning rate at the end of the decay
    warmup_steps: int = 50
    weight_decay: float = 0.1
    schedule: str = "wsd"              # wsd (warm up, hold --lr, down to --min_lr over the last --cooldown), or cosine
    cooldown: float = 0.2              # the fraction of the steps that wsd decays over
    optimizer: str = "muon"            # muon: Muon for the blocks' weight matrices, AdamW for the rest; or adamw
    focus_steps: int = 150             # TinyWorld's curriculum: steps that see only --focus_cast characters (0: off)
    focus_cast: int = 12               # how many characters (the first of the cast) the curriculum starts on
    eval_every: int = 250              # steps between validation losses
    eval_batches: int = 8              # batches per validation loss
    log_every: int = 100
    eval_facts: bool = True            # measure fact completion on the TinyWorld beside --data, at the end
    facts_every: int = 50              # and every this many steps on a fixed half of the facts (0: at the end only)

    def model_config(self, vocab_size):
        """The shape of a fresh model: these flags and the tokenizer's vocabulary."""
        from model import GPTConfig  # here: the other stages' settings need no torch
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=self.dropout, rope=self.rope)

    def check(self):
        require_positive(self, "batch_size", "grad_accum", "max_steps", "block_size", "eval_every", "eval_batches",
                         "log_every", "n_layer", "n_head", "n_embd", "lr")
        require_choice(self, "optimizer", ("muon", "adamw"))
        require_choice(self, "schedule", ("wsd", "cosine"))
        if not 0 < self.cooldown <= 1:
            raise UserError(f"--cooldown is a fraction of the steps, above 0 and at most 1, got {self.cooldown}")
        for name in ("facts_every", "focus_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} is a number of steps, or 0 for none, got {getattr(self, name)}")
        if self.focus_steps:
            require_positive(self, "focus_cast")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout is a probability below 1, got {self.dropout}")
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd={self.n_embd} must be a multiple of --n_head={self.n_head}")


# ----------------------------------------------------------------------------- instruction fine-tuning

@dataclass
class LoRAFlags:
    """The flags of every stage after pre-training: LoRA instead of full fine-tuning (gpt_lora.LoRALinear)."""
    lora_rank: int = 0                 # 0: full fine-tuning; r: train only a rank-r update beside each chosen weight (LoRA)
    lora_alpha: float = 16.0           # LoRA's update is scaled by lora_alpha / lora_rank
    lora_targets: str = "attn,mlp"     # the blocks' weights that get adapters: attn, mlp, or both


# A LoRA run's settings, each group taken where none of it is given (cli.settle_lora): measured at rank 8 on seed 0
# (studies/forgetting.py): 3x full SFT's learning rate, 10x full DPO's and GRPO's; none for PPO, which keeps its own.
LORA_SETTINGS = {"sft": [{"lr": 6e-3}, {"max_steps": 800}], "dpo": [{"lr": 1.5e-3}], "grpo": [{"lr": 1e-3, "min_lr": 1e-3}]}


def check_lora(cfg):
    if cfg.lora_rank < 0:
        raise UserError(f"--lora_rank must be 0 (full fine-tuning) or positive, got {cfg.lora_rank}")
    if cfg.lora_rank:
        require_positive(cfg, "lora_alpha")
        if not cfg.lora_targets or not set(cfg.lora_targets.split(",")) <= {"attn", "mlp"}:
            raise UserError(f"--lora_targets must be attn, mlp or attn,mlp, got {cfg.lora_targets!r}")


@dataclass
class ReplayFlags:
    """Pre-training text replayed beside a stage's own loss, against forgetting (SFT's default; off elsewhere)."""
    replay_data: str = ""              # pre-training text whose next-token loss joins every step's (empty: none)
    replay_batch: int = 8              # windows of replayed text per micro-step, over all processes
    replay_coef: float = 1.0           # weight of the replayed text's next-token loss beside the stage's loss


def check_replay(cfg):
    if cfg.replay_data:
        require_positive(cfg, "replay_batch")
        if not 0 <= cfg.replay_coef < math.inf:
            raise UserError(f"--replay_coef must be 0 or a positive number, got {cfg.replay_coef}")


@dataclass
class SFT(ReplayFlags, LoRAFlags, Common):
    data: str = "data/tinyworld/sft_train.jsonl"   # training conversations: {"messages": [{"role", "content"}, ...]}
    val_data: str = ""                 # held-out conversations, same format, for a validation loss (empty: none)
    held_out: float = 0.0              # share of --data held out (its last conversations) for the validation loss instead (your own --data: 0.05)
    qa_data: str = "data/tinyworld/sft_test.jsonl"  # held-out questions with "answer" and "split" (empty: skip)
    init: str = "out/pretrain/ckpt.pt"  # a pretrain checkpoint, or an sft one to fine-tune further
    out: str = "out/sft"
    batch_size: int = 16               # conversations per micro-step, over all processes
    grad_accum: int = 1                # micro-steps per optimizer step
    max_steps: int = 400
    lr: float = 2e-3
    min_lr: float = 2e-5
    warmup_steps: int = 20
    replay_data: str = "data/tinyworld/corpus_train.txt"  # pre-training text replayed in every step (empty: none)
    eval_every: int = 100              # steps between validation losses and checkpoints
    log_every: int = 50
    max_new_tokens: int = QA_TOKENS    # reply budget of the QA evaluation (the report's: the same figure)

    def check(self):
        require_positive(self, "batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "max_new_tokens", "lr")
        check_lora(self)
        check_replay(self)


# ----------------------------------------------------------------------------- the reward model

@dataclass
class RM(LoRAFlags, Common):
    data: str = "data/tinyworld/prefs_train.jsonl"  # preference pairs: {"prompt", "chosen", "rejected"}
    test_data: str = "data/tinyworld/prefs_test.jsonl"  # held-out pairs for the accuracy (empty: none)
    held_out: float = 0.0              # share of --data held out (its last pairs) for the accuracy instead (your own --data: 0.05)
    init: str = "out/sft/ckpt.pt"      # the SFT checkpoint whose trunk the reward model starts from
    out: str = "out/rm"
    batch_size: int = 32               # pairs per step, over all processes
    max_steps: int = 160               # optimizer steps (160 x 32: TinyWorld's 3,000 pairs, about 1.7 times)
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 10
    margin: float = 0.0                # required gap between chosen and rejected scores
    center_coef: float = 0.01          # weight of mean((r_chosen + r_rejected)^2): keeps scores near 0
    lm_coef: float = 1.0               # weight of the language-modelling loss on the chosen replies (0: off)
    head_only: bool = False            # score with the head on the last token alone, no surprise term (the usual, weaker reward model)
    first_slack: float = 2.0           # nats of surprise not charged at a reply's first token, which picks its manner (model.RewardModel)
    eval_every: int = 60               # steps between held-out accuracies and checkpoints
    log_every: int = 10
    zero_prompts: int = 256            # SFT replies sampled to set the score's zero (0: no shift)
    best_of: int = 16                  # best of n for n = 1, 2, 4, ... up to this, on held-out questions (0: skip)
    best_of_prompts: int = 64          # the held-out questions best of n is measured on
    world: str = "data/tinyworld"      # the TinyWorld whose gold rater ranks fresh pairs of SFT replies (empty: skip)
    max_new_tokens: int = 64           # length limit of the sampled replies

    def check(self):
        check_lora(self)
        require_positive(self, "batch_size", "max_steps", "eval_every", "log_every", "max_new_tokens", "lr")
        if not 0 <= self.lm_coef < math.inf:
            raise UserError(f"--lm_coef must be 0 (off) or a positive number, got {self.lm_coef}")
        if not 0 <= self.first_slack < math.inf:
            raise UserError(f"--first_slack must be 0 (none) or a positive number of nats, got {self.first_slack}")
        if self.best_of > 0:
            require_positive(self, "best_of_prompts")


# ----------------------------------------------------------------------------- DPO

DPO_LOSSES = ("sigmoid", "ipo", "robust")


@dataclass
class DPO(ReplayFlags, LoRAFlags, Common):
    data: str = "data/tinyworld/prefs_train.jsonl"  # training pairs: {"prompt", "chosen", "rejected"} per line
    test_data: str = "data/tinyworld/prefs_test.jsonl"  # held-out pairs, same format (empty: skip the evaluation)
    held_out: float = 0.0              # share of --data held out (its last pairs) for the evaluation instead (your own --data: 0.05)
    qa_data: str = "data/tinyworld/sft_test.jsonl"  # held-out questions with "answer" and "split" (empty: skip)
    world: str = "data/tinyworld"      # the TinyWorld whose gold rater judges the win rate (empty: no win rate)
    init: str = "out/sft/ckpt.pt"      # the sft checkpoint: the policy's start and the frozen reference
    out: str = "out/dpo"
    loss_type: str = "sigmoid"         # sigmoid (DPO), ipo, or robust (unbiased under label noise): see dpo_loss
    beta: float = 0.3                  # strength of the pull to the reference: the implicit reward's scale
    label_smoothing: float = 0.0       # assumed rate of flipped labels, for sigmoid and robust (below 0.5)
    batch_size: int = 16               # pairs per micro-step, over all processes
    grad_accum: int = 1                # micro-steps per optimizer step
    max_steps: int = 60
    lr: float = 1.5e-4
    min_lr: float = 2e-5
    warmup_steps: int = 10
    eval_every: int = 30
    log_every: int = 10
    max_new_tokens: int = 128          # reply length limit when generating for the win rate and KL (QA: QA_TOKENS)

    def check(self):
        check_lora(self)
        check_replay(self)
        require_positive(self, "batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "max_new_tokens",
                         "lr", "beta")
        if self.loss_type not in DPO_LOSSES:
            raise UserError(f"--loss_type={self.loss_type} is not one of {', '.join(DPO_LOSSES)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing is a probability below 0.5, got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise UserError("--loss_type=ipo takes no --label_smoothing: use sigmoid or robust for noisy labels")
        if self.world and not (self.test_data or self.held_out):
            raise UserError("the win rate (--world) is measured on the prompts of --test_data: give one, or --world=")


# ----------------------------------------------------------------------------- PPO

@dataclass
class PPO(LoRAFlags, Common):
    data: str = "data/tinyworld/prefs_train.jsonl"  # prompts to train on: JSONL records with "prompt" or "messages"
    test_data: str = "data/tinyworld/prefs_test.jsonl"  # held-out prompts for the final head-to-head (empty: none)
    qa_data: str = "data/tinyworld/sft_test.jsonl"  # held-out questions for answer accuracy (empty: skip)
    init: str = "out/sft/ckpt.pt"      # the SFT checkpoint: the policy's start and the frozen reference
    reward_model: str = "out/rm/ckpt.pt"  # the reward model (or several, comma-separated): scores replies; the first is the critic's start
    ensemble: str = "min"              # several reward models' scores combined by: min, mean_std or mean (train_ppo.conservative_score)
    ensemble_coef: float = 1.0         # mean_std's multiple of the models' spread
    out: str = "out/ppo"               # where ckpt.pt, log.jsonl, metrics.json and the plot go
    batch_size: int = 32               # prompts per rollout, over all processes
    minibatch_size: int = 16           # rollouts per gradient step, per process
    ppo_epochs: int = 4                # passes over each batch of rollouts
    max_steps: int = 70                # rollout-and-update steps
    lr: float = 1e-4                   # the policy's peak learning rate
    critic_lr: float = 1e-3            # the critic's learning rate
    min_lr: float = 3e-5               # the policy's learning rate at the end of the cosine
    warmup_steps: int = 5
    kl_coef: float = 0.05              # beta: weight of the per-token KL penalty to the reference
    kl_estimator: str = "k1"           # k1 (log pi/pi_ref, unbiased) or k3 ((r-1) - log r, never negative)
    gamma: float = 1.0                 # discount: 1, the reward arrives once at the end
    lam: float = 0.95                  # GAE's lambda: bias (0) against variance (1) of the advantages
    clip: float = 0.2                  # PPO's ratio clip epsilon
    value_clip: float = 0.2            # how far a value may move from its rollout value per update
    temperature: float = 1.0           # sampling temperature (logits are divided by it in training too)
    max_new_tokens: int = 48           # reply length limit
    missing_end_penalty: float = -1.0  # the score of a reply that never emits <|end|>
    eval_every: int = 25
    log_every: int = 5
    world: str = "data/tinyworld"      # the TinyWorld whose gold rater scores rollouts and the win rate (empty: none)

    def check(self):
        check_lora(self)
        require_positive(self, "batch_size", "minibatch_size", "ppo_epochs", "max_steps", "eval_every", "log_every",
                         "max_new_tokens", "lr", "critic_lr", "temperature")
        require_choice(self, "kl_estimator", ("k1", "k3"))
        require_choice(self, "ensemble", ("min", "mean_std", "mean"))
        if not 0 <= self.ensemble_coef < math.inf:
            raise UserError(f"--ensemble_coef must be 0 or a positive number, got {self.ensemble_coef}")


# ----------------------------------------------------------------------------- GRPO

@dataclass
class GRPO(ReplayFlags, LoRAFlags, Common):
    data: str = "data/tinyworld/math_train.jsonl"   # training problems: {"question", "answer" ending in "#### n"}
    test_data: str = "data/tinyworld/math_test.jsonl"  # held-out problems, same format, for pass@1 and pass@k
    held_out: float = 0.0              # share of --data held out (its last problems) for them instead (your own --data: 0.05)
    init: str = ""                     # start from this checkpoint (default: out/ppo, else out/dpo, else out/sft)
    out: str = "out/grpo"
    prompts_per_step: int = 8          # problems per step, over all processes
    group_size: int = 8                # answers sampled per problem (G)
    max_new_tokens: int = 72           # answer length limit, in training and evaluation (TinyWorld's: under 64)
    temperature: float = 0.7           # sampling temperature of the rollouts (the policy trained: logits / T)
    format_reward: float = 0.0         # extra reward for an answer that ends its turn with "#### <number>"
    step_reward: float = 0.0           # extra reward per share of the reference's steps stated right (TinyWorld)
    scale: str = "group"               # advantages divided by the group's std (group), or not (none: Dr. GRPO)
    skip_all_equal: bool = True        # leave groups with all-equal rewards out of the update (DAPO)
    loss_type: str = "grpo"            # grpo (mean per answer), dr_grpo (sum / G*max_new_tokens), dapo (token mean)
    eps_low: float = 0.2               # clip the ratio below at 1 - eps_low
    eps_high: float = 0.2              # clip the ratio above at 1 + eps_high (DAPO: 0.28)
    beta: float = 0.05                 # weight of the k3 KL penalty to the starting model (0: no reference loaded)
    passes: int = 1                    # optimizer steps on each batch of rollouts (the first is on-policy)
    micro_batch: int = 64              # answers per forward and backward
    max_steps: int = 80                # steps, each a batch of rollouts
    lr: float = 1e-4
    min_lr: float = 1e-4               # learning rate at the end of the cosine (the same: a constant rate)
    warmup_steps: int = 5
    pass_k: int = 8                    # samples per held-out problem for pass@k
    test_limit: int = 0                # held-out problems evaluated (0: all)
    world: str = "data/tinyworld"      # the TinyWorld whose facts the step checker knows (empty: none, as for GSM8K)
    eval_every: int = 20
    log_every: int = 10

    def check(self):
        check_lora(self)
        check_replay(self)
        require_positive(self, "prompts_per_step", "max_new_tokens", "max_steps", "micro_batch", "passes",
                         "pass_k", "eval_every", "log_every", "lr", "temperature")
        require_choice(self, "loss_type", ("grpo", "dr_grpo", "dapo"))
        require_choice(self, "scale", ("group", "none"))
        if self.group_size < 2:
            raise UserError(f"--group_size must be 2 or more (an answer is judged against its group), "
                            f"got {self.group_size}")


# ----------------------------------------------------------------------------- presets

PRESETS = {
    "pretrain": {
        # GPT-2-small-sized model on TinyStories (python -m data.prepare_tinystories), one GPU, about an hour
        "gpu": dict(data="data/real/tinystories_train.txt", val_data="data/real/tinystories_val.txt",
                    n_layer=12, n_head=12, n_embd=768, block_size=512, batch_size=64, grad_accum=2,
                    max_steps=5000, lr=6e-4, min_lr=6e-5, warmup_steps=200, eval_every=500, eval_batches=20,
                    log_every=50, compile=True, eval_facts=False, focus_steps=0),
        # TinyWorld on one CUDA GPU, the default there (make demo, make gpu): a 6x384 model (head dim 64, as the
        # kernels like), 6x the CPU default's tokens, with its curriculum, Muon and schedule; sized from the FLOPs
        # a GPU gives in about a minute, not yet measured on one. No dropout: the RL stages inherit the model, and
        # dropout would make their ratios noisy.
        "tinyworld_gpu": dict(n_layer=6, n_head=6, n_embd=384, batch_size=32, max_steps=1500, lr=1e-3, min_lr=1e-4,
                              warmup_steps=100, eval_every=500, log_every=100),
        "cpu": {},  # the CPU sizes above, on a GPU too
        "smoke": dict(n_layer=1, n_head=2, n_embd=32, batch_size=4, max_steps=6, eval_every=6, eval_batches=1,
                      warmup_steps=2, log_every=2, facts_every=3, focus_steps=2, focus_cast=2),
    },
    "sft": {
        # Dolly 15k (python -m data.prepare_chat) on a 12x768 model pre-trained with train_pretrain.py --preset=gpu
        "gpu": dict(data="data/real/chat_train.jsonl", val_data="data/real/chat_val.jsonl", qa_data="",
                    replay_data="", batch_size=32, grad_accum=2, max_steps=2000, lr=5e-5, min_lr=5e-6,
                    warmup_steps=100, eval_every=250, log_every=25, compile=True),
        "smoke": dict(batch_size=4, max_steps=4, warmup_steps=1, eval_every=4, log_every=2, replay_batch=2,
                      max_new_tokens=8),
    },
    "rm": {
        # HH-RLHF helpful-base (python -m data.prepare_hh_rlhf), from a GPU SFT run of the 12x768 model
        "gpu": dict(data="data/real/hh_train.jsonl", test_data="data/real/hh_test.jsonl", batch_size=64,
                    max_steps=1500, lr=1e-5, min_lr=1e-6, warmup_steps=50, eval_every=250, log_every=25,
                    world="", compile=True),
        "smoke": dict(batch_size=4, max_steps=2, warmup_steps=1, eval_every=2, log_every=1, zero_prompts=4,
                      best_of=2, best_of_prompts=2, max_new_tokens=8),
    },
    "dpo": {
        # HH-RLHF (python -m data.prepare_hh_rlhf) on the 12x768 model from train_sft.py --preset=gpu; no gold rater
        "gpu": dict(data="data/real/hh_train.jsonl", test_data="data/real/hh_test.jsonl", qa_data="", world="",
                    batch_size=32, grad_accum=2, max_steps=1000, lr=1e-6, min_lr=1e-7, warmup_steps=100,
                    eval_every=250, log_every=25, max_new_tokens=128, compile=True),
        "smoke": dict(batch_size=4, max_steps=2, warmup_steps=1, eval_every=2, log_every=1, max_new_tokens=8),
    },
    "ppo": {
        # HH-RLHF prompts (python -m data.prepare_hh_rlhf), from GPU runs of train_sft.py and train_rm.py
        "gpu": dict(data="data/real/hh_train.jsonl", test_data="", qa_data="", batch_size=64, minibatch_size=16,
                    max_steps=300, lr=1e-5, critic_lr=1e-5, min_lr=1e-6, warmup_steps=10, max_new_tokens=128,
                    eval_every=50, log_every=5, world=""),
        "smoke": dict(batch_size=4, minibatch_size=2, ppo_epochs=1, max_steps=2, warmup_steps=1, max_new_tokens=8,
                      eval_every=2, log_every=1),
    },
    "grpo": {
        # GSM8K (python -m data.prepare_gsm8k) on a model fine-tuned with train_sft.py --preset=gpu; TinyWorld's
        # temperature 0.7 was chosen for the small model, 1.0 here is not measured
        "gpu": dict(data="data/real/gsm8k_train.jsonl", test_data="data/real/gsm8k_test.jsonl", prompts_per_step=32,
                    group_size=8, max_new_tokens=256, format_reward=0.1, eps_high=0.28, lr=1e-6, min_lr=1e-6,
                    max_steps=500, micro_batch=32, test_limit=500, world="", eval_every=50, log_every=5,
                    compile=True, temperature=1.0),
        "smoke": dict(prompts_per_step=2, group_size=2, max_new_tokens=8, pass_k=2, test_limit=2, max_steps=2,
                      warmup_steps=1, eval_every=2, log_every=1),
    },
}
