"""sample.py: complete, chat and read stdin with a checkpoint; the random model; bad input."""
import pytest

from conftest import error_line, run_script, run_scripts


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


BAD_INPUT = {"--prompt=" + "word " * 200: "the prompt has", "--init=/no/such/ckpt.pt": "no checkpoint at /no/such/ckpt.pt",
             "--num_samples=0": "must be positive"}


@pytest.fixture(scope="module")
def bad_input(tiny_pretrained, tmp_path_factory):
    """flag -> the result of sample.py given it, every mistake run in one process."""
    argvs = [["sample.py", f"--init={tiny_pretrained}", flag] for flag in BAD_INPUT]
    return dict(zip(BAD_INPUT, run_scripts(argvs, tmp_path_factory.mktemp("bad_input"))))


@pytest.mark.parametrize("flag", BAD_INPUT, ids=["long prompt", "no checkpoint", "no samples"])
def test_bad_input_is_one_line(bad_input, flag):
    assert BAD_INPUT[flag] in error_line(bad_input[flag])
