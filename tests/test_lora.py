"""LoRA: the adapter against its formula, step 0 = base, only adapters train, merge = unmerged, DPO's
reference with adapters off, PEFT parity on the exported LlamaForCausalLM, adapter-only checkpoints with
exact resume after SIGKILL, merge command, chat on an adapter run, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import train_bpe
from kernels.common import FurnaceError
from model import GPT, GPTConfig
from model.lora import (LoRAConfig, LoRALinear, adapters_disabled, apply_lora, merge,
                        parse_targets, validate)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
ALL = ["q", "k", "v", "o", "gate", "up", "down"]


def tiny(vocab=96, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                         max_seq_len=128, kernels="torch"))


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_adapter_is_the_lora_formula_with_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 32, bias=False)
    m = LoRALinear(base, rank=4, alpha=8.0)
    assert torch.count_nonzero(m.lora_B) == 0
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) on fan_in 48
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.8 * bound
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(3, 5, 48)
    want = x @ base.weight.T + 2.0 * (x @ m.lora_A.T @ m.lora_B.T)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_step0_equals_base_only_adapters_change_and_merge_equals_unmerged():
    from train.optim import build_optimizer
    base = tiny()
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = base(x)[0]
    model = apply_lora(tiny(), LoRAConfig(4, 8.0, 0.0, ALL))
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref)                        # B = 0: exactly the base
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * 2
    opt = build_optimizer(model, 1e-2, 0.1, "cpu")
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    for _ in range(2):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.endswith(("lora_A", "lora_B")), n       # lora_B moves from 0, A moves; base fixed
    with torch.no_grad():
        adapted = model(x)[0]
        merged = merge(model)(x)[0]
        with adapters_disabled(model):
            off = model(x)[0]
    assert not torch.allclose(adapted, ref)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(off, ref)                                    # DPO's reference: the base, same weights


def test_flag_validation():
    for args, msg in (((0, 16.0, 0.0, "nope"), None), ((-1, 16.0, 0.0, "q"), "--lora-rank -1"),
                      ((8, 0.0, 0.0, "q"), "--lora-alpha"), ((8, 16.0, 1.0, "q"), "--lora-dropout"),
                      ((8, 16.0, 0.0, "q,xyz"), "unknown target xyz")):
        if msg is None:
            validate(*args)                                         # rank 0 = off: other flags not looked at
        else:
            with pytest.raises(FurnaceError, match=msg):
                validate(*args)
    assert parse_targets("q, v,q") == ["q", "v"]


def test_peft_parity_on_exported_llama(tmp_path):
    peft = pytest.importorskip("peft")  # in the [test] extra
    from transformers import LlamaForCausalLM

    from infer.export_hf import export_hf, export_peft_adapter
    from model.io import save
    base = tiny()
    base_dir = save(base, tmp_path / "base-ckpt")
    model = apply_lora(tiny(), LoRAConfig(4, 8.0, 0.0, ALL, str(base_dir), ""))
    randomize_b(model)
    model.eval()
    hf_base = export_hf(tiny(), tmp_path / "hf" / "base")
    adapter_dir = export_peft_adapter(model, tmp_path / "hf" / "adapter", hf_base)
    llama = LlamaForCausalLM.from_pretrained(hf_base, torch_dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(llama, adapter_dir).eval()
    x = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        ours = model(x)[0]
        theirs = pm(input_ids=x).logits
        merged = merge(model)(x)[0]
        hf_merged = pm.merge_and_unload()(input_ids=x).logits
    assert (ours - tiny()(x)[0]).abs().max() > 1e-3                 # the adapters do change the logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(hf_merged, merged, rtol=0, atol=1e-5)


# ---- the commands ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    texts = ["def add(a, b):\n    return a + b\n", "Write Python. Add two numbers, then subtract them."] * 30
    return train_bpe(texts, vocab_size=320)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, tok):
    from model.io import save
    d = tmp_path_factory.mktemp("init")
    save(tiny(tok.vocab_size), d)
    tok.save(d)
    return d


GOOD = [{"conversations": [{"role": "user", "content": f"Add {i}."},
                           {"role": "assistant", "content": f"def add{i}(a):\n    return a + {i}"}]} for i in range(12)]
SMALL = ["--batch-size", "2", "--seq-len", "128", "--log-every", "1", "--warmup", "1", "--lr", "1e-2"]
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,v,gate,down", "--lora-dropout", "0.1"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def one_error(p, *parts):
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert all(s in err[0] for s in parts), err[0]


def test_lora_sft_adapter_checkpoints_resume_merge_chat_and_base_checks(tmp_path, init_ckpt):
    import shutil

    from model.io import load
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    common = ["sft/train_sft.py", "--init", init_ckpt, "--data", data, "--max-steps", "6", "--save-every", "2",
              *SMALL, *LORA]
    a = cli(*common, "--out", tmp_path / "a", "--merge", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at_step.py"), "3", *map(str, common),
                             "--out", str(tmp_path / "b")], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr
    b = cli(*common, "--out", tmp_path / "b", "--resume", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6

    ck = tmp_path / "a" / "checkpoints" / "step_00000006"
    assert not (ck / "model.safetensors").exists()
    from safetensors.torch import load_file
    sd = load_file(str(ck / "adapter.safetensors"))
    assert set(sd) == {f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in
                       ("attn.q_proj", "attn.v_proj", "mlp.gate_proj", "mlp.down_proj") for ab in "AB"}
    conf = json.loads((ck / "adapter_config.json").read_text())
    assert conf["base"] == str(init_ckpt.resolve()) and len(conf["base_sha256"]) == 64
    assert (ck / "adapter.safetensors").stat().st_size < (init_ckpt / "model.safetensors").stat().st_size / 4
    # --merge wrote a full checkpoint equal to the adapted model; the merge command writes the same weights
    m = cli("sft/merge_lora.py", tmp_path / "a", tmp_path / "merged2", cwd=tmp_path)
    assert m.returncode == 0, m.stderr
    full, again, adapted = load(tmp_path / "a" / "merged"), load(tmp_path / "merged2"), load(tmp_path / "a")
    x = torch.randint(0, full.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(full(x)[0], again(x)[0]) and torch.equal(full(x)[0], adapted(x)[0])
        assert not torch.allclose(full(x)[0], load(init_ckpt)(x)[0])
    c = cli("infer/chat.py", "--ckpt", tmp_path / "a", "--prompt", "Add 3.", "--max-new-tokens", "4", "--dtype",
            "fp32", "--compile", "off", cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    e = cli("infer/export_hf.py", tmp_path / "a", tmp_path / "hf", cwd=tmp_path)
    assert e.returncode == 0 and (tmp_path / "hf" / "adapter" / "adapter_model.safetensors").is_file(), e.stderr

    # the base changed, then moved: one line each, nothing written
    moved = tmp_path / "moved"
    shutil.copytree(init_ckpt, moved)
    w = init_ckpt / "model.safetensors"
    orig = w.read_bytes()
    try:
        sdb = load_file(str(w))
        sdb["norm.weight"] = sdb["norm.weight"] * 2
        from safetensors.torch import save_file
        save_file(sdb, str(w))
        one_error(cli("infer/chat.py", "--ckpt", tmp_path / "a", "--prompt", "x", cwd=tmp_path), "has changed",
                  str(init_ckpt))
        shutil.rmtree(init_ckpt)
        one_error(cli("sft/merge_lora.py", tmp_path / "a", tmp_path / "m3", cwd=tmp_path), "is gone", str(init_ckpt))
        assert not (tmp_path / "m3").exists()
    finally:
        if init_ckpt.exists():
            shutil.rmtree(init_ckpt)
        shutil.copytree(moved, init_ckpt)
        (init_ckpt / "model.safetensors").write_bytes(orig)


@pytest.mark.parametrize("flags, parts", [
    (["--lora-rank", "0", "--merge"], ["--merge"]),
    (["--lora-rank", "-2"], ["--lora-rank -2", "positive rank"]),
    (["--lora-rank", "8", "--lora-targets", "q,attn"], ["--lora-targets", "unknown target attn"]),
])
def test_bad_lora_flags_are_one_line(tmp_path, init_ckpt, flags, parts):
    p = cli("sft/train_sft.py", "--init", init_ckpt, "--out", tmp_path / "o", *flags, cwd=tmp_path)
    one_error(p, *parts)
    assert not (tmp_path / "o").exists()


def test_lora_dpo_reference_is_base_and_checkpoint_is_adapter_only(tmp_path, init_ckpt):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Add {i}.", "chosen": f"def f(a):\n    return a + {i}",
                                         "rejected": f"no {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "dpo"
    p = cli("sft/train_dpo.py", "--init", init_ckpt, "--data", pairs, "--max-steps", "3", *SMALL, *LORA,
            "--out", out, "--ref-cache", tmp_path / "cache", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    ls = losses(out)
    assert abs(ls[1] - math.log(2)) < 1e-5 and ls[3] < ls[1]        # policy == reference at step 0, then learns
    ck = out / "checkpoints" / "step_00000003"
    assert (ck / "adapter.safetensors").is_file() and not (ck / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["trainable_params"] == sum(
        t.numel() for t in __import__("safetensors.torch").torch.load_file(str(ck / "adapter.safetensors")).values())


def test_lora_with_activation_checkpointing_and_fp8_torchao(tmp_path, init_ckpt):
    """Verified combinations: --activation-checkpointing (same losses) and --fp8 --fp8-backend torchao on CPU
    (the frozen base Linear layers in float8, adapters high precision; losses within 2% of fp32)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    common = ["sft/train_sft.py", "--init", init_ckpt, "--data", data, "--max-steps", "3", *SMALL, *LORA]
    runs = {}
    for name, extra in (("plain", []), ("ckpt", ["--activation-checkpointing"]),
                        ("fp8", ["--fp8", "--fp8-backend", "torchao", "--fp8-strict"])):
        p = cli(*common, *extra, "--out", tmp_path / name, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        runs[name] = list(losses(tmp_path / name).values())
    assert runs["ckpt"] == pytest.approx(runs["plain"], rel=1e-5)
    assert runs["fp8"] == pytest.approx(runs["plain"], rel=2e-2) and runs["fp8"] != runs["plain"]
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["precision"]["fp8_layers"] > 0
