"""sample.py: complete, chat and read stdin with a checkpoint; the random model; bad input."""
import pytest

from conftest import error_line, run_script


def test_completes_text_and_repeats_with_the_seed(tiny_pretrained):
    args = ["sample.py", f"--init={tiny_pretrained}", "--prompt=Once upon", "--num_samples=2", "--max_new_tokens=8"]
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Once upon") == 2 and r.stdout.count("---") == 2
    assert run_script(*args).stdout == r.stdout


def test_chat_and_interactive(tiny_pretrained):
    r = run_script("sample.py", f"--init={tiny_pretrained}", "--chat", "--interactive", "--max_new_tokens=5",
                   "--temperature=0", input="Where does Ann live?\n\nWhat is an LLM?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---") == 2  # one reply per non-empty line


def test_scratch_is_the_random_model(tiny_world):
    r = run_script("sample.py", "--init=scratch", f"--tokenizer={tiny_world['tokenizer']}", "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")


@pytest.mark.parametrize("flag, message", [
    ("--prompt=" + "word " * 200, "the prompt has"),
    ("--init=/no/such/ckpt.pt", "no checkpoint at /no/such/ckpt.pt"),
    ("--num_samples=0", "must be positive"),
])
def test_bad_input_is_one_line(tiny_pretrained, flag, message):
    r = run_script("sample.py", f"--init={tiny_pretrained}", flag)
    assert message in error_line(r)
