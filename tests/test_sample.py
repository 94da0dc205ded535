"""sample.py: complete, chat and read stdin with a checkpoint; the random model; bad input."""
import pytest

from conftest import run_script


@pytest.fixture(scope="module")
def pretrained(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    d = tiny_world["data"]
    r = run_script("train_pretrain.py", f"--data={d / 'corpus_train.txt'}", f"--val_data={d / 'corpus_val.txt'}",
                   f"--tokenizer={tiny_world['tokenizer']}", f"--out={out}", "--n_layer=1", "--n_head=2",
                   "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_steps=4", "--eval_facts=false")
    assert r.returncode == 0, r.stderr
    return out / "ckpt.pt"


def test_completes_text_and_repeats_with_the_seed(pretrained):
    args = ["sample.py", f"--init={pretrained}", "--prompt=Once upon", "--num_samples=2", "--max_new_tokens=8"]
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Once upon") == 2 and r.stdout.count("---") == 2
    assert run_script(*args).stdout == r.stdout


def test_chat_and_interactive(pretrained):
    r = run_script("sample.py", f"--init={pretrained}", "--chat", "--interactive", "--max_new_tokens=5",
                   "--temperature=0", input="Where does Ann live?\n\nWhat is an LLM?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---") == 2  # one reply per non-empty line


def test_scratch_is_the_random_model(tiny_world):
    r = run_script("sample.py", "--init=scratch", f"--tokenizer={tiny_world['tokenizer']}", "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")


@pytest.mark.parametrize("flag, message", [
    ("--prompt=" + "word " * 40, "the prompt has"),
    ("--init=/no/such/ckpt.pt", "no checkpoint at /no/such/ckpt.pt"),
    ("--num_samples=0", "must be positive"),
])
def test_bad_input_is_one_line(pretrained, flag, message):
    r = run_script("sample.py", f"--init={pretrained}", flag)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
