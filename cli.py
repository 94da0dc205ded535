"""The command line and the user's mistakes: every script's flags come from its config dataclass, and a
mistake the user can fix is one line on stderr and exit code 2, never a traceback."""
import dataclasses
import inspect
import math
import os
import re
import sys
import traceback
from pathlib import Path

# ----------------------------------------------------------------------------- user errors


class UserError(Exception):
    """A mistake the user can fix: reported as one line, exit code 2, no traceback."""


def run_main(main, config_cls, presets=None):
    """main(config) with the config from the command line; a UserError becomes one line on stderr
    and exit code 2. --help shows the docstring of main's module, then the flags."""
    try:
        main(parse_config(config_cls, presets=presets, doc=sys.modules[main.__module__].__doc__))
        code = 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except BrokenPipeError:  # the output piped into a reader that stopped early (--help | head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is silent
        code = 0
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first: see StopOnSignal)
        print("\ninterrupted: files already written are left as they were", file=sys.stderr, flush=True)
        code = 130
    except SystemExit as e:  # --help, or a training loop stopped by a signal
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception:  # a bug: its traceback, as Python would print it, and exit code 1
        traceback.print_exc()
        code = 1
    leave(code)


def leave(code):
    """Exit with code. A process that torchrun started ends without Python's shutdown (os._exit, once
    its output is flushed; the files it wrote are closed by then). Why: a gloo process group that DDP
    has used outlives destroy_process_group, its worker threads too, and a worker can still be
    releasing the last collective's tensors as the interpreter shuts down; that needs the GIL, which
    a shutting-down interpreter refuses by ending the thread, and ending it so aborts the process
    (SIGABRT, "terminate called without an active exception"), its exit status lost. Under load the
    worker is late often enough; tests/test_ddp.py makes it late on purpose."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

# ----------------------------------------------------------------------------- the command line


def field_comments(cls):
    """{field: comment} from the `name: type = default  # comment` lines of a config dataclass and the
    classes it extends (its own comment first)."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        comments.update(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(klass), flags=re.M))
    return comments


def parse_value(name, text, kind):
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{name} expects {kind.__name__}, got {text!r}") from None


def parse_config(cls, argv=None, presets=None, doc=None):
    """A config from `--field=value` arguments. `--preset=NAME` first applies a named set of
    defaults from `presets`; fields given on the command line win over it. Where a script has a
    `tinyworld_gpu` preset and a CUDA GPU is used, that preset is the default (`--preset=cpu`: none). Then
    the config settles the defaults that depend on what was given (its settle(names given), if it has one)."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        print_help(cls, presets, doc)
        sys.exit(0)
    given = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: arguments look like --field=value (see --help)")
        name, eq, text = arg[2:].partition("=")
        if (name != "preset" or not presets) and name not in fields:
            valid = (["preset"] if presets else []) + list(fields)
            raise UserError(f"unknown flag --{name}; valid flags: " + ", ".join(f"--{n}" for n in valid))
        given[name] = text if eq else "true"
    values = {}
    preset = given.pop("preset", None)
    if preset is None and "tinyworld_gpu" in (presets or {}) and on_gpu(given.get("device", "auto")):
        preset = "tinyworld_gpu"
        print("a CUDA GPU: TinyWorld at GPU size (--preset=tinyworld_gpu; --preset=cpu for the CPU sizes)", flush=True)
    if preset is not None:
        if not presets or preset not in presets:
            raise UserError(f"unknown preset {preset!r}; presets: {', '.join(presets or {}) or 'none'}")
        values.update(presets[preset])
    for name, text in given.items():
        values[name] = parse_value(name, text, type(fields[name].default))
    cfg = cls(**values)
    if hasattr(cfg, "settle"):  # the defaults that depend on what was given (configs.Common.settle)
        cfg.settle(set(values))
    return cfg


def on_gpu(device):
    """Whether --device=DEVICE trains on a CUDA GPU (auto: where PyTorch sees one)."""
    if device.startswith("cuda"):
        return True
    import torch  # here: the data scripts, which never train, start without it
    return device == "auto" and torch.cuda.is_available()


def print_help(cls, presets=None, doc=None):
    """The script's docstring (doc; by default, that of the config's module), then each flag with its
    default and comment: the stage's own first, then those every stage shares."""
    print((doc or sys.modules[cls.__module__].__doc__ or "").strip() + "\n\nflags (--field=value):")
    comments = field_comments(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    own = list(vars(cls).get("__annotations__", {}))  # in the order the stage's class declares them
    for f in [fields[name] for name in own] + [f for name, f in fields.items() if name not in own]:
        print(f"  {f'--{f.name}={f.default}':<40} {comments.get(f.name, '')}")
    if presets:
        print(f"  {'--preset=NAME':<40} " + "; ".join(f"{k}: {v}" for k, v in presets.items()))

# ----------------------------------------------------------------------------- checks


def require_positive(cfg, *names):
    """Each --name (a count, a size, a rate) must be a positive, finite number: one error line if not."""
    for name in names:
        value = getattr(cfg, name)
        if not 0 < value < math.inf:  # also false for NaN
            raise UserError(f"--{name} must be a positive number, got {value}")


def require_choice(cfg, name, choices):
    """--name must be one of choices: one error line naming them if not."""
    if getattr(cfg, name) not in choices:
        raise UserError(f"--{name} must be {' or '.join(choices)}, got {getattr(cfg, name)!r}")


def check_writable(out_dir):
    """Fail before training, not after, when the output directory cannot be written."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(out_dir) / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out_dir} ({e.strerror}): choose another --out") from None


def settle_lora(cfg, given, stage, settings):
    """A LoRA run (--lora_rank) takes the settings measured for it (configs.LORA_SETTINGS), each group of them
    where none of its flags was given: few adapters that start at zero learn too little at full fine-tuning's
    learning rate. One line says which it took."""
    if not getattr(cfg, "lora_rank", 0):
        return
    chosen = {k: v for group in settings for k, v in group.items() if not set(group) & set(given)}
    for k, v in chosen.items():
        setattr(cfg, k, v)
    if chosen:
        say_once(f"{stage}: LoRA takes " + " ".join(f"--{k}={v:g}" for k, v in chosen.items())
                 + ", the settings measured for it (full fine-tuning's leave the adapters short); pass "
                 + " or ".join(f"--{k}" for k in chosen) + " to choose")


def say_once(line):
    """A line about the flags, printed by one process: the config is read before DDP starts, so under
    torchrun every rank reads it, and rank 0 alone says what was settled."""
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


# ----------------------------------------------------------------------------- studies that run the stages


def script(study, name, *flags):
    """A stage script run by a study (studies/hacking.py, studies/forgetting.py) as a user would run it, its output shown
    as it goes; a failure stops the study with one line."""
    import subprocess
    print(f"\n=== {study}: {name} {' '.join(flags)} ===", flush=True)
    r = subprocess.run([sys.executable, name, *flags], cwd=Path(__file__).resolve().parent)
    if r.returncode:
        raise UserError(f"{name} failed (exit code {r.returncode}); its output is above")
