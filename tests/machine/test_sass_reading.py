"""bench/sass.py's reading of SASS, on hand-written SASS in cuobjdump's format (sm_90 and sm_100,
copied from ``python -m bench.sass --arch 90/100`` output and cut down): the main loop (nested loops,
uniform back-edges, the mbarrier retry stubs after EXIT), each branch form, the tensor-core families,
the counts per score, the loads by width, the blocks per SM. The facts it reads off the compiled
kernels are in test_sass.py."""

import pytest

from bench import sass

SASS = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;                /* 0x00000a0000017a02 */
        /*0010*/              @!P5 LDG.E.128 R36, desc[UR18][R40.64] ;   /* 0x000000122824d981 */
        /*0020*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;      /* 0x0000000402027981 */
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ; /* 0x0000000c0804723c */
        /*0040*/                   IADD3 R5, R5, 0x1, RZ ;               /* 0x0000000105057810 */
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ; /* 0x00e0 */
        /*0060*/                   NOP ;                                 /* 0x0000000000007918 */
        /*0070*/                   MUFU.EX2 R32, R36 ;                   /* 0x0000002400207308 */
        /*0080*/               @P0 BRA 0x50 ;                            /* 0xffffffe40010a947 */
        /*0090*/                   LDGSTS.E.BYPASS.LTC128B.128 [R51], desc[UR18][R22.64], !P2 ; /* 0x0 */
        /*00a0*/               @P1 BRA 0x30 ;                            /* 0xfffffffc00fc7947 */
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ; /* 0x00e0 */
        /*00c0*/                   FFMA R3, R4, R5, R6 ;                 /* 0x00e0 */
        /*00d0*/               @P2 BRA 0xb0 ;                            /* 0xfffffffc00fc7947 */
        /*00e0*/                   EXIT ;                                /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                             /* 0xfffffffc00fc7947 */
"""


def test_main_loop_is_the_innermost_loop_with_a_tensor_core_instruction():
    """Loops: [0x30, 0xa0] holds the MMA loop [0x50, 0x80] (innermost: picked over its parent), and a
    sibling [0xb0, 0xd0] with as many MMAs comes later (the first wins a tie); the trap loop at
    0xf0 has no MMA."""
    code = sass.instructions(SASS)
    assert len(code) == 16 and code[8] == (0x80, "@P0 BRA 0x50")
    assert sass.main_loop(code) == (0x50, 0x80)
    assert sass.main_loop([c for c in code if c[0] < 0x50 or c[0] > 0xa0]) == (0xb0, 0xd0)
    assert sass.main_loop([c for c in code if "MMA" not in c[1]]) is None


def test_analyse_counts_per_score_and_loads_by_width():
    facts = sass.analyse(SASS, "_attention_forward_kernel", {"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)
    assert facts["loop_instructions"] == 3  # 0x50 to 0x80, the NOP not counted
    assert facts["instructions_per_score"] == round(3 * 32 * 4 / (64 * 64), 2)
    assert (facts["hgmma"], facts["hmma"]) == (2, 1)
    assert facts["global_loads"] == {"128": 2, "16": 1}  # LTC128B is a cache hint, not a width
    assert sass.analyse(SASS, "_patch_embed_forward_kernel", {"BLOCK_M": 64}, 4)["instructions_per_score"] is None


def test_blocks_per_sm():
    assert sass.blocks_per_sm(128, 40960, 4) == 4  # 4 x 16K registers: the register file
    assert sass.blocks_per_sm(168, 147456, 4) == 1  # shared memory
    assert sass.blocks_per_sm(32, 128, 4) == 16  # threads: 2048 / 128
    assert sass.blocks_per_sm(None, 0, 4) is None


def test_architectures():
    """sm_100 has sm_90's per-SM limits; ``--arch`` takes the two and nothing else."""
    assert sorted(sass.SM_LIMITS) == [90, 100]
    assert sass.blocks_per_sm(128, 40960, 4, arch=100) == 4
    assert sass.blocks_per_sm(168, 147456, 4, arch=100) == 1
    with pytest.raises(SystemExit):
        sass.main(["--arch", "80", "--out", "unused"])


# ---------------------------------------------------------------------------------------------
# Loops ptxas lays out on TMA, tcgen05 and sm_100 code, and the tensor-core families.

# Modelled on the sm_100 forward kernel at 64x64, 4 warps (bench.sass --arch 100): a TMEM allocation
# retry loop with a uniform back-edge, a peeled first block, the main loop [0x90, 0x120] (the
# scores' exp2 and the two GEMMs), a peeled last block, EXIT, then ptxas's out-of-line mbarrier
# try-wait retry stubs, each spinning on itself and jumping back to just after its wait: one before
# the loop (0x70), one into the middle of the loop (0xb0).
SM100_STUBS = """
	code for sm_100a
		Function : _attention_forward_kernel
        /*0000*/                   LDC R1, c[0x0][0x37c] ;                                                        /* 0x0000df00ff017b82 */
                                                                                                                  /* 0x000fe20000000800 */
        /*0010*/                   UTCATOMSWS.FIND_AND_SET.ALIGN UP1, UR4, UR7 ;                                  /* 0x00000007000475e3 */
                                                                                                                  /* 0x000e640008000100 */
        /*0020*/                   BRA.U !UP1, 0x10 ;                                                             /* 0xfffffffd09e87547 */
        /*0030*/                   UTCHMMA gdesc[UR6], gdesc[UR18], tmem[UR35], tmem[UR36], idesc[UR37], !UPT ;   /* 0x00ff2412060075ea */
        /*0040*/                   UTCBAR [UR4], URZ ;                                                            /* 0x000000ff040073e9 */
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR9+0xe000], R4 ;                          /* 0x00e00004ff0075a7 */
        /*0060*/              @!P3 BRA 0x180 ;                                                                    /* 0x0000005c00ecb947 */
        /*0070*/                   LDTM.16dp32bit_t0_t15.x32 R4, tmem[UR13+0x100000] ;                            /* 0x1000000d000479ee */
        /*0080*/                   MUFU.EX2 R52, R52 ;                                                            /* 0x0000003400347308 */
        /*0090*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR24], R4 ;                                /* 0x00000004ff0075a7 */
        /*00a0*/              @!P4 BRA 0x1b0 ;                                                                    /* 0x0000004800bcc947 */
        /*00b0*/                   LDTM.16dp32bit_t0_t15.x32 R4, tmem[UR13+0x100000] ;                            /* 0x1000000d000479ee */
        /*00c0*/                   MUFU.EX2 R53, R5 ;                                                             /* 0x0000000500357308 */
        /*00d0*/                   STTM.16dp32bit_t0_t15.x16 tmem[UR13+0x40], R36 ;                               /* 0x00004024000079ed */
        /*00e0*/                   UTCHMMA tmem[UR28], gdesc[UR18], tmem[UR12], tmem[UR42], idesc[UR43], UPT ;    /* 0x00ff2a121c0079ea */
        /*00f0*/                   UTCHMMA gdesc[UR20], gdesc[UR18], tmem[UR35], tmem[UR42], idesc[UR43], !UPT ;  /* 0x00ff2a121400a9ea */
        /*0100*/                   UTCBAR [UR24], URZ ;                                                           /* 0x000000ff180073e9 */
        /*0110*/                   ISETP.GE.U32.AND.EX P4, PT, R106, RZ, PT, P4 ;                                 /* 0x000000ff6a00720c */
        /*0120*/              @!P4 BRA 0x90 ;                                                                     /* 0xffffffe800f8c947 */
        /*0130*/                   UTCHMMA gdesc[UR6], gdesc[UR16], tmem[UR12], tmem[UR18], idesc[UR19], UPT ;    /* 0x00ff1210060075ea */
        /*0140*/                   UTCHMMA tmem[UR28], gdesc[UR6], tmem[UR12], tmem[UR18], idesc[UR19], UPT ;     /* 0x00ff12061c0079ea */
        /*0150*/                   UTCBAR [UR29], URZ ;                                                           /* 0x000000ff1d0073e9 */
        /*0160*/                   STG.E.128 desc[UR4][R2.64], R4 ;                                               /* 0x0000000402007986 */
        /*0170*/                   EXIT ;                                                                         /* 0x000000000000794d */
        /*0180*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR9+0xe000], R4 ;                          /* 0x00e00004ff0075a7 */
        /*0190*/              @!P3 BRA 0x180 ;                                                                    /* 0xfffffffc00f8b947 */
        /*01a0*/                   BRA 0x70 ;                                                                     /* 0xffffffa000087947 */
        /*01b0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR24], R4 ;                                /* 0x00000004ff0075a7 */
        /*01c0*/              @!P4 BRA 0x1b0 ;                                                                    /* 0xfffffffc00f8c947 */
        /*01d0*/                   BRA 0xb0 ;                                                                     /* 0xffffffb400387947 */
        /*01e0*/                   BRA 0x1e0;                                                                     /* 0xfffffffc00fc7947 */
"""


def test_retry_stubs_after_exit_are_not_loops():
    """The stubs' jumps back from after EXIT are not loops: the one back into the loop's middle spans
    [0xb0, 0x1d0], four MMAs (two of the loop's, two of the peeled block), more than the loop's two,
    and was once read as the main loop; so was, on the real kernels, a span of 1,200-1,900
    instructions. Neither are the stubs' spins on themselves."""
    code = sass.instructions(SM100_STUBS)
    assert len(code) == 31 and code[-1] == (0x1E0, "BRA 0x1e0")
    assert sass.loops(code) == [(0x10, 0x20), (0x90, 0x120)]
    assert sass.main_loop(code) == (0x90, 0x120)
    facts = sass.analyse(SM100_STUBS, "_attention_forward_kernel", {"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)
    assert facts["loop_instructions"] == 10  # 0x90 to 0x120; the stub it may jump out to is not counted
    assert facts["instructions_per_score"] == round(10 * 32 * 4 / (64 * 64), 2)
    assert (facts["tcgen05_mma"], facts["hgmma"], facts["qgmma"], facts["hmma"]) == (5, 0, 0, 0)
    assert (facts["tmem_loads"], facts["tmem_stores"]) == (2, 1)


# sm_100 with TMA: a loop whose back-edge is a uniform branch (``BRA.U !UP0``), waiting on the
# load's mbarrier inline (the retry stub after EXIT), a bulk copy after it.
SM100_UNIFORM = """
        /*0000*/                   LDC R1, c[0x0][0x37c] ;                                                        /* 0x0000df00ff017b82 */
        /*0010*/                   UTMALDG.2D [UR8], [UR4], desc[UR6] ;                                           /* 0x00000008040075b4 */
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x8000], R2 ;                          /* 0x00800002ff0075a7 */
        /*0030*/              @!P0 BRA 0xe0 ;                                                                     /* 0x0000000800288947 */
        /*0040*/                   UTCHMMA gdesc[UR10], gdesc[UR12], tmem[UR14], tmem[UR16], idesc[UR17], UPT ;   /* 0x00ff100c0a0075ea */
        /*0050*/                   UTCHMMA gdesc[UR22], gdesc[UR24], tmem[UR14], tmem[UR16], idesc[UR17], UPT ;   /* 0x00ff1018160075ea */
        /*0060*/                   UTCBAR [UR18], URZ ;                                                           /* 0x000000ff120073e9 */
        /*0070*/                   UTMALDG.2D [UR8], [UR4], desc[UR6] ;                                           /* 0x00000008040075b4 */
        /*0080*/                   UISETP.NE.AND UP0, UPT, UR5, UR20, UPT ;                                       /* 0x000000140500728c */
        /*0090*/                   BRA.U !UP0, 0x20 ;                                                             /* 0xfffffffd08e07547 */
        /*00a0*/                   LDTM.16dp32bit_t0_t15.x32 R4, tmem[UR13] ;                                     /* 0x0000000d000479ee */
        /*00b0*/                   UBLKCP.G.S [UR4], [UR6], UR8 ;                                                 /* 0x00000006040073ba */
        /*00c0*/                   EXIT ;                                                                         /* 0x000000000000794d */
        /*00d0*/                   BRA 0xd0;                                                                      /* 0xfffffffc00fc7947 */
        /*00e0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x8000], R2 ;                          /* 0x00800002ff0075a7 */
        /*00f0*/              @!P0 BRA 0xe0 ;                                                                     /* 0xfffffffc00f88947 */
        /*0100*/                   BRA 0x40 ;                                                                     /* 0xfffffff000087947 */
"""


def test_uniform_back_edge_and_tcgen05_counts():
    code = sass.instructions(SM100_UNIFORM)
    assert sass.main_loop(code) == (0x20, 0x90)
    facts = sass.analyse(SM100_UNIFORM, "_patch_embed_forward_kernel", {"BLOCK_M": 128}, num_warps=4)
    assert facts["loop_instructions"] == 8 and facts["instructions_per_score"] is None
    assert (facts["tcgen05_mma"], facts["tma_loads"], facts["bulk_copies"], facts["tmem_loads"]) == (2, 2, 1, 1)


# sm_90 FP8: wgmma on e4m3 is QGMMA; a predicated EXIT (some threads leave) ends nothing.
SM90_FP8 = """
	code for sm_90a
		Function : _attention_forward_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                             /* 0x00000a00ff017b82 */
        /*0010*/                   WARPGROUP.ARRIVE ;                                                 /* 0x00000000000079c5 */
        /*0020*/                   QGMMA.64x64x32.F32.E4M3.E4M3 R24, gdesc[UR12], RZ, !UPT, gsb0 ;    /* 0x00e000000c1879f3 */
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                                    /* 0x00000000000079c8 */
        /*0040*/                   MUFU.EX2 R14, R14 ;                                                /* 0x0000000e000e7308 */
        /*0050*/               @P2 EXIT ;                                                             /* 0x000000000000294d */
        /*0060*/                   QGMMA.64x64x32.F32.E4M3.E4M3 R56, gdesc[UR8], R56, gsb0 ;          /* 0x00e00000083879f3 */
        /*0070*/               @P3 BRA 0x10 ;                                                         /* 0xfffffffc00643947 */
        /*0080*/                   EXIT ;                                                             /* 0x000000000000794d */
        /*0090*/                   BRA 0x90;                                                          /* 0xfffffffc00fc7947 */
"""


def test_fp8_wgmma_is_a_tensor_core_instruction():
    code = sass.instructions(SM90_FP8)
    assert sass.main_loop(code) == (0x10, 0x70)
    facts = sass.analyse(SM90_FP8, "_attention_forward_kernel", {"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)
    assert (facts["qgmma"], facts["hgmma"], facts["hmma"], facts["tcgen05_mma"]) == (2, 0, 0, 0)
    assert facts["loop_instructions"] == 7


# Loops in loops: an mma.sync loop [0x20, 0x40] inside a wgmma loop [0x10, 0x60]; then a loop
# [0x70, 0xc0] with a uniform back-edge around an mbarrier spin [0x70, 0x80] that has no MMA.
NESTED = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                                             /* 0x00000a0000017a02 */
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ;               /* 0x00e000000c1879f0 */
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                              /* 0x0000000c0804723c */
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R14, R4 ;                              /* 0x0000000e0804723c */
        /*0040*/               @P0 BRA 0x20 ;                                                         /* 0xfffffffc00f40947 */
        /*0050*/               @P1 EXIT ;                                                             /* 0x000000000000194d */
        /*0060*/              @!P1 BRA 0x10 ;                                                         /* 0xfffffffc00e89947 */
        /*0070*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;                     /* 0x00000002ff0075a7 */
        /*0080*/              @!P0 BRA 0x70 ;                                                         /* 0xfffffffc00f88947 */
        /*0090*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;                     /* 0x00e00000081879f0 */
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;                     /* 0x00e00000081879f0 */
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;                     /* 0x00e00000081879f0 */
        /*00c0*/                   BRA.U UP0, 0x70 ;                                                  /* 0xfffffffd08e87547 */
        /*00d0*/                   EXIT ;                                                             /* 0x000000000000794d */
        /*00e0*/                   BRA 0xe0;                                                          /* 0xfffffffc00fc7947 */
"""


def test_nested_loops():
    """The innermost loop with an MMA wins over the loop around it, a loop without an MMA inside
    does not make its parent less innermost, and a span across an unconditional EXIT is no loop."""
    code = sass.instructions(NESTED)
    assert sass.loops(code) == [(0x20, 0x40), (0x10, 0x60), (0x70, 0x80), (0x70, 0xC0)]
    assert sass.main_loop(code) == (0x70, 0xC0)  # 3 MMAs against the inner mma.sync loop's 2
    assert sass.main_loop([c for c in code if not 0x70 <= c[0] <= 0xC0]) == (0x20, 0x40)
    exits_there = [(a, "EXIT" if a == 0x50 else t) for a, t in code]
    assert sass.loops(exits_there) == [(0x20, 0x40), (0x70, 0x80), (0x70, 0xC0)]


@pytest.mark.parametrize(
    ("text", "opcode", "target"),
    [
        ("BRA 0x50", "BRA", 0x50),
        ("@P0 BRA 0x50", "BRA", 0x50),
        ("@!P0 BRA 0x50", "BRA", 0x50),
        ("@PT BRA 0x50", "BRA", 0x50),
        ("@UP0 BRA.U 0x50", "BRA.U", 0x50),
        ("@!UP0 BRA.U 0x50", "BRA.U", 0x50),
        ("BRA.U !UP0, 0x50", "BRA.U", 0x50),
        ("BRA.U UP1, 0x50", "BRA.U", 0x50),
        ("BRA.DIV UR4, 0x50", "BRA.DIV", 0x50),
        ("@!P2 BRA.DIV UR4, 0x50", "BRA.DIV", 0x50),
        ("@!PT BRA 0x50", "BRA", None),  # never taken
        ("@!UPT BRA.U 0x50", "BRA.U", None),
        ("BRX R2 -0x1a0", "BRX", None),  # indirect: no address to read
        ("CALL.REL.NOINC 0x7a80", "CALL.REL.NOINC", None),
        ("BSSY B0, 0x50", "BSSY", None),  # sets a reconvergence point, jumps nowhere
        ("RET.REL.NODEC R2 0x0", "RET.REL.NODEC", None),
    ],
)
def test_branch_forms(text, opcode, target):
    assert sass._opcode(text) == opcode
    assert sass._branch_target(text) == target


def test_table_reads_every_family_and_the_architecture():
    facts = sass.analyse(SM100_STUBS, "_attention_forward_kernel", {"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)
    entry = {
        "shape": "vit_b16", "dtype": "bf16", "arch": 100, "kernel": "_attention_forward_kernel",
        "config": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
        "registers": 130, "spilled_bytes": 0, "shared_memory": 57376,
        "blocks_per_sm": sass.blocks_per_sm(130, 57376, 4, arch=100), **facts,
    }
    lines = sass.table([entry]).splitlines()
    assert lines[1].startswith("vit_b16 bf16 sm_100:") and "UTCMMA" in lines[2]
    assert lines[3].split()[:11] == ["_attention_forward_kernel", "64/64", "w4", "s3", "130", "0", "57376", "3",
                                     "0", "0", "0"]
    assert lines[3].split()[11:] == ["5", "0/0/0/0/0", "10", "0.31"]
