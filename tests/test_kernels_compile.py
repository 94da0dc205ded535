"""The Triton kernels compiled for Ampere (sm_80) and Hopper (sm_90) on this machine, with no GPU and no
interpreter (bench/compile_kernels.py): every configuration the dispatch picks, at every head-dim bucket,
vocabulary path and dtype, builds with no spills, within shared memory and on the tensor cores; a
configuration that spills is caught. (Its table: bench/RESULTS.md.)"""
import json

import pytest

from conftest import run_script

pytest.importorskip("triton.backends.nvidia", reason="Triton's CUDA backend is not installed")

CATCH_A_SPILL = r"""
import importlib, json, sys
sys.path.insert(0, "bench")
import torch
ck = importlib.import_module("compile_kernels")
att = importlib.import_module("gpt_kernels.attention")
# Hopper's forward for head dims up to 64 (128 x 64 blocks in 4 warps), given head dim 128 on Ampere
block_m, block_n, warps, stages = att._config(64, torch.bfloat16, torch.device("cuda"), (9, 0))["fwd"]
launch = ck.Launch("attention forward", "bf16", "D=128", dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32"),
                   dict(CAUSAL=True, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=block_m, BLOCK_N=block_n), warps, stages,
                   matmul=True)
row = ck.compile_launch(launch, "sm_80")
print(json.dumps([row["spill_bytes"], ck.problems(row)]))
"""


def test_every_configuration_the_dispatch_picks_compiles_for_ampere_and_hopper(tmp_path):
    r = run_script("bench/compile_kernels.py", f"--json={tmp_path / 'rows.json'}", timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]  # the summary names every problem
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {(row["kernel"], row["target"]) for row in rows} == {
        (k, t) for k in ("attention forward", "attention backward delta", "attention backward dK dV",
                         "attention backward dQ", "cross-entropy forward", "cross-entropy backward")
        for t in ("sm_80", "sm_90")}
    assert {row["dtype"] for row in rows} == {"fp16", "bf16", "fp32"}
    assert {row["shape"] for row in rows if row["kernel"].startswith("attention")} == {"D=16", "D=32", "D=64", "D=128"}
    assert {row["ints"] for row in rows} == {"÷16", "any"}
    assert {row["shape"] for row in rows if row["kernel"].startswith("cross")} == {"V=1000", "V=2000", "V=50257"}
    for row in rows:
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, row
        if row["matmul"]:
            assert row["tensor_core"] == {"sm_80": "mma", "sm_90": "wgmma"}[row["target"]], row
    assert "no spills, shared memory within each target's limit" in r.stdout


def test_a_configuration_that_spills_is_caught():
    r = run_script("-c", CATCH_A_SPILL, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spilled, found = json.loads(r.stdout.strip().splitlines()[-1])
    assert spilled > 0 and any("spill" in p for p in found), (spilled, found)
