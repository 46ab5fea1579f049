"""The trainer end to end on CPU: ZeRO stages, ranks, resume, learning, and the `isoflop train` command."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import cli, write_word_jsonl
from helpers import isoflop

from pipeline.data.synthetic import synthetic
from pipeline.recipe import RunSpec, TrainConfig
from pipeline.training.loop import Reporter, lr_at, train

TINY = TrainConfig(seq_len=32, batch_size=8, lr=3e-3, warmup_min_steps=5, eval_samples=4, val_blocks=8,
                   eval_batch_size=32, log_every=5, checkpoint_every=0, zero_stage=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("data") / "synthetic", tokens=300_000, seed=0).path


def spec_for(family: str, steps: int, **train) -> RunSpec:
    recipe = TINY.with_overrides(train)
    shape = "cpu-26k"
    from pipeline.model.shapes import REGISTRY

    budget = 6 * REGISTRY[shape].non_embedding_params() * recipe.batch_size * recipe.seq_len * steps
    return RunSpec(family=family, shape=shape, budget=budget, train=recipe)


class Recorder(Reporter):
    def __init__(self):
        self.rows = []

    def metrics(self, rows):
        self.rows += [dict(r) for r in rows]


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    recipe = TrainConfig(lr=1.0, warmup_fraction=0.0, warmup_min_steps=10)
    lrs = [lr_at(s, 110, recipe) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("shape,at_half", [("linear", 0.55), ("1-sqrt", 1 - 0.9 * 0.5 ** 0.5)])
def test_wsd_holds_the_rate_then_decays_over_its_last_fraction(shape, at_half):
    """110 steps, 10 of warmup, 22 (20%) of decay: lr held over steps 10-88, then down to the floor at the last."""
    recipe = TrainConfig(lr=1.0, warmup_fraction=0.0, warmup_min_steps=10, schedule="wsd", decay_shape=shape)
    lrs = [lr_at(s, 110, recipe) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[10:89] == [1.0] * 79
    assert all(a > b for a, b in zip(lrs[88:], lrs[89:])) and lrs[-1] == pytest.approx(0.1)
    assert lrs[88 + 21 // 2] == pytest.approx(at_half, abs=0.03)  # halfway through the decay


def test_wsd_is_a_new_recipe_and_its_settings_need_it():
    from pipeline.model.shapes import REGISTRY

    cosine = RunSpec(family="arm", shape=REGISTRY["cpu-26k"], budget=1e10, train=TINY)
    assert cosine.run_hash == RunSpec(family="arm", shape=REGISTRY["cpu-26k"], budget=1e10,
                                      train=TINY.with_overrides({"decay_fraction": 0.2})).run_hash
    assert cosine.run_hash != RunSpec(family="arm", shape=REGISTRY["cpu-26k"], budget=1e10,
                                      train=TINY.with_overrides({"schedule": "wsd"})).run_hash
    with pytest.raises(ValueError, match="decay_fraction=0.3 shape the wsd schedule's decay"):
        TINY.with_overrides({"decay_fraction": 0.3})


def test_resume_after_interruption_matches_uninterrupted_run(corpus, tmp_path):
    spec = spec_for("mdm", 30, zero_stage=2, log_every=1)  # a window per step: every step's loss is compared
    whole, parts = Recorder(), Recorder()
    full = train(spec, corpus, tmp_path / "whole", reporter=whole, verbose=False)
    assert train(spec, corpus, tmp_path / "parts", reporter=parts, stop_at=12, verbose=False) is None
    resumed = train(spec, corpus, tmp_path / "parts", reporter=parts, verbose=False)
    assert resumed.resumed_from_step == 12
    assert [r["step"] for r in parts.rows] == list(range(1, 31))
    assert [r["loss"] for r in parts.rows] == [r["loss"] for r in whole.rows]  # bit for bit
    assert resumed.val_loss == full.val_loss
    windows = Recorder()  # log_every changes what is reported, never what is trained
    train(spec.model_copy(update={"train": spec.train.with_overrides({"log_every": 8})}), corpus, tmp_path / "windows",
          reporter=windows, verbose=False)
    assert [r["step"] for r in windows.rows] == [8, 16, 24, 30]
    per_step = [r["loss"] for r in whole.rows]
    for row, (lo, hi) in zip(windows.rows, [(0, 8), (8, 16), (16, 24), (24, 30)]):
        assert row["loss"] == pytest.approx(sum(per_step[lo:hi]) / (hi - lo), rel=1e-12)
        assert row["lr"] == whole.rows[hi - 1]["lr"] and row["tokens"] == whole.rows[hi - 1]["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["arm", "mdm"])
def test_tiny_models_learn_well_below_log_v(corpus, tmp_path, family):
    from pipeline.data.dataset import load_dataset

    info = load_dataset(corpus).info
    spec = spec_for(family, 150, batch_size=16, seq_len=64)
    result = train(spec, corpus, tmp_path, verbose=False)
    assert result.val_loss < 0.8 * math.log(info.vocab_size), result
    assert (tmp_path / "model.safetensors").exists() and json.loads((tmp_path / "result.json").read_text())["result"]["steps"] == 150


@pytest.fixture(scope="module")
def prepared_text(tmp_path_factory):
    """A user corpus through `isoflop data prepare`: jsonl documents, byte tokenizer."""
    folder = tmp_path_factory.mktemp("text")
    write_word_jsonl(folder / "docs.jsonl", 400)
    proc = isoflop("data", "prepare", str(folder / "docs.jsonl"), "--out", str(folder / "prepared"), "--val-fraction", "0.1",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    return folder / "prepared"


@pytest.mark.slow
@pytest.mark.parametrize("workers,zero,precision,data", [(2, 2, "fp32", "prepared_text"), (2, 2, "bf16", "corpus"),
                                                         (2, 3, "bf16", "corpus")])
def test_train_command_ranks_and_zero_stages(request, tmp_path, workers, zero, precision, data):
    """What a multi-GPU node runs, on CPU ranks over gloo: ZeRO-2 and ZeRO-3 (parameters sharded), bf16."""
    from safetensors.torch import load_file

    from pipeline.training.run_folder import RunFolder

    out, corpus = tmp_path / "run", request.getfixturevalue(data)
    args = ["train", "--family", "arm", "--model", "{n_layer: 1, n_head: 2, d_model: 32}", "--flops", "1.5e9",
            "--data", str(corpus), "--out", str(out), "--workers", str(workers), "--zero-stage", str(zero),
            "--set", "seq_len=32", "--set", "batch_size=8", "--set", "warmup_min_steps=2", "--set", "val_blocks=4",
            "--set", f"precision={precision}"]
    proc = isoflop(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"family", "params", "tokens", "flops", "steps", "val_loss"} <= set(result)
    assert result["world_size"] == workers and result["steps"] == round(1.5e9 / (6 * result["params"] * 256))
    assert "tok/s" in proc.stdout and "ETA" in proc.stdout
    weights = load_file(out / "model.safetensors")  # whole fp32 tensors, gathered from the ranks' shards
    assert weights["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert RunFolder(out).load().model.blocks[0].mlp.down.weight.shape == (32, 128)
    again = isoflop(*args, timeout=600)  # a finished run is not trained twice
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == result


@pytest.mark.parametrize("args,message", [
    (["--family", "xdm"], "family"),
    (["--model", "cpu-3k"], "unknown shape 'cpu-3k'"),
    (["--model", "{n_layer: 1, n_head: 3, d_model: 32}"], "n_head=3 does not divide d_model=32"),
    (["--flops", "1e3"], "below train.min_steps"),
    (["--flops", "1e12"], "epochs of the corpus's 9,090, above train.max_epochs=1"),
    (["--flops", "lots"], "--flops: expected a number"),
    (["--set", "lr=-1"], "train.lr"),
    (["--set", "batch_size=7", "--workers", "2"], "train.batch_size: 7 is not a multiple"),
    (["--data", "/nonexistent/data"], "/nonexistent/data"),
])
def test_bad_train_input_fails_fast_with_a_named_field(corpus, tmp_path, capsys, args, message):
    base = {"--family": "arm", "--model": "cpu-26k", "--flops": "1e10", "--data": str(corpus), "--out": str(tmp_path / "o")}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, value]
    code, _, err = cli(capsys, "train", *[x for kv in base.items() for x in kv], "--set", "seq_len=32",
                       "--set", "batch_size=8", *extra)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) <= 3, err
    assert not (tmp_path / "o").exists()


def test_a_diverging_run_stops_with_a_reason(corpus, tmp_path):
    from pipeline.training.loop import Diverged

    spec = spec_for("arm", 40, lr=1e6, grad_clip=0.0, warmup_min_steps=1)
    with pytest.raises(Diverged, match="loss became"):
        train(spec, corpus, tmp_path, verbose=False)
    assert not (tmp_path / "result.json").exists()


def test_one_rank_group_leaves_nothing_for_child_processes_to_trip_on():
    # a process that trained in-process (a notebook, this test session) and then starts a sweep must not
    # hand its children a rendezvous port it still holds
    from pipeline.training.distributed import ensure_process_group

    assert ensure_process_group() == (0, 1)
    child = subprocess.run([sys.executable, "-c", "from pipeline.training.distributed import ensure_process_group as g; "
                            "print(g())"], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == "(0, 1)"


@pytest.mark.parametrize("family", ["arm", "mdm"])
def test_a_run_records_the_flops_it_spends(corpus, tmp_path, family):
    """flops_spent: forward + backward (6 per weight) of every matrix multiply the model holds, the LM head's on
    the positions the loss scores (the MDM's masked ones: p = (1 - eps) t + eps, t uniform, so (1 + eps) / 2 of
    them), plus attention scores and their weighting (QK^T and AV: 2 x 2 x T x d per layer and token, x 3 with
    backward)."""
    from pipeline.training.run_folder import RunFolder

    result = train(spec_for(family, 20, log_every=10), corpus, tmp_path, verbose=False)
    model = RunFolder(tmp_path).load().model
    in_blocks = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    scored = 1.0 if family == "arm" else (1 + TINY.mdm_eps) / 2
    layers, d, seq_len = len(model.blocks), model.head.in_features, TINY.seq_len
    per_token = 6 * (in_blocks + scored * model.head.weight.numel()) + 3 * 2 * 2 * seq_len * d * layers
    assert result.flops_spent == pytest.approx(result.tokens * per_token, rel=1e-3)
    assert json.loads((tmp_path / "result.json").read_text())["result"]["flops_spent"] == result.flops_spent


def test_bf16_training_saves_the_fp32_master_weights(corpus, tmp_path):
    """bf16 compute keeps fp32 master weights in the optimizer; the run folder holds those, not bf16 copies."""
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match="precision=bf16 needs zero_stage >= 1"):
        TrainConfig(precision="bf16", zero_stage=0)
    train(spec_for("arm", 20, precision="bf16", zero_stage=2, keep_checkpoint=True), corpus, tmp_path, verbose=False)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step00000020"  # kept, at the last step
    weights = load_file(tmp_path / "model.safetensors")
    for name, w in weights.items():
        assert w.dtype == torch.float32
        if w.dim() == 2:  # trained matrices: fp32 values that bf16 cannot hold
            assert (w.to(torch.bfloat16).float() != w).float().mean() > 0.9, name


@pytest.mark.slow
def test_compiled_training_runs_on_cpu_and_saves_the_models_own_weights(corpus, tmp_path):
    """--set compile=true: torch.compile through DeepSpeed; the same run hash, and a final folder that loads."""
    from pipeline.use.loading import load_trained

    out = tmp_path / "compiled"
    proc = isoflop("train", "--family", "mdm", "--model", "{n_layer: 1, n_head: 2, d_model: 32}", "--flops", "1.5e9",
                   "--data", str(corpus), "--out", str(out), "--set", "seq_len=32", "--set", "batch_size=8",
                   "--set", "warmup_min_steps=2", "--set", "val_blocks=4", "--set", "eval_samples=2",
                   "--set", "compile=true", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert math.isfinite(result["val_loss"])
    spec = RunSpec(family="mdm", shape={"n_layer": 1, "n_head": 2, "d_model": 32}, budget=1.5e9,
                   train=TrainConfig(seq_len=32, batch_size=8, compile=True))
    assert spec.run_hash == spec.model_copy(update={"train": spec.train.with_overrides({"compile": False})}).run_hash
    assert load_trained(folder=out).model.non_embedding_params() == result["params"]
