"""Test set-up: with no GPU, Triton kernels run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports `gpt_kernels`. Each process of the suite (pytest's workers, one per core, and the scripts
they run) computes on one thread: the tiny models gain nothing from more, and idle threads waiting for
work cost a quarter of the suite's CPU time. Hypothesis runs without its time limits (below).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in every script run

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fcntl
import json
import re
import subprocess
import threading

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent

# Hypothesis's time limits off for the whole suite: an example's time (its deadline) and the time spent
# drawing examples (too_slow) measure the machine's load, not the code; the suite runs on every core of a
# shared machine. Speed is what bench/ measures.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


def run_script(*args, env=None, timeout=300, input=None):
    """Run one of the project's scripts as a user would: a subprocess from the repository root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)  # scripts run as they would for a user
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout, input=input)


# Runs each argv of a JSON list as `python argv[0] argv[1:]` (or `python -m argv[1] argv[2:]`) would, one after another in this one
# process; writes [exit code, stdout, stderr] for each. Usage: python -c IN_ONE_PROCESS argvs.json results.json
IN_ONE_PROCESS = r"""
import contextlib, io, json, runpy, sys, traceback
runs, results_file = json.load(open(sys.argv[1])), sys.argv[2]
results = []
for argv in runs:
    out, err = io.StringIO(), io.StringIO()
    sys.argv = argv[1:] if argv[0] == "-m" else argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if argv[0] == "-m":  # python -m package.module, as the studies and the explorer are run
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter does: an int is the code, a message goes to stderr
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
with open(results_file, "w") as f:
    json.dump(results, f)
"""


def run_scripts(argvs, workdir, env=None, timeout=300):
    """Each argv run as `python argv[0] argv[1:]` would, one after another in a single process, so that a
    list of a user's mistakes pays for importing torch once: a CompletedProcess for each."""
    (workdir / "argvs.json").write_text(json.dumps([[str(a) for a in argv] for argv in argvs]))
    r = run_script("-c", IN_ONE_PROCESS, str(workdir / "argvs.json"), str(workdir / "results.json"), env=env,
                   timeout=timeout)
    assert r.returncode == 0, r.stderr
    results = json.loads((workdir / "results.json").read_text())
    return [subprocess.CompletedProcess(argv, *result) for argv, result in zip(argvs, results)]


def made_once(tmp_path_factory, name, make):
    """The directory of a session fixture, made by make(directory) once for the whole run: when pytest-xdist
    runs the tests in several worker processes, the first to ask makes it (under a lock) and the others
    reuse it. Tests read these directories; none writes into them."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    path = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / ".made").is_file():
            path.mkdir(parents=True, exist_ok=True)
            make(path)
            (path / ".made").touch()
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small TinyWorld and a small tokenizer trained on it, made once per test session."""
    root = made_once(tmp_path_factory, "tinyworld", make_tiny_world)
    return {"data": root / "data", "tokenizer": root / "tokenizer"}


def make_tiny_world(root):
    data, tok = root / "data", root / "tokenizer"
    r = run_script("-m", "data.tinyworld", f"--out={data}", "--preset=smoke")  # 8 characters, a few of each file
    assert r.returncode == 0, r.stderr
    r = run_script("-m", "data.tokenizer", f"--input={data / 'corpus_train.txt'}", "--preset=smoke", f"--out={tok}")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_world, tmp_path_factory):
    """A tiny pre-trained checkpoint for the later stages and sample.py (a few steps: the point is the plumbing)."""
    return made_once(tmp_path_factory, "pretrain", lambda out: make_tiny_pretrained(tiny_world, out)) / "ckpt.pt"


def make_tiny_pretrained(tiny_world, out):
    d = tiny_world["data"]
    r = run_script("train_pretrain.py", f"--data={d / 'corpus_train.txt'}", f"--val_data={d / 'corpus_val.txt'}",
                   f"--tokenizer={tiny_world['tokenizer']}", f"--out={out}", "--n_layer=1", "--n_head=2",
                   "--n_embd=32", "--block_size=128", "--batch_size=4", "--max_steps=6", "--eval_every=6",
                   "--eval_batches=1", "--warmup_steps=2", "--eval_facts=false")
    assert r.returncode == 0, r.stderr


def error_line(r):
    """The one line a user's mistake gets: exit code 2, no traceback, "error: ..." on stderr."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


# Kernel tests run on one of these: the Triton interpreter on CPU tensors without a GPU, compiled with one.
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                 reason="the Triton interpreter runs only without a GPU")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.fixture(scope="session")
def tiny_sft(tiny_world, tiny_pretrained, tmp_path_factory):
    """A tiny SFT checkpoint, the starting point of the reward model, PPO, DPO and GRPO tests."""
    return made_once(tmp_path_factory, "sft", lambda out: make_tiny_sft(tiny_world, tiny_pretrained, out)) / "ckpt.pt"


def make_tiny_sft(tiny_world, tiny_pretrained, out):
    d = tiny_world["data"]
    r = run_script("train_sft.py", f"--data={d / 'sft_train.jsonl'}", f"--init={tiny_pretrained}", f"--out={out}",
                   "--qa_data=", "--replay_data=", "--batch_size=4", "--max_steps=4", "--warmup_steps=1",
                   "--eval_every=4")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def tiny_rm(tiny_world, tiny_sft, tmp_path_factory):
    """A tiny reward model, for the PPO tests."""
    return made_once(tmp_path_factory, "rm", lambda out: make_tiny_rm(tiny_world, tiny_sft, out)) / "ckpt.pt"


def make_tiny_rm(tiny_world, tiny_sft, out):
    d = tiny_world["data"]
    r = run_script("train_rm.py", f"--data={d / 'prefs_train.jsonl'}", "--test_data=", f"--init={tiny_sft}",
                   f"--out={out}", "--world=", "--batch_size=4", "--max_steps=2", "--warmup_steps=1", "--zero_prompts=4",
                   "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def tiny_solver(tiny_world, tiny_sft, tmp_path_factory):
    """GRPO's start in the fault table: tiny_sft fine-tuned to answer TinyWorld's math problems "#### 1" or
    "#### 2", and beside it problems.jsonl, those problems each with the answer 1. (tiny_sft itself never
    writes "####", so the verifier would reward nothing, no group would differ and no step would update:
    nothing to resume exactly, no NaN to catch.) Here about one answer in five is right at first, and the
    tiny run learns to answer 1: nearly one in two by its end."""
    return made_once(tmp_path_factory, "solver", lambda out: make_tiny_solver(tiny_world, tiny_sft, out)) / "ckpt.pt"


def make_tiny_solver(tiny_world, tiny_sft, out):
    import json
    questions = [json.loads(line)["question"] for line in (tiny_world["data"] / "math_train.jsonl").read_text().splitlines()]
    answers = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"#### {n}"}]}
               for q in questions for n in (1, 2)]
    (out / "problems.jsonl").write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in questions))
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    r = run_script("train_sft.py", f"--data={out / 'answers.jsonl'}", f"--init={tiny_sft}", f"--out={out}",
                   "--qa_data=", "--replay_data=", "--batch_size=8", "--max_steps=60", "--lr=1e-2", "--warmup_steps=2",
                   "--eval_every=60", "--device=cpu")
    assert r.returncode == 0, r.stderr


def pytest_collection_modifyitems(items):
    """The longest files first (the fault table, the dry GPU journey, every kernel compiled, make seeds, the
    hacking runs): under pytest-xdist a long file handed out last is the whole run's tail, with the other
    core idle."""
    first = ("test_faults.py", "test_gpu_bench.py", "test_kernels_compile.py", "test_seeds.py", "test_hacking.py")
    items.sort(key=lambda item: first.index(item.path.name) if item.path.name in first else len(first))


@pytest.fixture(scope="module")
def served(tiny_world, tiny_pretrained, tiny_sft, tiny_rm, tmp_path_factory):
    """An out/ folder as `make demo` leaves it (the later stages are the SFT checkpoint under their names:
    what is served is what is tested, not what was trained), and a live explorer/serve.py on it."""
    out = stage_folders(tmp_path_factory.mktemp("served"), {"pretrain": tiny_pretrained, "sft": tiny_sft, "ppo": tiny_sft,
                                                            "dpo": tiny_sft, "grpo": tiny_sft, "rm": tiny_rm})
    proc, base = start_server(f"--out={out}", f"--data={tiny_world['data']}")
    yield {"base": base, "out": out, "data": tiny_world["data"], "proc": proc}
    assert proc.poll() is None, "the server died during the tests"
    proc.terminate()
    proc.wait(timeout=30)


def stage_folders(out, ckpts):
    """out/<stage>/ckpt.pt, each a link to the checkpoint given for that stage."""
    for stage, ckpt in ckpts.items():
        (out / stage).mkdir()
        (out / stage / "ckpt.pt").symlink_to(ckpt)
    return out


def start_server(*args):
    """explorer/serve.py on a free loopback port, as a user starts it; returns (process, base URL) once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "explorer.serve", "--port=0", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"open (http://[\d.]+:\d+)/", line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, found.group(1)
    raise AssertionError("explorer/serve.py did not start:\n" + "".join(lines))
