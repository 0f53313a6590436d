"""Multi-process training through torchrun on the CPU (gloo): same result as one process.

Two ranks with per-device batch B must match one process with batch 2B (same global batch, same
data order, dropout off): loss after N steps and adapter weights within tolerance. A killed rank
fails the run with a clear message, and ``--resume`` continues from the last checkpoint.
Run: python -m pytest -q tests/test_distributed.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import tiny_asr_overrides

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "whisper-base-hsk-qlora.yaml"


@pytest.fixture(scope="module")
def clips_csv(hsk_csv):
    return hsk_csv(16)


def overrides(tiny, clips_csv, hsk_dir, out, batch, *extra):
    return tiny_asr_overrides(tiny, clips_csv, hsk_dir, out, batch) + [
        # dropout off and 30-s padding (trimming pads each batch to its own longest clip, so 1x4 and 2x2
        # batches would see different encoder inputs); SGD so weight changes are linear in the gradient
        "lora.dropout=0.0", "quant.bits=0", "whisper.trim_audio=false", "train.group_by_length=false",
        "train.optim=sgd", "train.lr=0.05",
        "train.report_to=[none]", "train.warmup_epochs=0", "train.scheduler=constant", *extra,
    ]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), CUDA_VISIBLE_DEVICES="")
    return e


def loratune(*args, gpus=None, timeout=600, **kw):
    cmd = [sys.executable, "-m", "loratune", *args] + ([f"--gpus={gpus}"] if gpus else [])
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)


def adapter(out: Path):
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def worker_rank_pid(marker: str, rank: int):
    """PID of the torchrun worker with LOCAL_RANK=rank whose command line mentions ``marker``.

    (torchrun starts its workers in sessions of their own, so they are found by environment.)"""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in environ and marker.encode() in cmdline:
            return int(proc.name)
    return None


def test_two_gloo_ranks_match_one_process(tiny, clips_csv, hsk_dir, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["train.max_steps=3", "train.eval_strategy=no", "train.logging_steps=1"]
    r1 = loratune("train", str(RECIPE), *overrides(tiny, clips_csv, hsk_dir, single, 4, *common))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = loratune("train", str(RECIPE), *overrides(tiny, clips_csv, hsk_dir, ddp, 2, *common), gpus=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    s1, s2 = summary(single), summary(ddp)
    assert s1["global_step"] == s2["global_step"] == 3
    assert abs(s1["train_loss"] - s2["train_loss"]) <= 0.02 * abs(s1["train_loss"]), (s1["train_loss"], s2["train_loss"])
    # the loss curve, step by step (summary.json train_loss_log; benchmarks/recipe_trainer_e2e.py --loss-curve on GPUs)
    assert [s for s, _ in s1["train_loss_log"]] == [s for s, _ in s2["train_loss_log"]] == [1, 2, 3]
    for (step, l1), (_, l2) in zip(s1["train_loss_log"], s2["train_loss_log"]):
        assert abs(l1 - l2) <= 0.02 * abs(l1), (step, l1, l2)
    a1, a2 = adapter(single), adapter(ddp)
    assert a1.keys() == a2.keys()
    for k in a1:
        diff = (a1[k].float() - a2[k].float()).norm() / max(a1[k].float().norm(), 1e-8)
        assert diff < 0.02, (k, float(diff))
    # only rank 0 wrote outputs: one summary, one adapter, no per-rank copies
    assert sorted(p.name for p in ddp.glob("summary*.json")) == ["summary.json"]


def test_killed_rank_fails_clearly_and_resume_continues(tiny, clips_csv, hsk_dir, tmp_path):
    out = tmp_path / "killed"
    args = overrides(tiny, clips_csv, hsk_dir, out, 2, "train.max_steps=40", "train.eval_strategy=steps",
                     "train.eval_steps=2", "train.save_total_limit=2", "train.load_best_model_at_end=false")
    cmd = [sys.executable, "-m", "loratune", "train", str(RECIPE), *args, "--gpus=2"]
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    victim = None
    while time.time() < deadline and proc.poll() is None:
        if list(out.glob("checkpoint-*/trainer_state.json")):
            victim = worker_rank_pid(str(out), rank=1)  # a worker, not the launcher
            if victim:
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.5)
    if victim is None:
        proc.kill()
        pytest.fail("no worker killed; run output:\n" + proc.communicate()[0][-3000:])
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rerun with --resume" in output
    done = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json"))
    assert done, "the checkpoint vanished"
    r = loratune("train", str(RECIPE), *args, "--resume", gpus=2)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(out)
    assert s["global_step"] == 40 and s["resumed_from_step"] == done[-1]


def test_two_gloo_ranks_match_one_process_for_a_causal_lm(tmp_path):
    from sft_tiny import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "llama")
    data = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": f"翻译：第{i}句", "completion": f"sentence number {i}"} for i in range(24)]
    data.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs) + "\n", encoding="utf-8")
    runs = {}
    for name, batch, gpus in (("single", 4, None), ("ddp", 2, 2)):
        out = tmp_path / name
        r = loratune("train", "task=sft", f"model.name={model_dir}", f"data.jsonl={data}", "quant.bits=0",
                     "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]", "train.report_to=[none]",
                     "train.threads=1", "train.max_steps=3", f"train.batch_size={batch}", "train.optim=sgd",
                     "train.lr=0.5", "train.scheduler=constant", "train.eval_strategy=no", f"train.output_dir={out}",
                     gpus=gpus)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (summary(out), adapter(out))
    (s1, a1), (s2, a2) = runs["single"], runs["ddp"]
    assert s1["global_step"] == s2["global_step"] == 3
    assert abs(s1["train_loss"] - s2["train_loss"]) <= 0.02 * abs(s1["train_loss"]), (s1["train_loss"], s2["train_loss"])
    for k in a1:
        diff = (a1[k].float() - a2[k].float()).norm() / max(a1[k].float().norm(), 1e-8)
        assert diff < 0.02, (k, float(diff))


def test_two_nodes_on_localhost_match_one_process(tiny, clips_csv, hsk_dir, tmp_path):
    """Multi-node launch, simulated: two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1),
    one process each, train the tiny Whisper and match one process with the same global batch."""
    import socket

    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["train.max_steps=3", "train.eval_strategy=no"]
    r1 = loratune("train", str(RECIPE), *overrides(tiny, clips_csv, hsk_dir, single, 4, *common))
    assert r1.returncode == 0, r1.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = overrides(tiny, clips_csv, hsk_dir, multi, 2, *common)
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=loratune-test",
               "-m", "loratune", "train", str(RECIPE), *args]
        agents.append(subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    s1, s2 = summary(single), summary(multi)
    assert s1["global_step"] == s2["global_step"] == 3
    assert abs(s1["train_loss"] - s2["train_loss"]) <= 0.02 * abs(s1["train_loss"]), (s1["train_loss"], s2["train_loss"])
    a1, a2 = adapter(single), adapter(multi)
    for k in a1:
        diff = (a1[k].float() - a2[k].float()).norm() / max(a1[k].float().norm(), 1e-8)
        assert diff < 0.02, (k, float(diff))
