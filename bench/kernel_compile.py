"""Compile every Triton kernel in kernels/ for A100 (sm_80), RTX 4090 (sm_89), H100/H200 (sm_90) and RTX 5090
(sm_120) on a machine with no GPU, with the launch configurations the launchers choose for every preset's
shapes, and check each against the target's limits: it compiles, 0 bytes of local memory (spills), shared
memory within the per-block limit, registers x threads within the register file; occupancy (blocks per SM)
is reported. The last stdout line is one JSON document; a broken limit is one `error:` line and exit 2.

    python bench/kernel_compile.py                                   # everything (the CI check)
    python bench/kernel_compile.py --presets tiny --targets sm_90 --dtypes bf16 --rows 4096
    python bench/kernel_compile.py --write-readme                    # regenerate kernels/README.md's table
    python bench/kernel_compile.py --config "_rms_norm_fwd_kernel:BLOCK_M=64,BLOCK_N=16384,num_warps=4"
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "kernels" / "README.md"
BEGIN, END = "<!-- kernel_compile table: begin -->", "<!-- kernel_compile table: end -->"

# Per compute capability, from the CUDA C++ Programming Guide's table of technical specifications:
# shared memory per block (opt-in maximum) and per SM, resident threads and blocks per SM. Every target
# has 64K 32-bit registers per SM and per block, allocated per warp in units of 256.
LIMITS = {
    80: dict(smem_block=163 * 1024, smem_sm=164 * 1024, threads_sm=2048, blocks_sm=32),
    89: dict(smem_block=99 * 1024, smem_sm=100 * 1024, threads_sm=1536, blocks_sm=24),
    90: dict(smem_block=227 * 1024, smem_sm=228 * 1024, threads_sm=2048, blocks_sm=32),
    120: dict(smem_block=99 * 1024, smem_sm=100 * 1024, threads_sm=1536, blocks_sm=32),
}
REGS_SM, REG_UNIT, SMEM_RESERVED = 65536, 256, 1024      # 1 KB of shared memory per block is the system's
DTYPES = ("bf16", "fp16", "fp32")
ROWS = (4096, 65536, 64, 7, 1)                  # row counts (tokens), a training step's first (see main)
VOCABS = (4096, 32000, 50257, 128256, 151936)   # besides the presets' own: Llama-2, GPT-2, Llama-3, Qwen2


# ----------------------------------------------------------------------------- the configurations
@dataclass
class Case:
    """One compile: a kernel (module, name), a dtype label, its launch and its data arguments. `args` maps
    each non-constexpr argument to a pointer element type (str) or an example scalar value (int/float)."""
    module: str
    kernel: str
    dtype: str
    launch: object
    args: dict


def _dtype_pairs(dtypes):
    """(activation dtype, weight dtype): pure low precision, and bf16/fp16 activations with fp32 weights
    (autocast training keeps fp32 master weights)."""
    return [(d, d) for d in dtypes] + [(d, "fp32") for d in dtypes if d != "fp32"]


def cases(presets, dtypes, rows, target):
    """Every launch the launchers make for these presets' shapes on `target`, as Cases (duplicates included)."""
    from kernels.cross_entropy import cross_entropy_config  # noqa: PLC0415  (kernels import after env set-up)
    from kernels.rms_norm import rms_norm_bwd_config, rms_norm_fwd_config  # noqa: PLC0415
    from kernels.rope import rope_config  # noqa: PLC0415
    from kernels.swiglu import swiglu_config  # noqa: PLC0415
    from model.config import get_preset  # noqa: PLC0415

    out = []
    cfgs = [get_preset(p) for p in presets]
    for c in cfgs:
        for N in (c.n_embd, c.head_dim):                                  # block norms; q/k norms (qk_norm)
            for M in rows:
                for x, w in _dtype_pairs(dtypes):
                    out.append(Case("kernels.rms_norm", "_rms_norm_fwd_kernel", f"{x}/w:{w}",
                                    rms_norm_fwd_config(M, N, target),
                                    dict(X=x, W=w, Y=x, RSTD="fp32", M=M, N=N, stride_x=N, stride_y=N, eps=1e-6)))
                    out.append(Case("kernels.rms_norm", "_rms_norm_bwd_kernel", f"{x}/w:{w}",
                                    rms_norm_bwd_config(M, N, target),
                                    dict(DY=x, X=x, W=w, RSTD="fp32", DX=x, DW_PART="fp32", M=M, N=N,
                                         stride_dy=N, stride_x=N, stride_dx=N)))
        D, D2 = c.head_dim, c.head_dim // 2
        for H in (c.n_head, c.n_kv_head):
            for T in (c.max_seq_len, 1):                                   # a training sequence; a decode step
                for R in sorted({T, *(r for r in rows if r >= T and r % T == 0)}):
                    for backward, cs_grad in ((False, False), (True, False), (True, True)):
                        for x in dtypes:
                            out.append(Case("kernels.rope", "_rope_kernel", x,
                                            rope_config(R, H, D2, target, backward, cs_grad),
                                            dict(X=x, COS="fp32", SIN="fp32", Y=x, DCS="fp32" if cs_grad else x,
                                                 DYX=x, R=R, T=T, H=H, D2=D2, sxb=T * H * D, sxt=H * D, sxh=D,
                                                 sxd=1, syb=T * H * D, syt=H * D, syh=D, syd=1, sct=D2, sst=D2)))
        for M in rows:
            n = M * c.ffn_hidden
            for x in dtypes:
                out.append(Case("kernels.swiglu", "_swiglu_fwd_kernel", x, swiglu_config(n, target),
                                dict(G=x, U=x, Y=x, n=n)))
                out.append(Case("kernels.swiglu", "_swiglu_bwd_kernel", x, swiglu_config(n, target),
                                dict(DY=x, G=x, U=x, DG=x, DU=x, n=n)))
    for V in sorted({c.vocab_size for c in cfgs} | set(VOCABS)):
        for N in rows:
            for write_grad in (False, True):
                for x in dtypes:
                    out.append(Case("kernels.cross_entropy", "_cross_entropy_fwd_kernel", x,
                                    cross_entropy_config(N, V, target, write_grad),
                                    dict(X=x, TGT="i64", LOSS="fp32", DX=x, N_VALID="i64", N=N, V=V, stride_x=V,
                                         stride_dx=V if write_grad else 0, ignore_index=-100, z_loss=0.0)))
    return out


def specialise(fn, case):
    """(signature, constexprs, attrs) as Triton's launcher builds them from real arguments: pointers are
    16-byte aligned (fresh allocations), an int equal to 1 becomes a constexpr, one divisible by 16 gets
    that divisibility attribute, floats are fp32."""
    sig, consts, attrs = {}, {}, {}
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        if p.is_constexpr:
            sig[name], consts[name] = "constexpr", case.launch.constexprs[name]
            continue
        if name not in case.args:
            raise FurnaceError(f"kernel_compile: the case for {case.kernel} has no value for argument {name!r}; "
                               "update cases() in bench/kernel_compile.py to match the kernel")
        v = case.args[name]
        if isinstance(v, str):
            sig[name] = "*" + v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def describe(case, sig, attrs) -> str:
    """The launch config, then how the data arguments were specialised (ints equal to 1; ints not divisible
    by 16), e.g. "BLOCK_M=4 BLOCK_N=1024 num_warps=8 num_stages=3 M=1 not16:V,stride_x"."""
    l = case.launch
    ints = [(i, n) for i, n in enumerate(sig) if not isinstance(case.args.get(n, ""), (str, float))]
    ones = [f"{n}=1" for _, n in ints if sig[n] == "constexpr"]
    odd = [n for i, n in ints if sig[n] != "constexpr" and (i,) not in attrs]
    return " ".join([f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in l.constexprs.items()]
                    + [f"num_warps={l.num_warps}", f"num_stages={l.num_stages}"] + ones
                    + ([f"not16:{','.join(odd)}"] if odd else []))


# ----------------------------------------------------------------------------- compiling one (in a worker)
def _resource_usage(cubin: bytes) -> dict:
    """cuobjdump --dump-resource-usage (bundled with Triton's wheel) on one cubin: REG, SHARED, LOCAL, STACK."""
    import triton  # noqa: PLC0415

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in (kv.split(":")[:2] for kv in line.split() if kv.split(":")[0] in
                                   ("REG", "SHARED", "LOCAL", "STACK"))}


def compile_one(job):
    """job: (module, kernel, signature, constexprs, attrs, num_warps, num_stages, arch) -> measurements."""
    module, kernel, sig, consts, attrs, num_warps, num_stages, arch = job
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    fn = getattr(importlib.import_module(module), kernel)
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001  (a compile failure is this check's result, reported per config)
        first = str(e).strip().splitlines()[:1] or [type(e).__name__]
        return dict(error=f"does not compile ({type(e).__name__}: {first[0][:200]})")
    use = _resource_usage(k.asm["cubin"])
    return dict(regs=use["REG"], local=use["LOCAL"] + use["STACK"], shared=k.metadata.shared + use["SHARED"])


def judge(r: dict, arch: int, threads: int) -> dict:
    """Add limit checks and occupancy to one compile's measurements."""
    lim = LIMITS[arch]
    if "error" in r:
        return dict(r, ok=False, failures=[r["error"]])
    fails = []
    if r["local"]:
        fails.append(f"{r['local']} bytes of local memory per thread (spilled registers; limit 0)")
    if r["shared"] > lim["smem_block"]:
        fails.append(f"shared memory {r['shared']} B > the per-block limit {lim['smem_block']} B")
    if r["regs"] * threads > REGS_SM:
        fails.append(f"{r['regs']} registers x {threads} threads = {r['regs'] * threads} > {REGS_SM} (register file)")
    warp_regs = -(-r["regs"] * 32 // REG_UNIT) * REG_UNIT
    by = [lim["blocks_sm"], lim["threads_sm"] // threads, REGS_SM // (warp_regs * threads // 32)]
    if r["shared"]:
        by.append(lim["smem_sm"] // (r["shared"] + SMEM_RESERVED))
    return dict(r, ok=not fails, failures=fails, blocks_per_sm=max(0, min(by)))


# ----------------------------------------------------------------------------- the run
def parse_config(text: str):
    """"KERNEL:K=V,...,num_warps=N" -> (kernel, {constexpr overrides}, {num_warps/num_stages})."""
    kernel, _, rest = text.partition(":")
    over, opts = {}, {}
    try:
        for kv in filter(None, rest.split(",")):
            k, v = kv.split("=")
            (opts if k in ("num_warps", "num_stages") else over)[k.strip()] = int(v)
    except ValueError:
        raise FurnaceError(f"--config {text!r}: expected KERNEL:NAME=INT,...[,num_warps=N][,num_stages=N]") from None
    return kernel.strip(), over, opts


def kernel_names() -> list:
    """(module, name) of every @triton.jit kernel (names ending in _kernel) in kernels/."""
    import triton  # noqa: PLC0415

    found = []
    for f in sorted((ROOT / "kernels").glob("*.py")):
        mod = importlib.import_module(f"kernels.{f.stem}")
        found += [(mod.__name__, n) for n, v in vars(mod).items()
                  if isinstance(v, triton.runtime.jit.JITFunction) and n.endswith("_kernel") and v.__module__ == mod.__name__]
    return found


def _pick(text: str, allowed, flag: str, conv=str) -> list:
    vals = [conv(v) for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise FurnaceError(f"{flag} {text!r}: expected a comma-separated subset of {', '.join(map(str, allowed))}")
    return vals


def table(results) -> str:
    """Markdown: one row per kernel, a column per target: registers, local bytes, shared, blocks/SM (worst
    configuration of each, over all dtypes and configurations)."""
    kernels_, targets = sorted({r["kernel"] for r in results}), sorted({r["arch"] for r in results})
    head = "| kernel | configs | " + " | ".join(f"sm_{a}" for a in targets) + " |"
    lines = [head, "|" + "---|" * (2 + len(targets))]
    for k in kernels_:
        rows = [r for r in results if r["kernel"] == k]
        cells = []
        for a in targets:
            rs = [r for r in rows if r["arch"] == a and "regs" in r]
            if not rs:
                cells.append("does not compile")
                continue
            occ = sorted({r["blocks_per_sm"] for r in rs})
            cells.append(f"{max(r['regs'] for r in rs)} regs, {max(r['local'] for r in rs)} B spill, "
                         f"{max(r['shared'] for r in rs) / 1024:.1f} KB smem, {occ[0]}–{occ[-1]} blocks/SM")
        lines.append(f"| `{k}` | {len([r for r in rows if r['arch'] == targets[0]])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(results, meta) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise FurnaceError(f"{README}: the markers {BEGIN!r} and {END!r} are missing; put them where the table goes")
    body = (f"{BEGIN}\n<!-- generated by `python bench/kernel_compile.py --write-readme`; do not edit -->\n"
            f"Triton {meta['triton']}, {meta['compiles']} distinct compiles ({meta['configs']} per target). Each cell is "
            "the worst configuration: most registers per thread, most local (spill) bytes, most shared memory "
            "per block; fewest–most resident blocks per SM.\n\n" + table(results) + f"\n{END}")
    head, _, rest = text.partition(BEGIN)
    README.write_text(head + body + rest.partition(END)[2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="sm_80,sm_89,sm_90,sm_120", help="GPU architectures to compile for; default: sm_80,sm_89,sm_90,sm_120")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"kernel dtypes; default: {','.join(DTYPES)}")
    p.add_argument("--presets", default="", help="comma-separated presets (default: all)")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help=f"row (token) counts to take configurations for; default: {','.join(map(str, ROWS))}")
    p.add_argument("--kernels", default="", help="comma-separated kernel names (default: all in kernels/)")
    p.add_argument("--config", default="", help="check one explicit configuration instead: "
                   "KERNEL:NAME=INT,...,num_warps=N (the kernel's first case with these overrides); default: the full set")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes; default: all cores")
    p.add_argument("--write-readme", action="store_true", help="rewrite the table in kernels/README.md (full set only); default: off")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)        # compile for GPUs: kernels must not be built interpreted
    try:
        import triton  # noqa: PLC0415
    except ImportError as e:
        raise FurnaceError(f"kernel_compile needs Triton ({e}); pip install triton") from None
    from kernels.launch import GPUS  # noqa: PLC0415
    from model.config import PRESETS  # noqa: PLC0415

    targets = _pick(args.targets, list(GPUS), "--targets")
    dtypes = _pick(args.dtypes, DTYPES, "--dtypes")
    presets = _pick(args.presets, list(PRESETS), "--presets") if args.presets else list(PRESETS)
    rows = _pick(args.rows, range(1, 2**31), "--rows", int)
    all_kernels = kernel_names()
    names = _pick(args.kernels, [n for _, n in all_kernels], "--kernels") if args.kernels else [n for _, n in all_kernels]
    full = not (args.kernels or args.presets or args.config) and args.rows == ",".join(map(str, ROWS)) and \
        len(targets) == len(GPUS) and len(dtypes) == len(DTYPES)
    if args.write_readme and not full:
        raise FurnaceError("--write-readme needs the full set: drop --targets/--dtypes/--presets/--rows/--kernels/--config")
    if args.jobs < 1:
        raise FurnaceError(f"--jobs {args.jobs}: expected an integer >= 1")
    config = parse_config(args.config) if args.config else None
    if config and config[0] not in [n for _, n in all_kernels]:
        raise FurnaceError(f"--config: unknown kernel {config[0]!r}; expected one of {', '.join(n for _, n in all_kernels)}")

    t0 = time.time()
    meta = {}                            # config key -> (compile job, target name, case, description)
    covered, taken = set(), set()
    for tname in targets:
        target = GPUS[tname]
        for case in cases(presets, dtypes, rows, target):
            covered.add(case.kernel)
            if case.kernel not in names or (config and (case.kernel != config[0] or tname in taken)):
                continue
            if config:                   # the kernel's first case on this target, with the overrides
                taken.add(tname)
                from kernels.launch import Launch  # noqa: PLC0415
                opts = {"num_warps": case.launch.num_warps, "num_stages": case.launch.num_stages, **config[2]}
                case.launch = Launch(case.launch.grid, {**case.launch.constexprs, **config[1]}, **opts)
            fn = getattr(importlib.import_module(case.module), case.kernel)
            sig, consts, attrs = specialise(fn, case)
            job = (case.module, case.kernel, sig, consts, attrs, case.launch.num_warps, case.launch.num_stages,
                   target.arch)
            # one compile per launch configuration (dtype, constexprs, warps, stages, target), with the argument
            # specialisation of the first case that chose it: a training step's (rows and T come in that order)
            key = repr((case.kernel, case.dtype, case.launch.constexprs, job[5:]))
            if key not in meta:
                meta[key] = (job, tname, case, describe(case, sig, attrs))
    missing = sorted({n for _, n in all_kernels} - covered)
    if missing:
        raise FurnaceError(f"kernel_compile: no configurations for {', '.join(missing)}; add them to cases() in "
                           "bench/kernel_compile.py")
    keys = list(meta)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        measured = list(pool.map(compile_one, [meta[k][0] for k in keys], chunksize=4))
    results = []
    for k, m in zip(keys, measured):
        job, tname, case, desc = meta[k]
        r = judge(m, job[-1], 32 * job[5])
        results.append(dict(kernel=case.kernel, dtype=case.dtype, config=desc, target=tname,
                            arch=job[-1], threads=32 * job[5], **{x: r[x] for x in r if x != "error"}))
    fails = [r for r in results if not r["ok"]]
    per_target = len(results) // max(1, len(targets))
    report = dict(triton=triton.__version__, targets=targets, dtypes=dtypes, presets=presets, rows=rows,
                  compiles=len(results), configs=per_target, failed=len(fails), seconds=round(time.time() - t0, 1),
                  jobs=args.jobs, results=results)
    print(table(results))
    print(f"{len(results)} compiles ({per_target} configurations x {len(targets)} targets), {len(fails)} failed, "
          f"{report['seconds']} s with {args.jobs} processes")
    if args.write_readme and not fails:
        write_readme(results, report)
    print(json.dumps(report))
    if fails:
        f = fails[0]
        raise FurnaceError(f"kernel_compile: {len(fails)} of {len(results)} configurations break a limit; first: "
                           f"{f['kernel']} [{f['dtype']}; {f['config']}] on {f['target']}: {'; '.join(f['failures'])}")
    return 0


if __name__ == "__main__":
    run_cli(main)
