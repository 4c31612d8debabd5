"""backbones/pdl.py without a GPU: Triton compiles each of our kernels for Hopper (sm_90; its ptxas
ships with Triton) and the PTX is read in program order. Launched dependent, a kernel runs while its
predecessor still does, so before `griddepcontrol.wait` it may read weights only (the GEMVs' first
run of them, streamed evict-first: no other load of ours carries that hint), or, for the Mamba-2
step, its state (written two kernels before at the latest), and write nothing;
`launch_dependents` comes after the wait. Compiled without PDL there is no griddepcontrol at all.
(On a GPU, test_graph_engine.py's cuda test checks that dependent launches give the serial
launches' tokens, logits and states bit for bit.)"""

import re

import pytest

triton = pytest.importorskip("triton")

FP32 = {"ml_ptr", "acc_ptr", "ss_ptr", "alog_ptr", "d_ptr", "dtb_ptr"}
BOOL = {"valid_ptr", "wr_ptr", "al_ptr"}
FLOATS = {"eps", "scaling", "dt_min", "dt_max"}
MEMORY = re.compile(r"^\s*(@%p\d+\s+)?(ld|st|cp\.async|atom|red)\.(global|shared::cluster)")


def _ptx(fn, consts, pdl, fp32_out=()):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts, PDL=pdl)
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = ("*fp32" if n in FP32 or n in fp32_out else "*i1" if n in BOOL else "*i64" if n == "slot_ptr"
                      else "*i32" if n == "cnt_ptr" else "*bf16")
        else:
            sig[n] = "fp32" if n in FLOATS else "i32"
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, launch_pdl=pdl))
    except (RuntimeError, FileNotFoundError, ImportError) as e:  # no CUDA backend / ptxas in this Triton
        pytest.skip(f"Triton cannot compile for sm_90 here: {e}")
    return k.asm["ptx"].splitlines()


def _kernels():
    from meestral.backbones import decode_attention, gemv_kernels, mamba2_kernels

    att = decode_attention.kernels().jit
    one, rows = dict(BLOCK_N=8, BLOCK_K=256, RUNS=1), dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)
    two = dict(one, RUNS=2)
    # (name, kernel, constexprs, float32 pointers, whether it reads weights before its wait, or
    # "state": reads the recurrent state written two kernels before or earlier)
    yield "gemv norm", gemv_kernels._gemv, dict(NORM=True, ACT=False, RES=False, KEEP=False, **one), (), True
    yield "gemv gate+residual", gemv_kernels._gemv, dict(NORM=False, ACT=True, RES=True, KEEP=False, **one), (), True
    yield "gemv residual32+keep", gemv_kernels._gemv, dict(NORM=False, ACT=False, RES=True, KEEP=True, **one), \
        ("y_ptr", "r_ptr"), True
    yield "gemv float32 x cast+norm", gemv_kernels._gemv, dict(NORM=True, ACT=False, RES=False, KEEP=False, **one), \
        ("x_ptr",), True
    yield "gemv two runs, norm", gemv_kernels._gemv, dict(NORM=True, ACT=False, RES=False, KEEP=False, **two), (), True
    yield "gemv two runs, gate+residual", gemv_kernels._gemv, dict(NORM=False, ACT=True, RES=True, KEEP=False, **two), \
        (), True
    yield "rows norm", gemv_kernels._gemv_rows, dict(NORM=True, ACT=False, RES=False, KEEP=False, **rows), (), True
    yield "rows gate+residual", gemv_kernels._gemv_rows, dict(NORM=False, ACT=True, RES=True, KEEP=False, **rows), \
        (), True
    yield "attend", att["_attend"], dict(D=128, CHUNK=64, SP=4, FOLD=False), (), False
    yield "attend, combination folded", att["_attend"], dict(D=128, CHUNK=64, SP=4, FOLD=True), (), False
    yield "combine", att["_combine"], dict(D=128, SP=4), (), False
    yield "attend rows", att["_attend_rows"], dict(D=128, CHUNK=64, BQ=32), (), False
    yield "mamba2 scan", mamba2_kernels._scan, dict(HAS_BIAS=True, OUTPUT=True, BLOCK_P=16, BLOCK_N=128), (), "state"
    yield "mamba2 gate norm", mamba2_kernels._gate_norm, dict(OUTPUT=True, BLOCK_N=128, BLOCK_GS=1024), (), False


def test_before_its_wait_a_kernel_reads_weights_only_and_writes_nothing():
    for name, fn, consts, fp32_out, prefetch in _kernels():
        ptx = _ptx(fn, consts, True, fp32_out)
        waits = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
        launches = [i for i, line in enumerate(ptx) if "griddepcontrol.launch_dependents" in line]
        assert waits and launches and waits[0] < launches[0], name
        early = [line.strip() for line in ptx[:waits[0]] if MEMORY.match(line)]
        assert bool(early) == bool(prefetch), f"{name}: {len(early)} loads before the wait"
        if prefetch == "state":  # the Mamba-2 step reads its state early (mamba2_kernels._scan says why): loads only
            assert all(re.search(r"\bld\.global", line) for line in early), (name, early[:3])
        else:
            assert all("ld.global.L1::evict_first" in line for line in early), (name, early[:3])
        assert "griddepcontrol" not in "\n".join(_ptx(fn, consts, False, fp32_out)), name
