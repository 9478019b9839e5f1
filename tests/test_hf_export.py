"""``checkpoint export --to hf`` writes a folder ``transformers`` loads whole
(weights, config, generation config, tokenizer with EOS and a chat template)
and that ``scaletrain serve`` loads back; export and import refuse bad targets
and broken inputs with one ``error:`` line, writing nothing."""

from __future__ import annotations

import json

import pytest
import torch

from harness import run_cli
from serve_harness import make_tiny_run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, debug_config):
    root = tmp_path_factory.mktemp("export")
    run = make_tiny_run(root, debug_config)
    ckpt = run / "checkpoints" / "step_00000004"
    proc = run_cli(["checkpoint", "export", str(ckpt), "--to", "hf", str(root / "hf")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "ckpt": ckpt, "hf": root / "hf"}


def test_exported_tokenizer_is_the_byte_tokenizer_with_eos_and_chat_template(exported):
    from scaletrain.data.chat import render_default_chat
    from scaletrain.data.tokenizer import ByteTokenizer

    tok = transformers.AutoTokenizer.from_pretrained(str(exported["hf"]))
    text = "héllo\n\tdef f(x): return 'ü€🎉'  "
    assert tok.encode(text) == ByteTokenizer().encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ByteTokenizer.eos_id
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_default_chat(messages)
    assert json.loads((exported["hf"] / "generation_config.json").read_text())["eos_token_id"] == 256


def test_hf_generate_on_the_export_equals_serving_it(exported):
    from scaletrain.serve.engine import Engine, EngineConfig, run_to_completion
    from scaletrain.serve.kv_cache import KVCache
    from scaletrain.serve.loader import load_model

    hf = transformers.LlamaForCausalLM.from_pretrained(str(exported["hf"])).eval()
    for source in (exported["ckpt"], exported["hf"]):  # serve loads both the checkpoint and the HF folder
        loaded = load_model(source)
        assert loaded.eos_id == 256
        cfg = loaded.model.cfg
        cache = KVCache(cfg.n_layers, 64, 8, cfg.n_kv_heads, cfg.dim // cfg.n_heads, torch.float32)
        engine = Engine(loaded.model, cache, EngineConfig(64, 8), None, loaded.tokenizer.decode)
        prompts = [list(b"def main():\n"), list(b"import os")]
        ours = run_to_completion(engine, prompts, 16)
        for prompt, tokens in zip(prompts, ours):
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            assert out[0, len(prompt):].tolist() == tokens


def test_bpe_tokenizer_is_exported_as_is(tmp_path):
    from scaletrain.checkpoint.hf_tokenizer import write_hf_tokenizer
    from scaletrain.data.tokenizer import HFTokenizer, train_bpe

    docs = [f"def function_{i}(x):\n    return x * {i}\n" for i in range(200)]
    path = train_bpe(iter(docs), 300, tmp_path / "tokenizer.json", show_progress=False)
    ours = HFTokenizer(path)
    out = tmp_path / "out"
    out.mkdir()
    write_hf_tokenizer(ours, out, 128)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.encode(docs[7]) == ours.encode(docs[7]) and tok.eos_token_id == ours.eos_id


def test_export_refuses_a_file_or_a_non_empty_folder_without_force(exported):
    target_file = exported["root"] / "a-file"
    target_file.write_text("keep me")
    taken = exported["root"] / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me too")
    for target in (target_file, taken):
        proc = run_cli(["checkpoint", "export", str(exported["ckpt"]), "--to", "hf", str(target)], timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert target_file.read_text() == "keep me" and sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    proc = run_cli(["checkpoint", "export", str(exported["ckpt"]), "--to", "hf", str(taken), "--force"], timeout=120)
    assert proc.returncode == 0 and (taken / "model.safetensors").is_file() and (taken / "tokenizer.json").is_file()


def test_import_refuses_broken_or_mismatched_safetensors(exported, debug_config):
    import shutil

    root = exported["root"]
    broken, mismatched = root / "broken", root / "mismatched"
    for folder in (broken, mismatched):
        shutil.copytree(exported["hf"], folder)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) // 2])  # truncated
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] = 2 * config["intermediate_size"]
    (mismatched / "config.json").write_text(json.dumps(config))
    for folder in (broken, mismatched):
        out = root / f"imported-{folder.name}"
        proc = run_cli(["checkpoint", "import", str(folder), str(out), "--config", str(debug_config)], timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(f".{out.name}")]
