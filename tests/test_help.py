"""Every command's --help: each flag has a description, and each flag that takes a value says its default
(or that it is required); flags a command refuses are not listed. Config files get the flags' type and range
checks, naming the file and key."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# every entry script: the files that run their main through run_cli
COMMANDS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*/*.py")
                  if "tests" not in p.parts and "run_cli(main)" in p.read_text())


def help_entries(text: str) -> dict[str, tuple[bool, str]]:
    """argparse --help -> {flag: (takes a value, description)}."""
    out, cur = {}, None
    for line in text.split("\n"):
        m = re.match(r"^  (-\w, )?(--[\w-]+)( [^ ].*?)?(  +(.*))?$", line)
        if m and not line.startswith("   "):
            cur = m.group(2)
            takes_value = bool(m.group(3)) and not m.group(3).startswith(" ,")
            out[cur] = (takes_value, (m.group(5) or "").strip())
        elif cur and line.startswith("    ") and line.strip():
            v, d = out[cur]
            out[cur] = (v, (d + " " + line.strip()).strip())
        elif not line.strip() or not line.startswith(" "):
            cur = None
    return out


def run_help(path):
    p = subprocess.run([sys.executable, str(ROOT / path), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_parser_reads_argparse_help():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--a-flag", type=int, default=3, help="what it does; default: 3")
    ap.add_argument("--bare", type=int)
    ap.add_argument("--switch", action="store_true", help="on or off")
    ap.add_argument("--choice", choices=["x", "y"], help="one of two; " + "long words " * 12 + "default: x")
    e = help_entries(ap.format_help())
    assert e["--a-flag"] == (True, "what it does; default: 3")
    assert e["--bare"] == (True, "") and e["--switch"] == (False, "on or off")
    assert e["--choice"][1].endswith("default: x") and e["--choice"][0]


def test_commands_are_found():
    assert {"train/pretrain.py", "sft/train_sft.py", "infer/chat.py", "data/prepare.py",
            "bench/kernel_bench.py"} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS)
def test_every_flag_has_a_description_and_a_default_in_words(path):
    entries = help_entries(run_help(path))
    assert len(entries) > 1
    missing = [f for f, (_, d) in entries.items() if f != "--help" and len(d) < 12]
    assert not missing, f"{path}: flags without a description: {missing}"
    no_default = [f for f, (v, d) in entries.items()
                  if v and not re.search(r"\bdefault\b|\brequired\b", d, re.I)]
    assert not no_default, f"{path}: flags that take a value but do not say their default: {no_default}"


def test_fine_tuning_does_not_list_what_it_refuses():
    sft, dpo = help_entries(run_help("sft/train_sft.py")), help_entries(run_help("sft/train_dpo.py"))
    pre = help_entries(run_help("train/pretrain.py"))
    assert "--preset" in pre and "--preset" not in sft and "--preset" not in dpo and "--tokens" not in sft
    assert "--z-loss" in sft and "--z-loss" not in dpo and "--beta" in dpo and "--beta" not in sft
    assert "default: 0.0003" in sft["--lr"][1] and "default: 0.0001" in dpo["--lr"][1]
    assert "required" in sft["--init"][1]


def run_cmd(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("suffix,body,needle", [
    (".toml", 'lr = "abc"\n', "lr = 'abc': expected a number"),
    (".toml", "max_steps = 2.5\n", "max_steps = 2.5: expected an integer"),
    (".json", '{"fp8": "yes"}', "fp8 = 'yes': expected true or false"),
    (".json", '{"batch-size": -4}', "batch_size -4: expected >= 0"),
    (".toml", 'schedule = "linear"\n', "schedule 'linear': expected one of cosine, wsd, constant"),
    (".toml", "keep_last = 0\n", "keep_last 0: expected >= 1"),
    (".toml", "lrr = 1e-3\n", "unknown options ['lrr']"),
])
def test_bad_config_value_is_one_line_naming_file_and_key(tmp_path, suffix, body, needle):
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(body)
    p = run_cmd([str(ROOT / "train/pretrain.py"), "--config", str(cfg), "--out", str(tmp_path / "run")], tmp_path)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and str(cfg) in err[0] and needle in err[0], p.stderr
    assert not (tmp_path / "run").exists()


def test_config_values_are_typed_like_flags_and_flags_override_them(tmp_path):
    from train.options import TrainOptions, add_arguments, options_from_args
    import argparse
    cfg = tmp_path / "c.toml"
    cfg.write_text('max_steps = 2e3\ntokens = "2_000_000"\nlr = 1\nfp8 = true\nwarmup = 10\n')
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    o = options_from_args(ap.parse_args(["--config", str(cfg), "--warmup", "5"]))
    assert (o.max_steps, o.tokens, o.lr, o.fp8, o.warmup) == (2000, 2_000_000, 1.0, True, 5)
    assert type(o.max_steps) is int and type(o.lr) is float


def test_fine_tuning_config_refuses_a_refused_option(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"preset": "26m"}')
    p = run_cmd([str(ROOT / "sft/train_sft.py"), "--config", str(cfg), "--init", str(tmp_path)], tmp_path)
    assert p.returncode == 2 and "preset is not an option of this command" in p.stderr and str(cfg) in p.stderr
