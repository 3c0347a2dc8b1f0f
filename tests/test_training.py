"""The training pipeline end to end on the tiny preset: learning, resume, best tracking,
crash safety of checkpoint writes, loading a checkpoint in a fresh process, and a tiny MoE run
that logs its load-balancing loss and exports."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from nexus.checkpoint import load_checkpoint, model_from_checkpoint, read_header
from nexus.config import TrainConfig, preset
from nexus.errors import NexusError
from nexus.hf import export_to_hf, import_from_hf
from nexus.model import NexusLM
from nexus.optim import NS_COEFFICIENTS, Muon, build_optimizer, orthogonalise
from nexus.training import COMPILE_MIN_MICRO_STEPS, Trainer, use_compile


def evals(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == "eval"}


@pytest.fixture(scope="module")
def finished_run(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    Trainer(tiny_config(text_corpus, out), progress=False).run()
    return out


def test_loss_falls_well_below_uniform(text_corpus: Path, tmp_path: Path) -> None:
    config = tiny_config(text_corpus, tmp_path / "run", max_steps=40, eval_interval=20)
    last = Trainer(config, progress=False).run()
    assert last["step"] == 40
    assert last["val_loss"] < 0.6 * math.log(256), last
    assert math.isclose(last["val_ppl"], math.exp(last["val_loss"]), rel_tol=1e-9)
    assert last["sample"].startswith("To be")


def test_run_directory_contents(finished_run: Path) -> None:
    names = {p.name for p in finished_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "best.bin"} <= names
    assert {f"step_{n}.bin" for n in (2, 4, 6, 8)} <= names
    saved = json.loads((finished_run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 8
    assert saved["model"]["d_model"] == 64
    assert (
        saved["dataset"]["bytes"] == saved["dataset"]["train_bytes"] + saved["dataset"]["val_bytes"]
    )
    assert sorted(evals(finished_run)) == [2, 4, 6, 8]


def test_compile_auto_means_long_dense_runs() -> None:
    reference, moe = preset("nexus-6m"), preset("nexus-tiny-moe")
    long_run = TrainConfig(max_steps=COMPILE_MIN_MICRO_STEPS // 4, grad_accum=4)
    short_run = TrainConfig(max_steps=COMPILE_MIN_MICRO_STEPS // 4 - 1, grad_accum=4)
    assert use_compile(TrainConfig(), reference)  # the reference run: 2000 steps x 4
    assert use_compile(long_run, reference)
    assert not use_compile(short_run, reference)
    assert not use_compile(long_run, moe)
    assert use_compile(TrainConfig(max_steps=1, warmup_steps=0, compile="on"), moe)
    assert not use_compile(TrainConfig(compile="off"), reference)


def test_compiled_run_matches_the_eager_run(
    finished_run: Path, text_corpus: Path, tmp_path: Path
) -> None:
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    log = io.StringIO()
    Trainer(tiny_config(text_corpus, run, compile="on"), progress=False, log=log).run()
    assert "compiling the training step" in log.getvalue()
    compiled, eager = evals(run), evals(finished_run)
    assert sorted(compiled) == sorted(eager)
    for step in eager:  # the same run up to float rounding: the fused kernels sum differently
        for key in ("train_loss", "val_loss"):
            assert compiled[step][key] == pytest.approx(eager[step][key], rel=1e-4), (step, key)
    # A compiled run resumes exactly, as an eager one does.
    shutil.copytree(run, resumed)
    for step in (6, 8):
        (resumed / f"step_{step}.bin").unlink()
    Trainer(tiny_config(text_corpus, resumed, compile="on"), resume=True, progress=False).run()
    for step in (6, 8):
        for key in ("train_loss", "val_loss", "sample"):
            assert evals(resumed)[step][key] == compiled[step][key], (step, key)


def test_without_a_cpp_compiler_training_goes_on_eagerly(
    finished_run: Path, text_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/c++"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # no compiled kernel reused
    torch._dynamo.reset()
    log = io.StringIO()
    config = tiny_config(text_corpus, tmp_path / "run", compile="on", max_steps=2)
    Trainer(config, progress=False, log=log).run()
    assert "torch.compile failed (" in log.getvalue()
    assert "No working C++ compiler" in log.getvalue()
    assert evals(tmp_path / "run")[2]["val_loss"] == evals(finished_run)[2]["val_loss"]


def test_best_checkpoint_is_the_lowest_val_loss(finished_run: Path) -> None:
    records = evals(finished_run)
    best_step = min(records, key=lambda step: records[step]["val_loss"])
    assert read_header(finished_run / "best.bin")["step"] == str(best_step)
    best, full = (
        load_checkpoint(finished_run / "best.bin"),
        load_checkpoint(finished_run / f"step_{best_step}.bin"),
    )
    assert best.meta["best_val_loss"] == pytest.approx(records[best_step]["val_loss"])
    # The weights alone: the same tensors as the step's checkpoint, no optimizer moments.
    assert best.model_state.keys() == full.model_state.keys()
    assert all(torch.equal(best.model_state[k], full.model_state[k]) for k in full.model_state)
    assert best.optimizer_tensors == {} and full.optimizer_tensors
    best_size = (finished_run / "best.bin").stat().st_size
    assert best_size < 0.4 * (finished_run / f"step_{best_step}.bin").stat().st_size
    with pytest.raises(NexusError, match="holds the weights only"):
        Trainer(
            tiny_config(Path(json.loads((finished_run / "config.json").read_text())["dataset"]
                             ["path"]), finished_run / "elsewhere"),
            resume=finished_run / "best.bin",
        )  # fmt: skip


def test_keep_last_keeps_the_newest_checkpoints(text_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    Trainer(tiny_config(text_corpus, out, keep_last=2), progress=False).run()
    assert sorted(p.name for p in out.glob("step_*.bin")) == ["step_6.bin", "step_8.bin"]
    assert load_checkpoint(out / "best.bin").step in {2, 4, 6, 8}
    with pytest.raises(NexusError, match="keep_last must be an integer >= 0"):
        tiny_config(text_corpus, out, keep_last=-1)


def test_resume_reproduces_the_uninterrupted_run(finished_run: Path, tmp_path: Path) -> None:
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(finished_run, resumed_dir)
    for step in (6, 8):
        (resumed_dir / f"step_{step}.bin").unlink()  # as if stopped right after step 4
    config = tiny_config(
        Path(json.loads((finished_run / "config.json").read_text())["dataset"]["path"]), resumed_dir
    )
    Trainer(config, resume=True, progress=False).run()
    original, resumed = evals(finished_run), evals(resumed_dir)
    for step in (6, 8):
        for key in ("train_loss", "val_loss", "lr", "sample"):
            assert resumed[step][key] == original[step][key], (step, key)
    lines = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    steps = [(json.loads(x)["kind"], json.loads(x)["step"]) for x in lines]
    assert len(steps) == len(set(steps)), "a resumed step was recorded twice"


def test_existing_run_is_refused_without_resume_or_force(
    finished_run: Path, text_corpus: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    with pytest.raises(NexusError, match="already holds a run; pass --resume"):
        Trainer(tiny_config(text_corpus, copy), progress=False)
    Trainer(tiny_config(text_corpus, copy, max_steps=2), force=True, progress=False).run()
    assert sorted(evals(copy)) == [2]
    assert not (copy / "step_8.bin").exists()


def test_resume_with_nothing_to_resume(text_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(NexusError, match="nothing to resume"):
        Trainer(tiny_config(text_corpus, tmp_path / "empty"), resume=True, progress=False)


def test_resume_with_a_different_model_is_refused(finished_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    data = json.loads((copy / "config.json").read_text())["dataset"]["path"]
    config = tiny_config(Path(data), copy, model={"d_state": 4})
    with pytest.raises(NexusError, match=r"different model config.*d_state 8 \(checkpoint\) vs 4"):
        Trainer(config, resume=True, progress=False)


KILL_DURING_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import nexus.rundir as rundir
    from conftest import tiny_config
    from nexus.training import Trainer

    real_replace = os.replace
    def dying_replace(src, dst):
        if str(dst).endswith("step_4.bin"):
            os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written, not yet renamed
        real_replace(src, dst)
    rundir.os.replace = dying_replace
    Trainer(tiny_config(sys.argv[1], sys.argv[2]), progress=False).run()
    """
)


def test_kill_during_a_checkpoint_write_keeps_earlier_checkpoints(
    text_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    child = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, str(text_corpus), str(out)],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stderr
    assert not (out / "step_4.bin").exists()
    assert load_checkpoint(out / "step_2.bin").step == 2
    assert load_checkpoint(out / "best.bin").step == 2
    Trainer(tiny_config(text_corpus, out), resume=True, progress=False).run()
    assert load_checkpoint(out / "step_8.bin").step == 8


def test_checkpoint_loads_in_a_fresh_process(finished_run: Path) -> None:
    data = json.loads((finished_run / "config.json").read_text())["dataset"]["path"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nexus",
            "eval",
            str(finished_run / "step_8.bin"),
            "--data",
            data,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["val_loss"] == pytest.approx(evals(finished_run)[8]["val_loss"], abs=1e-6)
    assert report["val_ppl"] == pytest.approx(math.exp(report["val_loss"]))
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "nexus",
            "sample",
            str(finished_run / "best.bin"),
            "--prompt",
            "To be",
            "--max_new_tokens",
            "20",
            "--temperature",
            "0",
        ],
        capture_output=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith(b"To be") and len(sample.stdout) == len(b"To be") + 20 + 1


def test_moe_run_learns_logs_its_aux_loss_and_exports(
    finished_run: Path, text_corpus: Path, tmp_path: Path
) -> None:
    out, log = tmp_path / "moe", io.StringIO()
    config = tiny_config(
        text_corpus, out, preset="nexus-tiny-moe", max_steps=16, eval_interval=8, log_interval=4
    )
    last = Trainer(config, log=log, progress=False).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12, 16]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # the loss stays plain cross-entropy
    assert last["val_loss"] < 0.7 * math.log(256), last
    # Near top_k = 2 (balanced routing), and never in eval records or in a dense run's.
    assert all(abs(r["aux_loss"] - 2.0) < 0.5 for r in train), train
    assert all("aux_loss" not in r for r in records if r["kind"] == "eval")
    dense = (finished_run / "metrics.jsonl").read_text()
    assert "aux_loss" not in dense
    assert "aux_loss 2." in log.getvalue()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    aux_events = {e.step: e.value for e in events.Scalars("train/aux_loss")}
    assert aux_events == pytest.approx({r["step"]: r["aux_loss"] for r in train}, rel=1e-6)

    # A tiny MoE run exports to Hugging Face Jamba and imports back unchanged.
    hf_dir = export_to_hf(out / "step_16.bin", tmp_path / "hf")
    trained = model_from_checkpoint(load_checkpoint(out / "step_16.bin")).eval()
    back = model_from_checkpoint(load_checkpoint(import_from_hf(hf_dir, tmp_path / "back.bin")))
    for (name, tensor), (other_name, other) in zip(
        trained.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert name == other_name and torch.equal(tensor, other), name


def test_expert_matrices_get_weight_decay() -> None:
    model = NexusLM(TrainConfig(preset="nexus-tiny-moe").model_config())
    decay, no_decay = build_optimizer(model, TrainConfig()).param_groups
    decayed = {id(p) for p in decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in names
    assert "model.layers.1.feed_forward.experts.down_proj" in names
    assert "model.layers.1.feed_forward.router.weight" in names
    assert "model.layers.0.mamba.conv1d.weight" not in names and no_decay["weight_decay"] == 0


def test_a_run_with_dropout_learns_and_resumes_exactly(
    finished_run: Path, text_corpus: Path, tmp_path: Path
) -> None:
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    Trainer(tiny_config(text_corpus, run, dropout=0.2), progress=False).run()
    records, plain = evals(run), evals(finished_run)
    assert records[8]["val_loss"] < records[2]["val_loss"] < math.log(256)
    assert records[8]["train_loss"] != plain[8]["train_loss"]  # the masks changed the steps
    shutil.copytree(run, resumed)
    for step in (6, 8):
        (resumed / f"step_{step}.bin").unlink()
    Trainer(tiny_config(text_corpus, resumed, dropout=0.2), resume=True, progress=False).run()
    for step in (6, 8):  # the saved RNG state gives the same masks after the resume
        for key in ("train_loss", "val_loss", "sample"):
            assert evals(resumed)[step][key] == records[step][key], (step, key)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    model = NexusLM(preset("nexus-tiny"))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"))
    muon, adamw = optimizer.parts
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    on_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    on_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert on_muon | on_adamw == set(names.values()) and not on_muon & on_adamw
    assert on_muon == {
        name
        for name, p in model.named_parameters()
        if p.ndim == 2 and name.startswith("model.layers.") and not name.endswith("A_log")
    }
    for kept_on_adamw in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.mamba.A_log",
        "model.layers.0.mamba.conv1d.weight",
    ):
        assert kept_on_adamw in on_adamw
    assert "model.layers.1.self_attn.q_proj.weight" in on_muon


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (48, 48)])
def test_orthogonalise_is_the_newton_schulz_iteration(shape: tuple[int, int]) -> None:
    """Against the iteration as published, X ← aX + (bG + cG²)X on X itself, in float64."""
    torch.manual_seed(0)
    matrix = torch.randn(shape, dtype=torch.float64)
    a, b, c = NS_COEFFICIENTS
    x = matrix / (matrix.norm() + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    # The same to rounding (the products are associated differently; a⁵ ≈ 480 amplifies it).
    assert torch.allclose(orthogonalise(matrix), x, rtol=0, atol=1e-10)
    assert torch.allclose(orthogonalise(matrix.float()), x.float(), rtol=0, atol=5e-5)


def test_a_muon_step_is_the_orthogonalised_gradient() -> None:
    torch.manual_seed(0)
    model = NexusLM(preset("nexus-tiny"))
    lr = 1e-2
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", lr=lr, weight_decay=0.0))
    weight = model.model.layers[0].mamba.in_proj.weight  # (256, 64)
    before = weight.detach().clone()
    gradient = torch.randn_like(weight)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weight.grad = gradient.clone()
    optimizer.step()
    # Scaled to AdamW's RMS: lr · 0.2 · sqrt(max(rows, cols)) times the orthogonalised update.
    update = (before - weight.detach()) / (lr * 0.2 * math.sqrt(max(weight.shape)))
    # Against the SVD: the same singular vectors as the gradient's, U Vᵀ, with the singular
    # values that five Newton–Schulz steps leave near 1 (the quintic keeps them in ~0.7-1.2).
    # The first step's direction is the gradient times 1 + momentum (Nesterov, from 0).
    u, _, vh = torch.linalg.svd(gradient, full_matrices=False)
    polar = u @ vh
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    cosine = (update * polar).sum() / (update.norm() * polar.norm())
    assert cosine > 0.95, cosine
    assert torch.equal(model.lm_head.weight.grad, torch.zeros_like(model.lm_head.weight))


def test_a_muon_run_learns_and_resumes_exactly(text_corpus: Path, tmp_path: Path) -> None:
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    Trainer(tiny_config(text_corpus, run, optimizer="muon"), progress=False).run()
    records = evals(run)
    assert records[8]["val_loss"] < records[2]["val_loss"] < math.log(256)
    shutil.copytree(run, resumed)
    for step in (6, 8):
        (resumed / f"step_{step}.bin").unlink()
    Trainer(tiny_config(text_corpus, resumed, optimizer="muon"), resume=True, progress=False).run()
    for step in (6, 8):  # Muon's momentum and AdamW's moments came back from step 4
        for key in ("train_loss", "val_loss", "sample"):
            assert evals(resumed)[step][key] == records[step][key], (step, key)
