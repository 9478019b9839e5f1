"""DeepSpeed interop: config import, and checkpoints both ways.

With DeepSpeed installed (`bash scripts/install.sh --bench`), one launch of
real DeepSpeed ZeRO-1/2/3 on gloo trains scaletrain's recipe, saves, and
loads scaletrain's exports; the test checks that both sides train alike, that
import consolidates exactly what DeepSpeed's own zero_to_fp32 does, and that
training continues with the same losses after a conversion either way."""

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from harness import REPO, cli_env, read_run, run_cli, train_many, train_run

from scaletrain.checkpoint.deepspeed import read_deepspeed
from scaletrain.checkpoint.deepspeed_convert import export_deepspeed, import_deepspeed
from scaletrain.config import load_config

# Constant LR: the DeepSpeed side runs without a scheduler.
RECIPE = ["training.warmup_steps=0", "training.min_lr=0.003", "training.lr=0.003", "logging.sample_tokens=0"]
STEPS, SAVED = 5, 3


def ds_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


# -- config ---------------------------------------------------------------------

DS_CONFIG = {
    "train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
    "gradient_clipping": 0.5, "steps_per_print": 10, "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000, "warmup_num_steps": 50,
                                                       "cos_min_ratio": 0.1}},
    "wandb": {"enabled": True}, "train_batch_sise": 3,
}


def test_config_import_deepspeed(tmp_path):
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps(DS_CONFIG))
    out = tmp_path / "imported.toml"
    proc = run_cli(["config", "import-deepspeed", str(ds), "-o", str(out), "--set", "model.name=debug"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(out)
    t, p = cfg.training, cfg.parallel
    assert (t.global_batch_size, t.micro_batch_size, t.grad_clip, t.dtype) == (32, 4, 0.5, "bf16")
    assert (t.lr, t.beta1, t.beta2, t.weight_decay) == (2e-4, 0.9, 0.98, 0.01)
    assert (t.steps, t.warmup_steps) == (1000, 50) and math.isclose(t.min_lr, 2e-5)
    assert (p.zero_stage, p.cpu_offload, cfg.logging.interval, cfg.model.name) == (3, True, 10, "debug")
    warnings = proc.stderr.strip().splitlines()
    assert all(w.startswith("warning: ") for w in warnings)
    for needle in ("zero_optimization.overlap_comm", "optimizer.params.eps = 1e-06", "wandb",
                   "train_batch_sise is not a DeepSpeed setting scaletrain knows (did you mean 'train_batch_size'?)"):
        assert sum(needle in w for w in warnings) == 1, (needle, warnings)
    assert len(warnings) == 4


def test_config_import_deepspeed_hf_auto_values(tmp_path):
    """HF Trainer's DeepSpeed configs say "auto" for what it fills in: each is a warning, the value stays."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                              "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2},
                              "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}))
    proc = run_cli(["config", "import-deepspeed", str(ds)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    default = load_config()
    cfg = tomllib.loads(proc.stdout)
    assert cfg["parallel"]["zero_stage"] == 2
    assert cfg["training"]["dtype"] == default.training.dtype
    assert cfg["training"]["warmup_steps"] == default.training.warmup_steps
    warned = [line.split(" = ")[0].removeprefix("warning: ") for line in proc.stderr.splitlines()]
    assert warned == ["train_micro_batch_size_per_gpu", "bf16.enabled", "optimizer.params.lr",
                      "scheduler.params.warmup_num_steps", "gradient_clipping"]


def test_config_import_deepspeed_batch_from_world_size_and_bad_input(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                              "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}}))
    proc = run_cli(["config", "import-deepspeed", str(ds)], timeout=60)
    assert proc.returncode == 2 and "pass --world-size" in proc.stderr
    proc = run_cli(["config", "import-deepspeed", str(ds), "--world-size", "8"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "global_batch_size = 64" in proc.stdout and 'dtype = "fp16"' in proc.stdout
    assert "fp16.initial_scale_power = 12 is not carried over" in proc.stderr
    ds.write_text("{not json")
    out = tmp_path / "out.toml"
    proc = run_cli(["config", "import-deepspeed", str(ds), "-o", str(out)], timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert not out.exists()


# -- checkpoints without DeepSpeed ----------------------------------------------------

@pytest.fixture(scope="module")
def scaletrain_run(tmp_path_factory, debug_config):
    """STEPS steps of the recipe, with a checkpoint after step SAVED."""
    run_dir = tmp_path_factory.mktemp("st") / "run"
    return train_run(run_dir, debug_config, RECIPE + [f"training.steps={STEPS}", f"checkpoint.interval={SAVED}"])


def saved_checkpoint(run) -> Path:
    return run.run_dir / "checkpoints" / f"step_{SAVED:08d}"


@pytest.mark.parametrize("stage, world", [(1, 3), (2, 2)])
def test_export_then_import_is_lossless(tmp_path, scaletrain_run, debug_config, stage, world):
    """ZeRO-1/2 need no DeepSpeed to write: partitions (with padding for 3 ranks) and back."""
    ckpt = saved_checkpoint(scaletrain_run)
    export_deepspeed(ckpt, tmp_path / "ds", stage, world)
    files = sorted(p.name for p in (tmp_path / "ds" / f"global_step{SAVED}").iterdir())
    assert files == ["mp_rank_00_model_states.pt"] + [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                      for r in range(world)]
    back, resumes = import_deepspeed(tmp_path / "ds", tmp_path / "back", load_config(debug_config, RECIPE))
    assert resumes
    from torch.distributed.checkpoint import load

    from scaletrain.checkpoint.safe_reader import SafeReader

    stored = SafeReader(str(ckpt)).read_metadata().state_dict_metadata
    keys = [k for k in stored if k.startswith(("model.", "optim."))]
    original = {k: torch.zeros(stored[k].size) for k in keys}
    again = {k: torch.zeros(stored[k].size) for k in keys}
    load(original, storage_reader=SafeReader(str(ckpt)), no_dist=True)
    load(again, storage_reader=SafeReader(str(back)), no_dist=True)
    for key in keys:
        torch.testing.assert_close(again[key], original[key], rtol=0, atol=0, msg=key)
    assert json.loads((back / "train_state.json").read_text())["sampler"] == \
        json.loads((ckpt / "train_state.json").read_text())["sampler"]


def test_truncated_or_incomplete_deepspeed_checkpoint(tmp_path, scaletrain_run, debug_config):
    ds = tmp_path / "ds"
    export_deepspeed(saved_checkpoint(scaletrain_run), ds, 2, 2)
    shard = ds / f"global_step{SAVED}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:4000])
    out = tmp_path / "imported"
    for damage in ("truncated", "missing"):
        proc = run_cli(["checkpoint", "import", "--from", "deepspeed", str(ds), str(out), "--config",
                        str(debug_config)], timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert shard.name in lines[0] and ("truncated" in lines[0] or "missing" in lines[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], damage  # nothing written
        shard.unlink(missing_ok=True)


# -- with real DeepSpeed --------------------------------------------------------------

@pytest.mark.skipif(not ds_available(), reason="DeepSpeed not installed (bash scripts/install.sh --bench)")
def test_deepspeed_both_ways(tmp_path, scaletrain_run, debug_config):
    reference = scaletrain_run.losses  # scaletrain, uninterrupted, STEPS steps
    jobs = []
    for stage in (1, 2, 3):
        export_deepspeed(saved_checkpoint(scaletrain_run), tmp_path / f"export{stage}", stage, 2)
        common = {"config": str(debug_config), "overrides": RECIPE, "zero_stage": stage,
                  "continue_steps": STEPS - SAVED}
        jobs += [{**common, "steps": SAVED, "save_dir": str(tmp_path / f"ds{stage}"),
                  "out": str(tmp_path / f"ds{stage}.json")},
                 {**common, "load_dir": str(tmp_path / f"export{stage}"), "out": str(tmp_path / f"load{stage}.json")}]
    # bf16 ZeRO-1 runs DeepSpeed's BF16_Optimizer, which writes its own file names and keys.
    jobs.append({"config": str(debug_config), "overrides": RECIPE, "zero_stage": 1, "bf16": True, "steps": 2,
                 "continue_steps": 0, "save_dir": str(tmp_path / "bf16"), "out": str(tmp_path / "bf16.json")})
    export_deepspeed(saved_checkpoint(scaletrain_run), tmp_path / "export_bf16", 1, 2, bf16=True)
    jobs.append({"config": str(debug_config), "overrides": RECIPE, "zero_stage": 1, "bf16": True,
                 "load_dir": str(tmp_path / "export_bf16"), "continue_steps": STEPS - SAVED,
                 "out": str(tmp_path / "load_bf16.json")})
    # ZeRO-0 keeps the client optimizer's own state, indexed by position, not by name: weights only.
    jobs.append({"config": str(debug_config), "overrides": RECIPE, "zero_stage": 0, "steps": SAVED,
                 "continue_steps": 0, "save_dir": str(tmp_path / "zero0"), "out": str(tmp_path / "zero0.json")})
    # A HF Transformers Llama trained under ZeRO-3: its module names are HF's.
    jobs.append({"config": str(debug_config), "overrides": RECIPE, "zero_stage": 3, "hf": True, "steps": 2,
                 "continue_steps": 0, "save_dir": str(tmp_path / "hf"), "out": str(tmp_path / "hf.json")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "deepspeed_worker.py"), str(tmp_path / "jobs.json")]
    # DeepSpeed's CPU accelerator even where a GPU exists: the worker trains on CPU over gloo.
    proc = subprocess.run(cmd, env=cli_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # In bf16 the continuation matches to bf16's precision, no better.
    loaded = json.loads((tmp_path / "load_bf16.json").read_text())["losses"]
    torch.testing.assert_close(torch.tensor(loaded), torch.tensor(reference[SAVED:]), rtol=2e-3, atol=0)
    for saved in ["bf16"] + [f"ds{stage}" for stage in (1, 2, 3)]:
        # Import consolidates what DeepSpeed's own zero_to_fp32 does, to the bit.
        ours = read_deepspeed(tmp_path / saved).params
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / saved))
        assert ours.keys() == theirs.keys()
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=f"{saved} {name}")
    _check_hf_import(tmp_path, debug_config)
    _check_zero0_import(tmp_path, debug_config)
    cases = {}
    for stage in (1, 2, 3):
        trained = json.loads((tmp_path / f"ds{stage}.json").read_text())["losses"]
        loaded = json.loads((tmp_path / f"load{stage}.json").read_text())["losses"]
        # DeepSpeed trains scaletrain's recipe as scaletrain does, and resumes scaletrain's export.
        torch.testing.assert_close(torch.tensor(trained), torch.tensor(reference), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(loaded), torch.tensor(reference[SAVED:]), rtol=1e-5, atol=1e-6)
        done, resumes = import_deepspeed(tmp_path / f"ds{stage}", tmp_path / f"imported{stage}",
                                         load_config(debug_config, RECIPE))
        assert resumes
        cases[f"from_zero{stage}"] = RECIPE + [f"training.steps={STEPS}", f"checkpoint.resume={done}",
                                               f"parallel.zero_stage={max(stage - 1, 0)}"]
    # scaletrain continues each DeepSpeed run (2 ranks, another ZeRO stage) with DeepSpeed's own losses.
    for name, run in train_many(tmp_path / "continued", debug_config, cases, nproc=2).items():
        stage = int(name[-1])
        continued = json.loads((tmp_path / f"ds{stage}.json").read_text())["losses"][SAVED:]
        assert [m["step"] for m in run.metrics] == list(range(SAVED + 1, STEPS + 1))
        torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(continued), rtol=1e-5, atol=1e-6)
        assert read_run(run.run_dir).summary["resumed_from"].endswith(f"imported{stage}")


def _check_hf_import(tmp_path, debug_config):
    """The imported HF-named checkpoint computes HF's logits (from DeepSpeed's own consolidation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaletrain.checkpoint.hf import hf_config, load_checkpoint_model

    done, _ = import_deepspeed(tmp_path / "hf", tmp_path / "imported_hf", load_config(debug_config, RECIPE))
    cfg, ours = load_checkpoint_model(done)
    theirs = LlamaForCausalLM(LlamaConfig(**hf_config(cfg.model)))
    theirs.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "hf")))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits, rtol=1e-4, atol=1e-5)


def _check_zero0_import(tmp_path, debug_config):
    """ZeRO-0 imports as weights only (its optimizer state is indexed by position, not name): the
    weights of the same SAVED steps as ZeRO-1's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from scaletrain.checkpoint.hf import load_checkpoint_model

    done, resumes = import_deepspeed(tmp_path / "zero0", tmp_path / "imported0", load_config(debug_config, RECIPE))
    assert not resumes and json.loads((done / "train_state.json").read_text())["model_only"]
    _, model = load_checkpoint_model(done)
    zero1 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ds1"))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), zero1[name], rtol=0, atol=1e-6, msg=name)
