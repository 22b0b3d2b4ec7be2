"""Patch llama.cpp's CPU flash attention so that a query row gets the same result whatever else is in its pass.

    python scripts/patch-llamacpp.py <llama.cpp source dir>     # scripts/setup.sh runs it before the build

ggml's CPU flash attention takes one of three paths by the shape of a call: one query row over a cache of 512 or
more splits the cache across threads (another summation order); 1 to 63 query rows of a sequence go row by row; 64
or more go through a tiled kernel (a GEMM over tiles of 64 keys) that rounds apart from the row path (up to 0.6 on a
logit of the bundled model). So a sequence's logits would depend on how its prompt was chunked and on how many
positions it verifies at once, and speculative decoding or a batch would not equal plain decoding token for token.
The patch sends every call through the tiled kernel, sized to the rows it holds: each element there is a sum in a
fixed order (key tiles from 0, one fused multiply-add per dimension, `simd_gemm`), whatever the number of rows, so a
row's result is the same alone, in a prompt chunk or in a batch. It is also the fastest path for a prompt
(benchmarks/README.md, "Backends and weight formats"). Exits 1 naming the edit it could not make (another
llama.cpp): setup.sh then warns and adaspec keeps flash attention off (core/backends/llamacpp.py probes each build).
"""

from __future__ import annotations

import sys
from pathlib import Path

TILED = "static void ggml_compute_forward_flash_attn_ext_tiled("
EDITS = [  # (old, new, expected count) inside the tiled kernel: only the rows the tile holds
    ("simd_gemm(KQ, (const float *)Q_q, K_f32, Q_TILE_SZ, DK, KV_TILE_SZ);",
     "simd_gemm(KQ, (const float *)Q_q, K_f32, tile_rows, DK, KV_TILE_SZ);", 1),
    ("simd_gemm(VKQ32, KQ, V32, Q_TILE_SZ, KV_TILE_SZ, DV);",
     "simd_gemm(VKQ32, KQ, V32, tile_rows, KV_TILE_SZ, DV);", 1),
    ("ggml_vec_scale_f32(Q_TILE_SZ * KV_TILE_SZ,", "ggml_vec_scale_f32(tile_rows * KV_TILE_SZ,", 2),
    ("ggml_vec_tanh_f32(Q_TILE_SZ * KV_TILE_SZ,", "ggml_vec_tanh_f32(tile_rows * KV_TILE_SZ,", 1),
    ("for (int tq = 0; tq < Q_TILE_SZ; tq++)", "for (int tq = 0; tq < tile_rows; tq++)", 3),
    ("memset(VKQ32, 0, Q_TILE_SZ * DV * sizeof(float));", "memset(VKQ32, 0, tile_rows * DV * sizeof(float));", 1),
    ("memset(mask32, 0, Q_TILE_SZ * KV_TILE_SZ * sizeof(float));",
     "memset(mask32, 0, tile_rows * KV_TILE_SZ * sizeof(float));", 1),
    ("memset(KQ, 0, Q_TILE_SZ * KV_TILE_SZ * sizeof(float));", "memset(KQ, 0, tile_rows * KV_TILE_SZ * sizeof(float));", 1),
    ("for (int tq = tile_rows; tq < Q_TILE_SZ; tq++) {", "for (int tq = tile_rows; tq < tile_rows; tq++) {", 1),
    # a tile holds the query heads that share a key/value head (grouped-query attention), position by position, so
    # that one conversion of a key/value tile serves all of them: one-position rows decode as fast as without flash
    # attention instead of 1.2x-1.4x slower (2 Intel Xeon cores)
    ("""        const int iq3 = ir/(neq2*neq1);
        const int iq2 = (ir - iq3*neq2*neq1)/neq1;
        const int iq1 = (ir - iq3*neq2*neq1 - iq2*neq1);
""", """        const int64_t G = neq1*rk2;  // rows by (sequence, kv head, position, query head of that kv head)
        const int iq3 = ir/(neq2*neq1);
        const int ik2g = (ir - iq3*neq2*neq1)/G;
        const int g0 = (ir - iq3*neq2*neq1 - ik2g*G);
""", 1),
    ("""        const int tile_rows = MIN(Q_TILE_SZ, MIN((int)(ir1 - ir), (int)(neq1 - iq1)));
        GGML_ASSERT(tile_rows > 0);

        const uint32_t h = iq2; // head index
        const float slope = (max_bias > 0.0f) ? h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - n_head_log2) + 1) : 1.0f;
""", """        const int tile_rows = MIN(Q_TILE_SZ, MIN((int)(ir1 - ir), (int)(G - g0)));
        GGML_ASSERT(tile_rows > 0);

        int   r_i1[Q_TILE_SZ];
        int   r_i2[Q_TILE_SZ];
        float r_slope[Q_TILE_SZ];
        for (int tq = 0; tq < tile_rows; tq++) {
            r_i1[tq] = (g0 + tq)/rk2;
            r_i2[tq] = ik2g*rk2 + (g0 + tq)%rk2;
            const uint32_t h = r_i2[tq]; // head index
            r_slope[tq] = (max_bias > 0.0f) ? h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - n_head_log2) + 1) : 1.0f;
        }
        const int iq2 = r_i2[0];
""", 1),
    ("((iq1 + tq)*nbq1 + iq2*nbq2 + iq3*nbq3)", "(r_i1[tq]*nbq1 + r_i2[tq]*nbq2 + iq3*nbq3)", 1),
    ("(iq1 + tq)*mask->nb[1] + (iq2%mask->ne[2])*mask->nb[2]",
     "r_i1[tq]*mask->nb[1] + (r_i2[tq]%mask->ne[2])*mask->nb[2]", 1),
    ("= slope * GGML_CPU_FP16_TO_FP32", "= r_slope[tq] * GGML_CPU_FP16_TO_FP32", 1),
    ("""            const float s = ((float *)((char *) sinks->data))[h];

            for (int tq = 0; tq < tile_rows; tq++) {
""", """            for (int tq = 0; tq < tile_rows; tq++) {
                const float s = ((float *)((char *) sinks->data))[r_i2[tq]];
""", 1),
    ("""            const int i1 = iq1 + tq;
            const int i2 = iq2;""", """            const int i1 = r_i1[tq];
            const int i2 = r_i2[tq];""", 1),
]
DISPATCH = [  # (old, new) in the caller: never the split-cache path, the tiled kernel for any number of rows
    ("const bool use_split_kv_path = !use_ref", "const bool use_split_kv_path = false && !use_ref"),
    ("                                neq1 >= Q_TILE_SZ);", "                                true);"),
]


def patch(source: str) -> str:
    """The patched ops.cpp; raises ValueError naming an edit whose text is not found as expected."""
    start = source.find(TILED)
    if start < 0:
        raise ValueError(f"no {TILED.split('(')[0].split()[-1]} in ops.cpp")
    end = source.index("\n}\n", start)
    kernel = source[start:end]
    for old, new, count in EDITS:
        if kernel.count(old) != count:
            raise ValueError(f"expected {count} of {old!r} in the tiled kernel, found {kernel.count(old)}")
        kernel = kernel.replace(old, new)
    source = source[:start] + kernel + source[end:]
    for old, new in DISPATCH:
        if source.count(old) != 1:
            raise ValueError(f"expected one {old.strip()!r} in ops.cpp, found {source.count(old)}")
        source = source.replace(old, new)
    return source


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    ops = Path(sys.argv[1]) / "ggml/src/ggml-cpu/ops.cpp"
    if not ops.is_file():
        sys.exit(f"patch-llamacpp: no {ops}")
    try:
        ops.write_text(patch(ops.read_text()))
    except ValueError as e:
        sys.exit(f"patch-llamacpp: {e}")
    print(f"patch-llamacpp: {ops} patched")


if __name__ == "__main__":
    main()
