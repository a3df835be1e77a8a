"""The training engine: kill -9 and --resume give the same losses step for step; a checkpoint of other settings is
refused; a NaN stops training naming the step and the term; two processes stay in sync on different data."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import attrs
import pytest
import torch
from accelerate import Accelerator

from genie_core import nn as nn_blocks
from genie_core.cli import main
from genie_core.config import TrainConfig
from genie_core.errors import TrainingDiverged
from genie_core.io.machine import KEEP_FREED_MEMORY
from genie_core.testing import TINY_VIDEO, build
from genie_core.training.engine import Checkpointing, Task, TokenizerTask, adamw, rebuilt, train

from conftest import REPO

SMOKE = str(REPO / "recipes" / "coinrun-smoke.toml")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores: one thread each
LONGER = ["train.dynamics.steps=40", "train.dynamics.checkpoint_every=5", "train.dynamics.log_every=1",
          "train.dynamics.eval_every=10", "run.trackers=none"]


def log_rows(run_dir, stage="dynamics"):
    """Every logged row: training losses and metrics, and the held-out validation scores."""
    return [json.loads(line) for line in (run_dir / "logs" / f"{stage}.jsonl").read_text().splitlines()]


def training_rows(log) -> int:
    return sum('"loss"' in line for line in log.read_text().splitlines()) if log.is_file() else 0


def test_sigkill_then_resume_gives_the_same_losses_step_for_step(tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(["run", SMOKE, *LONGER, "--out", str(reference)]) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "genie_core.cli", "run", SMOKE, *LONGER, "--out", str(killed)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "logs" / "dynamics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if training_rows(log) >= 13:  # past the checkpoints of steps 5 and 10
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "dynamics" / "stage.json").exists()

    capsys.readouterr()
    assert main(["run", SMOKE, *LONGER, "--out", str(killed), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "stage tokenizer: done, skipping" in out
    resumed_at = int(out.split("resuming at step ")[1].split()[0])
    assert resumed_at >= 10
    # bitwise: the same losses, metrics and validation scores, step for step, nothing missing or repeated
    assert log_rows(killed) == log_rows(reference)
    assert sum("val_lam_psnr_db" in row for row in log_rows(reference)) == 4
    assert not (killed / "checkpoints" / "dynamics").exists(), "checkpoints go once the stage is saved"


def test_checkpoint_of_other_settings_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "genie_core.cli", "run", SMOKE, *LONGER, "--out", str(run)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not list(
            (run / "checkpoints" / "dynamics").glob("step-*[0-9]")):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    capsys.readouterr()
    assert main(["run", SMOKE, *LONGER, "train.dynamics.lr=1e-3", "--out", str(run), "--resume"]) == 2
    assert "was written by a run with other settings" in capsys.readouterr().err


def test_nan_stops_training_naming_step_and_term(tmp_path):
    tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO)

    class Poisoned(TokenizerTask):
        calls = 0

        def forward(self, video):
            loss, metrics = super().forward(video)
            Poisoned.calls += 1
            if Poisoned.calls == 4:
                metrics = dict(metrics, mse=torch.tensor(float("nan")))
                loss = loss * float("nan")
            return loss, metrics

    dataset = [torch.rand(TINY_VIDEO.num_frames, 3, 16, 16) for _ in range(8)]
    cfg = TrainConfig(steps=10, batch_size=2, seq_len=6, warmup_steps=1, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"tok: the loss is nan at step 3; non-finite terms: mse; "
                                               r"the last good checkpoint is .*step-000000002"):
        train(Accelerator(cpu=True), Poisoned(tokenizer), dataset, cfg, 0, tmp_path / "log.jsonl", "tok",
              Checkpointing(tmp_path / "ckpt", "x"))


def test_stage_result_is_a_fresh_copy_of_the_gathered_weights(tmp_path):
    """train() hands back the task's whole state (under FSDP, gathered from the shards); what a stage saves is a
    fresh component loaded from it, equal to the trained one, built without touching the global generator."""
    tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO)
    dataset = [torch.rand(TINY_VIDEO.num_frames, 3, 16, 16) for _ in range(4)]
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=6, warmup_steps=1, checkpoint_every=0)
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    summary = train(Accelerator(cpu=True), TokenizerTask(tokenizer), dataset, cfg, 0, tmp_path / "log.jsonl", "tok",
                    Checkpointing(tmp_path / "ckpt", "x"))
    rng = torch.get_rng_state()
    copy = rebuilt(tokenizer, summary["weights"], "tokenizer.")
    assert torch.equal(torch.get_rng_state(), rng)
    assert copy is not tokenizer and type(copy) is type(tokenizer)
    trained = tokenizer.state_dict()
    assert copy.state_dict().keys() == trained.keys()
    assert all(torch.equal(copy.state_dict()[k], trained[k]) for k in trained)
    assert any(not torch.equal(before[k], trained[k]) for k in trained)  # it did train


TWO_RANKS = """
import json, sys
from pathlib import Path
import torch
from accelerate import Accelerator
sys.path.insert(0, {tests!r})
from genie_core.testing import TINY_VIDEO, build
from genie_core.config import TrainConfig
from genie_core.training.engine import Checkpointing, TokenizerTask, train

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)  # the same initial weights on both ranks
tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO)
seen, checksums = [], []

class Recording(TokenizerTask):
    def forward(self, video):
        seen.extend(video[:, 0, 0, 0, 0].mul(1000).round().long().tolist())  # which windows this rank got
        checksums.append(sum(p.double().sum().item() for p in self.parameters()))  # weights before this step
        return super().forward(video)

dataset = [torch.full((TINY_VIDEO.num_frames, 3, 16, 16), i / 1000) for i in range(16)]
cfg = TrainConfig(steps=4, batch_size=2, seq_len=6, warmup_steps=1, checkpoint_every=2, lr=1e-2, ema_decay=0.5)
task = Recording(tokenizer)
train(accelerator, task, dataset, cfg, 0, Path({tmp!r}) / "log.jsonl", "tok",
      Checkpointing(Path({tmp!r}) / "ckpt", "x"))
final = sum(p.double().sum().item() for p in task.parameters())  # the average of the weights
with open({tmp!r} + f"/rank{{accelerator.process_index}}.json", "w") as f:
    json.dump({{"seen": seen, "checksums": checksums, "final": final, "world": accelerator.num_processes}}, f)
"""


def test_two_processes_agree_on_weights_and_read_different_data(tmp_path):
    """Two gloo processes: the same weights before every step and the same average of them at the end, each rank on
    windows of its own."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS.format(tests=str(REPO / "tests"), tmp=str(tmp_path))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a["world"] == b["world"] == 2
    assert a["checksums"] == b["checksums"]  # identical weights before every step
    assert len(set(a["checksums"])) == 4  # ... and they did change from step to step
    assert a["final"] == b["final"]  # the same average of the weights, kept and checkpointed by each process
    assert set(a["seen"]).isdisjoint(b["seen"])  # each rank trained on its own windows


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    assert main(["run", SMOKE, "run.mixed_precision=bf16", "run.cpu=true", "run.trackers=none",
                 "--out", str(tmp_path / "bf16")]) == 0
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert report["tokenizer_psnr_db"]["mean"] > 0


def test_attention_keeps_float32_under_cpu_autocast():
    """Under CPU bf16 autocast, attention is SDPA on the float32 inputs (its bf16 backward pass is the slow one on a
    CPU), handed back in bf16 as autocast would; SDPA left to autocast computes something else. Gradients flow in
    float32. Outside autocast it is plain SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 2, 5, 8, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = nn_blocks.scaled_dot_product_attention(q, k, v, is_causal=True)
        in_bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, exact.to(torch.bfloat16))
    assert not torch.equal(in_bf16, kept)
    kept.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    exact.to(torch.bfloat16).float().square().sum().backward()
    assert all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))
    mask = torch.rand(5, 5) > 0.3
    mask.fill_diagonal_(True)
    assert torch.equal(nn_blocks.scaled_dot_product_attention(q, k, v, mask=mask),
                       torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_written_out_attention_is_sdpa_to_float_rounding():
    """`written_out_attention` (what a compiled training step on a CPU attends with) gives SDPA's values and
    gradients to float32 rounding, plain, causal and under a mask; under bf16 autocast it is SDPA in bf16, its
    products in bf16 and its softmax in float32."""
    torch.manual_seed(0)
    mask = torch.rand(7, 7) > 0.4
    mask.fill_diagonal_(True)
    for options in ({}, {"is_causal": True}, {"mask": mask}):
        q, k, v = (torch.randn(6, 2, 7, 8, requires_grad=True) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=options.get("mask"),
                                                                is_causal=options.get("is_causal", False))
        written = nn_blocks.written_out_attention(q, k, v, **options)
        torch.testing.assert_close(written, sdpa, rtol=1e-5, atol=1e-6)
        upstream = torch.randn_like(sdpa)
        want = torch.autograd.grad(sdpa, (q, k, v), upstream)
        got = torch.autograd.grad(written, (q, k, v), upstream)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_bf16 = nn_blocks.written_out_attention(q, k, v, **options)
        assert in_bf16.dtype == torch.bfloat16
        torch.testing.assert_close(in_bf16.float(), sdpa, rtol=0, atol=0.05)


def test_compiled_training_on_a_cpu_attends_written_out_and_elsewhere_through_sdpa(monkeypatch):
    """Inside torch.compile with gradients (a compiled training step) the CPU attention is written out, so the
    compiler sees the softmax and can fuse it; compiled without gradients (play's compiled steps), or with the
    switch set to "sdpa", it is torch's SDPA, as eagerly."""
    def traced_ops(grad: bool) -> str:
        graphs = []

        def recording_backend(graph, _example_inputs):
            graphs.append(graph)
            return graph.forward

        torch._dynamo.reset()
        q, k, v = (torch.randn(4, 2, 5, 8, requires_grad=grad) for _ in range(3))
        attend = torch.compile(lambda *qkv: nn_blocks.scaled_dot_product_attention(*qkv, is_causal=True),
                               backend=recording_backend)
        with torch.set_grad_enabled(grad):
            attend(q, k, v)
        return "\n".join(graph.code for graph in graphs)

    trained = traced_ops(grad=True)
    assert "softmax" in trained and "scaled_dot_product_attention" not in trained
    assert "scaled_dot_product_attention" in traced_ops(grad=False)
    monkeypatch.setattr(nn_blocks, "COMPILED_CPU_TRAINING_ATTENTION", "sdpa")
    assert "scaled_dot_product_attention" in traced_ops(grad=True)
    torch._dynamo.reset()


def test_every_attention_computes_timms_and_goes_through_the_float32_guard(monkeypatch):
    """`self_attention` is timm's Attention to the bit, with a mask or causal; the spatiotemporal blocks (spatial
    and temporal) and the full-attention blocks all attend through `scaled_dot_product_attention`."""
    from timm.layers import Attention

    torch.manual_seed(0)
    attention = Attention(16, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    x = torch.randn(3, 5, 16)
    mask = torch.rand(5, 5) > 0.3
    mask.fill_diagonal_(True)
    assert torch.equal(nn_blocks.self_attention(attention, x), attention(x))
    assert torch.equal(nn_blocks.self_attention(attention, x, mask=mask), attention(x, attn_mask=mask))
    assert torch.equal(nn_blocks.self_attention(attention, x, is_causal=True), attention(x, is_causal=True))

    calls = []
    guard = nn_blocks.scaled_dot_product_attention
    monkeypatch.setattr(nn_blocks, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or guard(*a, **kw))
    video = torch.randn(2, 3, 4, 16)  # [B, T, N, D]
    nn_blocks.STTransformer(dim=16, depth=2, heads=2)(video)
    assert len(calls) == 4  # spatial and temporal, two blocks
    nn_blocks.FullSTTransformer(dim=16, depth=3, heads=2)(video)
    assert len(calls) == 7


def test_fp16_on_cpu_says_it_trains_in_float32(tmp_path, capsys):
    """Accelerate runs fp16 (autocast + gradient scaler) on GPUs only; on a CPU the run says so instead of
    pretending."""
    assert main(["run", SMOKE, "run.mixed_precision=fp16", "run.cpu=true", "run.trackers=none",
                 "train.tokenizer.steps=2", "train.dynamics.steps=2", "--out", str(tmp_path / "fp16")]) == 0
    assert "run.mixed_precision = 'fp16': needs a GPU; on cpu this run trains in float32" in capsys.readouterr().out


def test_auto_mixed_precision_is_bf16_where_the_device_has_bf16_units(tmp_path, capsys, monkeypatch):
    """run.mixed_precision = "auto": bf16 on a CPU with AVX-512 BF16 or AMX (or a GPU that supports bf16), float32
    elsewhere; the run says which, trains in it, and fingerprints its stages with it (a stage trained in float32 on
    one machine is not taken for one trained in bf16 on another)."""
    from genie_core.io.machine import bf16_units, resolve_mixed_precision
    from genie_core.recipe import load_recipe
    from genie_core.run.stages import stage_fingerprint
    from genie_core.training.pipeline import Pipeline

    def cpu_with(avx512_bf16: bool, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    few = ["run.cpu=true", "run.trackers=none", "train.tokenizer.steps=2", "train.dynamics.steps=2"]
    for units, precision, said in ((True, "bf16", "bf16, this device has bf16 units (AVX-512 BF16)"),
                                   (False, "no", "float32, this device has no bf16 units")):
        cpu_with(units)
        auto = load_recipe(SMOKE, [*few, "run.mixed_precision=auto"])
        explicit = load_recipe(SMOKE, [*few, f"run.mixed_precision={precision}"])
        for stage in ("data", "tokenizer", "dynamics", "report"):
            assert stage_fingerprint(auto, stage) == stage_fingerprint(explicit, stage)
        pipeline = Pipeline(auto, tmp_path / precision)
        pipeline.run()
        assert pipeline.accelerator.mixed_precision == precision
        assert f"run.mixed_precision = 'auto': {said}" in capsys.readouterr().out
    cpu_with(False, amx=True)
    assert bf16_units(cpu=True) == "AMX" and resolve_mixed_precision("fp16", cpu=True) == ("fp16", "as the recipe says")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert bf16_units() is None and bf16_units(cpu=True) == "AMX"  # the GPU decides unless the run is told cpu
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto")[0] == "bf16" and bf16_units() == "CUDA"


def test_lam_alone_then_dynamics_on_the_frozen_lam(tmp_path):
    """train.dynamics.lam_steps > 0: the LAM trains alone, then the dynamics model alone on it, frozen."""
    run = tmp_path / "separate"
    assert main(["run", SMOKE, "train.dynamics.lam_steps=3", "run.trackers=none", "--out", str(run)]) == 0
    lam_log = [row for row in log_rows(run, "lam") if "loss" in row]
    dyn_log = [row for row in log_rows(run, "dynamics") if "loss" in row]
    assert lam_log[-1]["step"] == 2 and all(not k.startswith("dyn_") for k in lam_log[-1])
    assert all(not k.startswith("lam_") for k in dyn_log[-1]) and "dyn_ce" in dyn_log[-1]
    assert not (run / "checkpoints" / "dynamics-lam-done").exists()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 2 make the same optimizer step as one batch of 4 (the same 4 windows, a batch-mean loss)."""

    class Linear(Task):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(4, 1)

        def forward(self, video):
            loss = (self.layer(video.flatten(1)) - 1).pow(2).mean()
            return loss, {}

    dataset = [torch.rand(4, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    weights = []
    for batch, accum in ((4, 1), (2, 2)):
        task = Linear()
        cfg = TrainConfig(steps=3, batch_size=batch, grad_accum=accum, seq_len=2, warmup_steps=0, lr=0.1,
                          min_lr=0.1, grad_clip=0, weight_decay=0, checkpoint_every=0)
        train(Accelerator(cpu=True), task, dataset, cfg, 0, tmp_path / f"{batch}.jsonl", "lin",
              Checkpointing(tmp_path / f"ckpt{batch}", "x"))
        weights.append(task.layer.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


class RecordedLinear(Task):
    """A linear model that records its weights before every training step (and, with `fail_at`, stops at that
    call, as a crash would)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.before: list[torch.Tensor] = []
        self.fail_at = fail_at

    def forward(self, video):
        if len(self.before) == self.fail_at:
            raise KeyboardInterrupt("stopped")
        self.before.append(self.layer.weight.detach().clone())
        return (self.layer(video.flatten(1)) - 1).pow(2).mean(), {}


LINEAR_DATA = [torch.rand(4, generator=torch.Generator().manual_seed(i)) for i in range(16)]


def test_weight_average_is_what_a_stage_validates_and_saves(tmp_path):
    """train.*.ema_decay: the stage validates and ends holding the moving average of its weights, with the decay
    warmed up as min(decay, (1 + n) / (10 + n)); the weights themselves train exactly as without it, and
    validation can score them too (validate_live)."""
    cfg = TrainConfig(steps=12, batch_size=2, seq_len=2, warmup_steps=0, lr=0.1, min_lr=0.1, checkpoint_every=0,
                      eval_every=6)
    plain = RecordedLinear()
    train(Accelerator(cpu=True), plain, LINEAR_DATA, cfg, 0, tmp_path / "plain.jsonl", "lin",
          Checkpointing(tmp_path / "ckpt-plain", "x"))
    averaged = RecordedLinear()
    seen = []

    def validate(step, live=False):
        seen.append((step, live, averaged.layer.weight.detach().clone()))
        return {"w": averaged.layer.weight.sum().item()}

    summary = train(Accelerator(cpu=True), averaged, LINEAR_DATA, attrs.evolve(cfg, ema_decay=0.5),
                    0, tmp_path / "avg.jsonl", "lin", Checkpointing(tmp_path / "ckpt-avg", "x"), validate,
                    validate_live=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.before, averaged.before, strict=True))  # the same training
    trained = [*plain.before[1:], plain.layer.weight.detach()]  # the weights after each step
    average, expected = plain.before[0], {}
    for n, weights in enumerate(trained):
        decay = min(0.5, (1 + n) / (10 + n))
        average = average + (1 - decay) * (weights - average)
        expected[n + 1] = average
    assert [(step, live) for step, live, _ in seen] == [(6, False), (6, True), (12, False), (12, True)]
    for step, live, weights in seen:
        assert torch.allclose(weights, trained[step - 1] if live else expected[step], atol=1e-6), (step, live)
    assert not torch.allclose(expected[12], trained[-1], atol=1e-3)  # the average is not the last weights
    assert torch.allclose(averaged.layer.weight, expected[12], atol=1e-6)
    assert torch.allclose(summary["weights"]["layer.weight"], expected[12], atol=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "avg.jsonl").read_text().splitlines() if '"w"' in line]
    assert [sorted(row) for row in logged] == [["live_w", "step", "w"]] * 2


def test_weight_average_resumes_with_the_rest_of_the_state(tmp_path):
    """A stage stopped after a checkpoint and resumed ends with the average an uninterrupted run ends with."""
    cfg = TrainConfig(steps=9, batch_size=2, seq_len=2, warmup_steps=0, lr=0.1, min_lr=0.01, checkpoint_every=3,
                      ema_decay=0.6)
    whole = RecordedLinear()
    train(Accelerator(cpu=True), whole, LINEAR_DATA, cfg, 0, tmp_path / "whole.jsonl", "lin",
          Checkpointing(tmp_path / "ckpt-whole", "x"))
    with pytest.raises(KeyboardInterrupt):
        train(Accelerator(cpu=True), RecordedLinear(fail_at=7), LINEAR_DATA, cfg, 0, tmp_path / "cut.jsonl", "lin",
              Checkpointing(tmp_path / "ckpt-cut", "x"))
    assert (tmp_path / "ckpt-cut" / "step-000000006" / "weight-average-0.pt").is_file()
    resumed = RecordedLinear()
    train(Accelerator(cpu=True), resumed, LINEAR_DATA, cfg, 0, tmp_path / "cut.jsonl", "lin",
          Checkpointing(tmp_path / "ckpt-cut", "x", resume=True))
    assert torch.equal(resumed.before[0], whole.before[6])  # it went on from step 6
    assert torch.equal(resumed.layer.weight, whole.layer.weight)


def test_weight_average_is_fingerprinted_only_when_set():
    """ema_decay = 0 leaves a stage's settings as they were before the key existed (runs made then stay current);
    a decay makes the dynamics stage, and only it, a new one; 1 and above are refused."""
    from genie_core.errors import RecipeError
    from genie_core.recipe import load_recipe
    from genie_core.run.stages import stage_fingerprint, stage_settings

    plain = load_recipe(SMOKE, [])
    assert "ema_decay" not in json.dumps(stage_settings(plain, "report"))
    averaged = load_recipe(SMOKE, ["train.dynamics.ema_decay=0.999"])
    assert stage_settings(averaged, "dynamics")["train.dynamics"]["ema_decay"] == 0.999
    assert stage_fingerprint(averaged, "tokenizer") == stage_fingerprint(plain, "tokenizer")
    assert stage_fingerprint(averaged, "dynamics") != stage_fingerprint(plain, "dynamics")
    with pytest.raises(RecipeError, match="ema_decay"):
        load_recipe(SMOKE, ["train.dynamics.ema_decay=1"])


def test_the_engine_steps_with_the_fused_adamw_and_it_makes_the_loops_update():
    """The stage's AdamW is torch's fused one where every parameter's device has the kernel (CPU and CUDA float
    parameters); its updates are those of torch's per-parameter loop to float rounding, over steps with weight decay
    and both moments in play. Parameters on a device without the kernel get torch's default, not an error."""
    cfg = TrainConfig(lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1)
    weights = []
    for fused in (None, False):
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 8)
        optimizer = adamw(list(layer.parameters()), cfg, fused=fused)
        assert optimizer.defaults["fused"] is (True if fused is None else None)
        assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["weight_decay"] == 0.1
        for step in range(5):
            layer(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        weights.append(layer.weight.detach())
    assert torch.allclose(weights[0], weights[1], atol=1e-6) and not torch.equal(weights[0], torch.zeros(8, 8))
    on_meta = torch.nn.Linear(2, 2, device="meta")
    assert adamw(list(on_meta.parameters()), cfg).defaults["fused"] is None


def test_evaluation_split_across_processes_gives_the_same_report(tmp_path):
    """The report stage shares its windows among processes (gather_for_metrics) and gets exactly the numbers one
    process gets: batches and their random generators depend only on the windows."""
    few = ["run.trackers=none", "eval.windows=4", "eval.batch_size=1"]
    one = tmp_path / "one"
    assert main(["run", SMOKE, *few, "--out", str(one)]) == 0
    two = tmp_path / "two"
    subprocess.run(["cp", "-r", str(one), str(two)], check=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "genie_core.cli", "run", SMOKE, *few, "run.cpu=true", "--out", str(two), "--redo-from", "report"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (json.loads((run / "report.json").read_text()) for run in (one, two))
    for key in ("tokenizer_psnr_db", "dtpsnr_t4_db", "dynamics_psnr_t4_db"):
        assert a[key] == b[key], key
    assert a["dtpsnr_t4_db"]["n"] == 4


def test_tiny_recipe_on_two_processes(tmp_path):
    """The shipped tiny recipe, shortened, end to end under torchrun with 2 gloo processes on the CPU. FSDP is
    asked for: Accelerate shards only on GPUs, so the run says it uses DDP instead of pretending. Each line the run
    prints appears once, not once per process."""
    tiny = str(REPO / "recipes" / "coinrun-tiny.toml")
    few = ["source.train_levels=2", "source.val_levels=1", "source.steps_per_level=40", "data.min_episode_frames=8",
           "train.tokenizer.steps=3", "train.dynamics.steps=3", "eval.windows=2", "eval.rollout_steps=1",
           "run.cpu=true", "run.trackers=none", "run.distributed=fsdp",
           # compiling each stack in both processes would take minutes of these 3 steps; compiled stacks are tested
           # on their own (test_compile_trains_the_same_run, on the smoke recipe)
           "train.tokenizer.compile=false", "train.dynamics.compile=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "genie_core.cli", "run", tiny, *few, "--out", str(tmp_path / "tiny")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert report["stages"]["dynamics"]["final"]["step"] == 2 and report["num_actions"] == 6
    assert result.stdout.count("Accelerate runs FSDP on GPUs only; these 2 cpu processes use DDP") == 1
    for line in ("genie run: ", "stage data: finished", "stage dynamics: finished", "tokenizer PSNR "):
        assert result.stdout.count(line) == 1, (line, result.stdout)


@pytest.fixture(scope="module")
def plain_smoke_run(tmp_path_factory):
    """The smoke recipe's run with every speed and memory option off: what a run with any of them must match."""
    plain = tmp_path_factory.mktemp("plain") / "run"
    assert main(["run", SMOKE, "run.trackers=none", "--out", str(plain)]) == 0
    return plain


def test_activation_checkpointing_trains_the_same_run(tmp_path, capsys, plain_smoke_run):
    """train.*.activation_checkpointing recomputes the blocks' activations in the backward pass: every logged loss,
    metric and validation score of both stages is the one the run without it logs, and the stages' fingerprints
    are the same, so a run may turn it on or off and resume."""
    plain, checkpointed = plain_smoke_run, tmp_path / "checkpointed"
    capsys.readouterr()
    assert main(["run", SMOKE, "run.trackers=none", "train.tokenizer.activation_checkpointing=true",
                 "train.dynamics.activation_checkpointing=true", "--out", str(checkpointed)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: activation checkpointing in tokenizer.encoder, tokenizer.decoder" in out
    assert ("lam+dynamics: activation checkpointing in dynamics.transformer, action_model.encoder, "
            "action_model.decoder") in out
    for stage in ("tokenizer", "dynamics"):
        assert log_rows(checkpointed, stage) == log_rows(plain, stage)
        assert (json.loads((checkpointed / stage / "stage.json").read_text())["fingerprint"]
                == json.loads((plain / stage / "stage.json").read_text())["fingerprint"])


def test_compile_trains_the_same_run(tmp_path, capsys, plain_smoke_run):
    """train.*.compile runs the trained stacks through torch.compile (here the LAM + dynamics stage's three): every
    logged loss, metric and validation score is the plain run's to float rounding, and the stage's fingerprint is
    the same, so a run may turn it on or off and resume. (The tokenizer stage's stacks are the same class.)"""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    plain, compiled = plain_smoke_run, tmp_path / "compiled"
    capsys.readouterr()
    assert main(["run", SMOKE, "run.trackers=none", "train.dynamics.compile=true", "--out", str(compiled)]) == 0
    out = capsys.readouterr().out
    assert ("lam+dynamics: torch.compile of dynamics.transformer, action_model.encoder, action_model.decoder "
            "(compiling in the first steps)") in out
    assert "torch.compile" not in out.split("lam+dynamics:")[0]  # the tokenizer stage was left as it was
    for stage in ("tokenizer", "dynamics"):
        rows, expected = log_rows(compiled, stage), log_rows(plain, stage)
        assert [row.keys() for row in rows] == [row.keys() for row in expected]
        for row, want in zip(rows, expected):
            assert row == pytest.approx(want, rel=1e-4), stage
        assert (json.loads((compiled / stage / "stage.json").read_text())["fingerprint"]
                == json.loads((plain / stage / "stage.json").read_text())["fingerprint"])


def test_compiled_stacks_compile_for_training_only():
    """compile_block_stacks: a stack compiles once, for its training forward; evaluation and a forward without
    gradients (validation, sampling) run the eager code, exactly as before. The weights' names are unchanged (a
    checkpoint loads either way), and a copy of a compiled stack runs its own weights."""
    import copy

    from genie_core.nn import STTransformer, compile_block_stacks

    graphs = []

    def counting_backend(graph, _example_inputs):  # dynamo's graphs, run as traced: no compiler needed to count
        graphs.append(graph)
        return graph.forward

    torch.manual_seed(0)
    stack = STTransformer(dim=16, depth=1, heads=2)
    plain = copy.deepcopy(stack)
    names = stack.state_dict().keys()
    assert compile_block_stacks(torch.nn.ModuleDict({"stack": stack}), backend=counting_backend) == ["stack"]
    assert stack.state_dict().keys() == names
    x = torch.rand(2, 3, 4, 16)
    stack(x).sum().backward()
    stack(x)
    assert len(graphs) == 1  # compiled once, and run again from the cache
    stack.eval()
    plain.eval()
    assert torch.equal(stack(x), plain(x))
    stack.train()
    plain.train()
    with torch.no_grad():
        assert torch.equal(stack(x), plain(x))
    assert len(graphs) == 1
    twin = copy.deepcopy(stack)
    with torch.no_grad():
        twin.norm.bias.fill_(1.0)
    assert twin.forward.__self__ is twin
    assert not torch.equal(twin(x), stack(x))


def test_compiled_stacks_under_activation_checkpointing_give_the_same_gradients():
    """train.*.compile with train.*.activation_checkpointing: in the compiled stack each block keeps only its input
    and runs again in the backward pass; the gradients are the plain stack's (traced by dynamo and AOT autograd as
    training does, run as traced: backend "aot_eager", no kernels to build)."""
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend

    from genie_core.nn import STTransformer, compile_block_stacks, saved_activation_bytes, use_activation_checkpointing

    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = STTransformer(dim=16, depth=2, heads=2)
    both = copy.deepcopy(plain)
    use_activation_checkpointing(both)
    traced = CompileCounterWithBackend("aot_eager")
    compile_block_stacks(both, backend=traced)
    x = torch.rand(2, 3, 4, 16, requires_grad=True)
    kept = {}
    for name, model in (("plain", plain), ("both", both)):
        loss, kept[name] = saved_activation_bytes(lambda model=model: model(x).square().mean(), model)
        loss.backward()
    assert traced.frame_count == 1  # the stack ran compiled
    assert kept["both"] < kept["plain"] / 2
    for (name, weight), twin in zip(plain.named_parameters(), both.parameters()):
        assert torch.allclose(weight.grad, twin.grad, atol=1e-6), name


def test_compiling_drops_torchs_no_cuda_runtime_note(tmp_path, monkeypatch):
    """A CUDA build of torch, compiling CPU kernels on a machine with a CUDA toolkit and no GPU, logs "No CUDA
    runtime is found, using CUDA_HOME=..." (in the middle of the first progress bar). Compiling through genie drops
    that one line, and nothing else torch's C++ builder says."""
    import logging

    import torch.utils.cpp_extension as builder

    from genie_core.nn import _NoCudaRuntimeNote, compile_block_stacks

    if not hasattr(builder, "_find_cuda_home"):
        pytest.skip("this torch finds CUDA_HOME elsewhere")
    logger = logging.getLogger("torch.utils.cpp_extension")
    heard = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "filters", [f for f in logger.filters if not isinstance(f, _NoCudaRuntimeNote)])
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        builder._find_cuda_home()
        assert heard == [f"No CUDA runtime is found, using CUDA_HOME='{tmp_path}'"]  # torch's own words
        compile_block_stacks(torch.nn.ModuleDict())
        builder._find_cuda_home()
        logger.warning("something else")
        assert heard[1:] == ["something else"]
    finally:
        logger.removeHandler(handler)


def test_compile_without_a_cpp_compiler_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """torch.compile builds its CPU kernels with a C++ compiler: a CPU run asked to compile where there is none is
    refused up front, naming the key, not stopped by a compiler error at its first step."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "run"
    assert main(["run", SMOKE, "run.cpu=true", "train.dynamics.compile=true", "--out", str(out)]) == 2
    assert ("train.dynamics.compile is true, but torch.compile on the CPU needs a C++ compiler and none was found "
            "(c++, g++); install one (e.g. apt-get install g++), or set it to false") in capsys.readouterr().err
    assert not (out / "data").exists()


def test_activation_checkpointing_without_a_model_that_supports_it_is_refused(tmp_path, capsys):
    """Refused before any work, naming the key, the component and its package; the engine, handed such a model all
    the same, says so and trains without."""
    pytest.importorskip("genie_example_plugin", reason="pip install -e examples/genie-example-plugin")
    out = tmp_path / "run"
    assert main(["run", SMOKE, "tokenizer.name=example-conv-vq", "train.tokenizer.activation_checkpointing=true",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("train.tokenizer.activation_checkpointing is true, but no model that stage trains supports it (tokenizer "
            "'example-conv-vq' (package genie-example-plugin))") in err
    assert not (out / "data").exists()
    assert main(["validate", SMOKE, "train.dynamics.activation_checkpointing=true"]) == 0
    assert main(["validate", SMOKE, "tokenizer.name=example-conv-vq", "train.tokenizer.compile=true"]) == 2
    assert ("train.tokenizer.compile is true, but no model that stage trains supports it (tokenizer "
            "'example-conv-vq' (package genie-example-plugin))") in capsys.readouterr().err

    class Linear(Task):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def forward(self, video):
            return self.layer(video).mean(), {}

    cfg = TrainConfig(steps=1, batch_size=2, seq_len=2, warmup_steps=0, checkpoint_every=0,
                      activation_checkpointing=True, compile=True)
    capsys.readouterr()
    train(Accelerator(cpu=True), Linear(), [torch.rand(4)] * 4, cfg, 0, tmp_path / "log.jsonl", "lin",
          Checkpointing(tmp_path / "ckpt", "x"))
    err = capsys.readouterr().err
    for key in ("activation_checkpointing", "compile"):
        assert (f"warning: lin: train.tokenizer.{key} is true, but no model this stage trains supports it (layer "
                f"(torch.nn.modules.linear.Linear)); it trains without") in err


FREE_AND_ALLOCATE = """
import ctypes, resource
from genie_core.io.machine import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL(None)  # the C library's malloc, which torch's CPU tensors come from; one thread, so repeatable
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a training step's pattern: activations of several sizes written, some freed early, then the rest
    alive = []
    for i in range(60):
        size = (1 + i % 5) << 19
        alive.append(libc.malloc(size))
        libc.memset(alive[-1], 1, size)
        if i % 3 == 0:
            libc.free(alive.pop(0))
    for block in alive:
        libc.free(block)
step(); step(); step()
before = faults()
for _ in range(10):
    step()
print(kept, faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc")
def test_kept_freed_memory_spares_each_step_its_page_faults():
    """keep_freed_memory (what `genie` does first): memory a step frees is reused by the next, not faulted in again
    a page at a time; GENIE_KEEP_FREED_MEMORY=0 leaves glibc's default, and so do the user's own malloc settings."""
    def probe(**env):
        environ = {k: v for k, v in os.environ.items()
                   if k not in (KEEP_FREED_MEMORY, "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", FREE_AND_ALLOCATE], env=environ | env, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    kept, kept_faults = probe()
    default, default_faults = probe(**{KEEP_FREED_MEMORY: "0"})
    users, _ = probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert kept and not default and not users
    assert default_faults > 20000 and kept_faults * 20 < default_faults, (kept_faults, default_faults)
