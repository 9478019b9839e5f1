"""Train scaletrain's model with real DeepSpeed (ZeRO on gloo), the way
scaletrain trains it: same config, initial weights, data order (scaletrain's
sampler), AdamW groups and hyper-parameters, gradient clipping, constant LR.

Run under torchrun: ``deepspeed_worker.py JOBS.json``. Each job:
  {"config", "overrides", "zero_stage", "out"; "steps" + "save_dir" (train,
   save, then continue), or "load_dir" (load, then continue); "continue_steps"}
writes {"losses": [...]} (the global-batch mean per step) to ``out``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def run_job(job: dict) -> None:
    import deepspeed

    from scaletrain.config import load_config
    from scaletrain.data import DistributedBatchSampler, prepare_corpus
    from scaletrain.model import Llama
    from scaletrain.train.checks import check_data, resolve_vocab

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(job["config"], job["overrides"])
    corpus = prepare_corpus(cfg.data, show_progress=False)
    cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
    t = cfg.training
    assert t.warmup_steps == 0 and t.min_lr == t.lr, "the worker trains at a constant learning rate"
    dataset, _ = check_data(cfg, corpus)
    sampler = DistributedBatchSampler(dataset.n_sequences, t.global_batch_size, rank, world, t.seed)
    if job.get("hf"):  # HF Transformers' LlamaForCausalLM of the same shape, as many DeepSpeed users train
        from transformers import LlamaConfig, LlamaForCausalLM

        from scaletrain.checkpoint.hf import hf_config

        torch.manual_seed(t.seed)
        model = LlamaForCausalLM(LlamaConfig(**hf_config(cfg.model)))
    else:
        model = Llama(cfg.model)
        model.init_weights(t.seed)
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    ds_config = {"train_batch_size": t.global_batch_size,
                 "train_micro_batch_size_per_gpu": t.global_batch_size // world,
                 "gradient_accumulation_steps": 1, "gradient_clipping": t.grad_clip,
                 "zero_optimization": {"stage": job["zero_stage"]}, "steps_per_print": 10**9,
                 "bf16": {"enabled": bool(job.get("bf16"))}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    def step() -> float:
        batch = dataset.batch(sampler.next_batch())
        x, y = batch.inputs, batch.targets
        logits = engine(x)
        logits = getattr(logits, "logits", logits)  # HF models return an output object
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return mean.item() / world

    losses = []
    if "load_dir" in job:
        _, client_state = engine.load_checkpoint(job["load_dir"])
        for _ in range(engine.global_steps):  # the data position of the loaded step
            sampler.next_step()
    else:
        losses = [step() for _ in range(job["steps"])]
        engine.save_checkpoint(job["save_dir"])
    losses += [step() for _ in range(job["continue_steps"])]
    if rank == 0:
        with open(job["out"], "w") as fh:
            json.dump({"losses": losses, "global_steps": engine.global_steps}, fh)


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    for job in json.loads(open(sys.argv[1]).read()):
        run_job(job)
        dist.barrier()


if __name__ == "__main__":
    main()
