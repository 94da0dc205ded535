"""Your own data in place of TinyWorld's: every stage's defaults name TinyWorld's files, and some of its
measures only a TinyWorld can give. When --data is your own (given, and no TinyWorld's meta.json beside it),
each flag of TinyWorld's left at its default falls back (`settle`, which cli.parse_config has each config
call): the held-out file becomes the last --held_out of --data, which training then leaves out
(loaders.split_off, loaders.held_out_text), and TinyWorld's own measures go off. A flag given on the
command line or by a preset is kept; one line says what changed and which flags choose otherwise.
"""
from pathlib import Path

from cli import UserError, say_once

HELD_OUT = 0.05  # the share of your own --data held out for evaluation when no file is given for it

# stage: ((the flag of its held-out file, what the file holds), {a flag of TinyWorld's own: the measure it gives})
OWN_DATA = {
    "pretrain": (("val_data", "validation text"), {"eval_facts": "fact completion", "focus_steps": "curriculum"}),
    "sft": (("val_data", "validation conversations"), {"qa_data": "held-out QA on TinyWorld's questions",
                                                       "replay_data": "replay of TinyWorld's corpus"}),
    "rm": (("test_data", "held-out pairs"), {"world": "checks by TinyWorld's gold rater"}),
    "dpo": (("test_data", "held-out pairs"), {"qa_data": "held-out QA on TinyWorld's questions",
                                              "world": "win rate by TinyWorld's gold rater"}),
    # PPO's held-out prompts serve only the gold rater's head-to-head: off with it
    "ppo": (None, {"test_data": "head-to-head on TinyWorld's held-out prompts",
                   "qa_data": "held-out QA on TinyWorld's questions", "world": "TinyWorld gold rater"}),
    "grpo": (("test_data", "held-out problems"), {"world": "step checks against TinyWorld's facts"}),
}


def is_own(cfg, given):
    """Whether --data is the user's own: given, a file, and not in a TinyWorld (a directory holding the
    meta.json that `python -m data.tinyworld` writes). A missing file is left to the stage's own error."""
    data = Path(cfg.data)
    return "data" in given and data.is_file() and not (data.parent / "meta.json").is_file()


def settle(cfg, given, stage):
    """With your own --data, the stage's flags (OWN_DATA) left at their TinyWorld defaults: the held-out
    file's becomes empty and --held_out (unless given) HELD_OUT, so that the evaluation reads the end of
    --data; each of TinyWorld's own goes off ("", false or 0). An --held_out given also stands in for a
    held-out file not given. Then --held_out is checked against the file's flag."""
    held, tinyworld_only = OWN_DATA.get(stage, (None, {}))
    own = is_own(cfg, given)
    done = []
    if held and held[0] not in given and (own or "held_out" in given):
        flag, what = held
        if "held_out" not in given:
            cfg.held_out = HELD_OUT
        setattr(cfg, flag, "")
        done.append(f"{what} from the last {cfg.held_out:.0%} of --data, not trained on (--{flag}=FILE to use a file "
                    "instead, --held_out=SHARE for another share)")
    for flag, what in tinyworld_only.items():
        if own and flag not in given and getattr(cfg, flag):
            setattr(cfg, flag, type(getattr(cfg, flag))())
            done.append(f"no {what} (--{flag})")
    if done:
        why = f"{cfg.data} is your own data, not TinyWorld's, so" if own else f"--held_out={cfg.held_out}:"
        say_once(f"{stage}: {why} " + "; ".join(done))
    if held:
        check_held_out(cfg, held[0], required=stage == "pretrain")


def check_held_out(cfg, flag, required=False):
    """--held_out takes the held-out records from --data, so it excludes a file of them (--flag); a stage
    that must validate (required) needs one or the other."""
    if not 0 <= cfg.held_out < 1:
        raise UserError(f"--held_out is the share of --data held out, at least 0 and below 1, got {cfg.held_out}")
    if cfg.held_out and getattr(cfg, flag):
        raise UserError(f"--held_out={cfg.held_out} holds out part of --data instead of --{flag}: "
                        f"pass --{flag}= with it, or --held_out=0")
    if required and not cfg.held_out and not getattr(cfg, flag):
        raise UserError(f"--{flag}= leaves nothing to validate on: give --{flag}=FILE, or --held_out={HELD_OUT} "
                        f"to hold out the last {HELD_OUT:.0%} of --data")
