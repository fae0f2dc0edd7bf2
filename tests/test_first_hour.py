"""What a newcomer runs first and sees: kernel_bench's defaults (measured), a pretraining run's output and files,
the progress bar's ETA on a terminal, the default folder when taken, SFT's chat sample, DPO's plot panels,
merge_lora's --dtype, the example configs and silenced torchao noise."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Two stdlib modules prepared with a 300-token BPE, half of them held out."""
    import string
    import textwrap
    from data import prepare
    src = tmp_path_factory.mktemp("src")
    for mod in (string, textwrap):
        (src / f"{mod.__name__}.py").write_text(Path(mod.__file__).read_text())
    out = tmp_path_factory.mktemp("data") / "small"
    prepare(out, sources=[str(src)], tokenizer="train:300", val_fraction=0.5, progress=False)
    return out


@pytest.fixture(scope="module")
def chat_init(tmp_path_factory):
    """A random tiny model with a tokenizer that has the chat tokens: what SFT, DPO and LoRA start from."""
    from data import train_bpe
    from model import GPT, GPTConfig
    from model.io import save
    tok = train_bpe(["def add(a, b):\n    return a + b\n", "Write Python. Add two numbers."] * 30, vocab_size=320)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("init")
    save(GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                       max_seq_len=128, kernels="torch")), d)
    tok.save(d)
    return d


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CONVS = [{"conversations": [{"role": "user", "content": f"Add {i}."},
                            {"role": "assistant", "content": f"def add{i}(a):\n    return a + {i}"}]} for i in range(12)]
SMALL = ["--batch-size", "2", "--seq-len", "128", "--log-every", "1", "--warmup", "1"]


def test_kernel_bench_default_peak_memory_is_under_2_gb():
    """No arguments on a CPU: the process and its largest child together (an upper bound on the machine's
    peak: the memory children run one at a time) stay under 2 GB, measured by the kernel's own rusage."""
    p = subprocess.run([sys.executable, str(ROOT / "bench/kernel_bench.py")], capture_output=True, text=True,
                       timeout=600, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    peak = report["peak_rss_mib"]
    assert peak["largest_child"] > 200                     # the materialised-logits child really ran
    assert peak["self"] + peak["largest_child"] < 2048, peak
    mem = report["memory"]
    assert mem["fused_mib"] < mem["materialised_mib"] and abs(mem["fused_loss"] - mem["materialised_loss"]) < 1e-3
    assert "--memory-shape 8192,768,49152" in subprocess.run(
        [sys.executable, str(ROOT / "bench/kernel_bench.py"), "--help"], capture_output=True, text=True).stdout


def test_a_workers_peak_memory_is_its_own_not_its_parents():
    """bench.common.peak_rss_bytes in a worker started by a parent holding 800 MB: Linux's ru_maxrss carries the
    parent's high-water mark into the exec'd child (this failed CI once: kernel_bench under pytest reported
    pytest's 946 MB as its own); VmHWM is the worker's own peak."""
    hold = bytearray(800 * 2**20)
    hold[::4096] = b"\x01" * len(hold[::4096])                  # touch every page: resident
    code = ("import resource, json; from bench.common import peak_rss_bytes; "
            "print(json.dumps([peak_rss_bytes() / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    own, inherited = json.loads(p.stdout)
    del hold
    assert inherited > 800                                     # the trap is real on this kernel
    assert own < 200, own                                      # a bare interpreter + bench.common


def test_a_pretraining_run_as_a_newcomer_sees_it(tmp_path, small_data):
    """Defaults: validation at the start and the end (automatic cadence) with a sample of a fixed prompt each
    time (samples.jsonl), a short summary on stderr and nothing on stdout, summary.json, loss.png; every
    output file has the mode the umask gives (safetensors alone would write 0600); --keep-weights-only
    strips the trainer state of the older checkpoints only."""
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "train/pretrain.py"), "--data", str(small_data), "--out",
                        str(run), "--max-steps", "12", "--batch-size", "2", "--seq-len", "64", "--save-every", "4",
                        "--keep-weights-only", "--sample-prompt", "def f(x):"],
                       capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o027),
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""                                         # logs go to stderr
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 12]
    samples = [json.loads(ln) for ln in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 12] and {s["prompt"] for s in samples} == {"def f(x):"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 2 * 64 and summary["interrupted"] is False
    assert f"done: 12 steps, {12 * 2 * 64:,} tokens in " in p.stderr and f"plots: {run / 'loss.png'}" in p.stderr
    assert "done: {" not in p.stderr and (run / "loss.png").stat().st_size > 1000
    cks = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in cks] == ["step_00000004", "step_00000008", "step_00000012"]
    assert [(c / "trainer_state.json").exists() for c in cks] == [False, False, True]
    assert [(c / "trainer_state.safetensors").exists() for c in cks] == [False, False, True]
    from model.fileio import verify_checksums
    for c in cks:
        verify_checksums(c, required=True)                    # rewritten where the state was dropped
    assert all((c / "model.safetensors").is_file() for c in cks)
    files = [f for f in run.rglob("*") if f.is_file()]
    modes = {str(f.relative_to(run)): oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o640"}, modes


def test_example_configs_parse_and_validate():
    """configs/*.toml: every key a real option of the right type and range, the preset real, the sequence
    within its context, and each file named in the README."""
    import argparse
    from model.config import get_preset
    from train.options import add_arguments, options_from_args
    files = sorted((ROOT / "configs").glob("*.toml"))
    assert {f.name for f in files} >= {"cpu-demo.toml", "112m-rtx4090.toml", "0.5b-h100.toml"}
    readme = (ROOT / "README.md").read_text()
    for f in files:
        ap = argparse.ArgumentParser()
        add_arguments(ap)
        o = options_from_args(ap.parse_args(["--config", str(f)]))
        assert o.preset and o.seq_len <= get_preset(o.preset).max_seq_len, f
        assert f"configs/{f.name}" in readme


def test_torchao_import_noise_is_silenced_and_the_fp8_path_is_said():
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from train.precision import decide_precision\n"
            "decide_precision(torch.device('cpu'), '', True, 'torchao', True)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Failed to load" not in p.stderr and "Enum subclass" not in p.stderr, p.stderr
    assert "FP8 via torchao" in p.stderr
    raw = subprocess.run([sys.executable, "-c", "import torchao.float8"], capture_output=True, text=True, timeout=300)
    assert "Failed to load" in raw.stderr or "Enum subclass" in raw.stderr  # the noise exists without the guard


def test_the_progress_bar_on_a_terminal_shows_its_eta(tmp_path, small_data):
    """stderr on a pseudo-terminal (160 columns): tqdm's bar, whose [elapsed<remaining] is the ETA, and every log
    line printed on a line of its own, never into the bar."""
    import fcntl
    import pty
    import re
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a size, as a terminal has
    proc = subprocess.Popen([sys.executable, str(ROOT / "train/pretrain.py"), "--data", str(small_data), "--out",
                             str(tmp_path / "run"), "--max-steps", "6", "--batch-size", "2", "--seq-len", "64",
                             "--sample-prompt", "none"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, env=ENV)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 600)
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    bars = re.findall(r"train:\s+\d+%\|.*?\| (\d+)/6 \[(\d\d:\d\d)<(\d\d:\d\d|\?)", text)
    assert [b for b in bars if b[0] == "3" and b[2] != "?"], text     # mid-run: a remaining time is shown
    for msg in ("model: tiny", "checkpoints: ~", "kernels: ", "step 0 | val_loss", "step 6 | val_loss", "done: 6 steps"):
        at = text.index(msg)
        assert text[at - 1] in "\r\n", text[max(0, at - 80):at + 20]            # not after a bar's text


def test_a_taken_default_folder_is_said_and_next_names_the_new_one(tmp_path, small_data):
    """No --out: the first run writes runs/tiny-small, the second runs/tiny-small-2, says so, and its `next:`
    line points at runs/tiny-small-2."""
    args = [sys.executable, str(ROOT / "train/pretrain.py"), "--data", str(small_data), "--max-steps", "1",
            "--batch-size", "2", "--seq-len", "64", "--sample-prompt", "none"]
    first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert first.returncode == 0, first.stderr
    assert "next: python sft/train_sft.py --init runs/tiny-small " in first.stderr and "already holds" not in first.stderr
    second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert second.returncode == 0, second.stderr
    assert "out: runs/tiny-small already holds a run: this one goes to runs/tiny-small-2" in second.stderr
    nxt = [ln for ln in second.stderr.splitlines() if ln.startswith("next:")]
    assert nxt == [f"next: python sft/train_sft.py --init runs/tiny-small-2   (or try it: python infer/chat.py "
                   f"--ckpt runs/tiny-small-2 --complete)"]
    assert (tmp_path / "runs" / "tiny-small-2" / "checkpoints" / "step_00000001").is_dir()


def test_sft_samples_the_fixed_chat_prompt_through_the_template(tmp_path, chat_init):
    """samples.jsonl: at the start and the end, the fixed user message rendered as ChatML (written out here by
    hand) with the assistant's header open, and the model's reply."""
    from sft.common import SAMPLE_PROMPT
    data = write_jsonl(tmp_path / "d.jsonl", CONVS)
    out = tmp_path / "sft"
    p = subprocess.run([sys.executable, str(ROOT / "sft/train_sft.py"), "--init", str(chat_init), "--data", str(data),
                        "--out", str(out), "--max-steps", "2", *SMALL], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    chatml = f"<|im_start|>user\n{SAMPLE_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert [s["step"] for s in samples] == [0, 2] and all(s["prompt"] == chatml for s in samples), samples
    assert all(isinstance(s["text"], str) and "<|im_end|>" not in s["text"] for s in samples)  # stopped there
    assert f"sample at step 2: {chatml!r} -> " in p.stderr


def test_dpo_plot_has_reward_accuracy_and_margin_panels(tmp_path, chat_init, monkeypatch):
    """The figure train_dpo saves as loss.png (caught at savefig on the real path): loss, reward accuracy and
    margin (each with its train and held-out curves), learning rate and throughput."""
    from matplotlib.figure import Figure
    import sft.train_dpo
    saved = {}
    real_savefig = Figure.savefig

    def spy(fig, fname, *a, **kw):
        saved[Path(fname).name] = fig
        return real_savefig(fig, fname, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    pairs = [{"prompt": f"Add {i}.", "chosen": f"def f(a):\n    return a + {i}", "rejected": "no"} for i in range(24)]
    data, val = write_jsonl(tmp_path / "p.jsonl", pairs[:20]), write_jsonl(tmp_path / "v.jsonl", pairs[20:])
    out = tmp_path / "dpo"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sft.train_dpo.main(["--init", str(chat_init), "--data", str(data), "--val-data", str(val), "--out", str(out), "--max-steps", "3",
                            "--ref-cache", str(tmp_path / "cache"), "--batch-size", "2", "--seq-len", "64"])
    finally:
        torch.set_num_threads(n)
    fig = saved["loss.png"]
    assert (out / "loss.png").stat().st_size > 1000
    panels = {ax.get_title(loc="left"): sorted(line.get_label() for line in ax.get_lines()) for ax in fig.axes}
    assert panels == {"loss": ["train", "val"], "reward accuracy (DPO)": ["train", "val"],
                      "reward margin (DPO)": ["train", "val"], "learning rate": ["lr"], "throughput": ["units/s"]}
    acc = next(ax for ax in fig.axes if ax.get_title(loc="left") == "reward accuracy (DPO)")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_line = next(line for line in acc.get_lines() if line.get_label() == "train")
    assert list(train_line.get_ydata()) == pytest.approx([r["reward_acc"] for r in recs if "reward_acc" in r])


def test_merge_lora_dtype_casts_the_fp32_merge(tmp_path, chat_init):
    """sft/merge_lora.py --dtype bf16: every merged weight is bf16 and equals the fp32 merge rounded to bf16
    (within bf16's half-ulp of it); the fp32 merge equals W + B @ A * alpha / r computed here in fp64."""
    from safetensors.torch import load_file
    data = write_jsonl(tmp_path / "d.jsonl", CONVS)
    run = tmp_path / "lora"
    p = subprocess.run([sys.executable, str(ROOT / "sft/train_sft.py"), "--init", str(chat_init), "--data", str(data),
                        "--out", str(run), "--max-steps", "2", "--lr", "1e-2", "--lora-rank", "4", "--lora-alpha", "8",
                        *SMALL], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr
    for dtype in ("fp32", "bf16"):
        m = subprocess.run([sys.executable, str(ROOT / "sft/merge_lora.py"), str(run), str(tmp_path / dtype), "--dtype",
                            dtype], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
        assert m.returncode == 0, m.stderr
    f32, b16 = load_file(str(tmp_path / "fp32" / "model.safetensors")), load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert set(f32) == set(b16)
    assert {v.dtype for v in f32.values()} == {torch.float32} and {v.dtype for v in b16.values()} == {torch.bfloat16}
    for k in f32:
        assert torch.equal(b16[k], f32[k].to(torch.bfloat16)), k
        torch.testing.assert_close(b16[k].float(), f32[k], rtol=2 ** -8, atol=0), k
    # the fp32 merge against the formula, from the adapter file and the base weights
    ck = sorted((run / "checkpoints").iterdir())[-1]
    conf = json.loads((ck / "adapter_config.json").read_text())
    ad, base = load_file(str(ck / "adapter.safetensors")), load_file(str(chat_init / "model.safetensors"))
    scale = conf["alpha"] / conf["rank"]
    mods = {k[:-len(".lora_A")] for k in ad if k.endswith(".lora_A")}
    assert mods and any(ad[f"{m}.lora_B"].abs().sum() > 0 for m in mods)   # trained: B moved off zero
    for mod in mods:
        want = base[f"{mod}.weight"].double() + ad[f"{mod}.lora_B"].double() @ ad[f"{mod}.lora_A"].double() * scale
        torch.testing.assert_close(f32[f"{mod}.weight"].double(), want, rtol=1e-6, atol=1e-6)
