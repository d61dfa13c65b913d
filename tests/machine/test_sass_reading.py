"""bench/sass.py's reading of SASS, on hand-written SASS: the main loop, the counts per score, the
loads by width, the blocks per SM. The facts it reads off the compiled kernels are in test_sass.py."""

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
