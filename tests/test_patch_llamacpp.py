"""scripts/patch-llamacpp.py: the edits setup.sh makes to llama.cpp's flash attention; other source is refused."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "patch-llamacpp.py"
_spec = importlib.util.spec_from_file_location("patch_llamacpp", SCRIPT)
patch_llamacpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(patch_llamacpp)

# the shape of ggml-cpu/ops.cpp in llama-cpp-python 0.3.36's llama.cpp, cut to the lines the patch reads
OPS = """static void other() {
    simd_gemm(KQ, (const float *)Q_q, K_f32, Q_TILE_SZ, DK, KV_TILE_SZ);
}
static void ggml_compute_forward_flash_attn_ext_tiled(
        const ggml_compute_params * params) {
    while (ir < ir1) {
        const int iq3 = ir/(neq2*neq1);
        const int iq2 = (ir - iq3*neq2*neq1)/neq1;
        const int iq1 = (ir - iq3*neq2*neq1 - iq2*neq1);

        const int tile_rows = MIN(Q_TILE_SZ, MIN((int)(ir1 - ir), (int)(neq1 - iq1)));
        GGML_ASSERT(tile_rows > 0);

        const uint32_t h = iq2; // head index
        const float slope = (max_bias > 0.0f) ? h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - n_head_log2) + 1) : 1.0f;
        memset(VKQ32, 0, Q_TILE_SZ * DV * sizeof(float));
        memset(mask32, 0, Q_TILE_SZ * KV_TILE_SZ * sizeof(float));
        const float * pq = (const float *) ((char *) q->data + ((iq1 + tq)*nbq1 + iq2*nbq2 + iq3*nbq3));
        for (int tq = tile_rows; tq < Q_TILE_SZ; tq++) {}
        const ggml_fp16_t * mp_row = (const ggml_fp16_t *)((const char *) mask->data + (iq1 + tq)*mask->nb[1] + (iq2%mask->ne[2])*mask->nb[2]);
        mask32[tq * KV_TILE_SZ + tk] = slope * GGML_CPU_FP16_TO_FP32(mp_row[ic + tk]);
        for (int tq = 0; tq < Q_TILE_SZ; tq++) {}
        memset(KQ, 0, Q_TILE_SZ * KV_TILE_SZ * sizeof(float));
        simd_gemm(KQ, (const float *)Q_q, K_f32, Q_TILE_SZ, DK, KV_TILE_SZ);
        ggml_vec_scale_f32(Q_TILE_SZ * KV_TILE_SZ, KQ, scale);
        ggml_vec_tanh_f32(Q_TILE_SZ * KV_TILE_SZ, KQ, KQ);
        ggml_vec_scale_f32(Q_TILE_SZ * KV_TILE_SZ, KQ, logit_softcap);
        for (int tq = 0; tq < Q_TILE_SZ; tq++) {}
        for (int tq = 0; tq < Q_TILE_SZ; tq++) {}
        simd_gemm(VKQ32, KQ, V32, Q_TILE_SZ, KV_TILE_SZ, DV);
        if (sinks) {
            const float s = ((float *)((char *) sinks->data))[h];

            for (int tq = 0; tq < tile_rows; tq++) {
            }
        }
        for (int tq = 0; tq < tile_rows; tq++) {
            const int i1 = iq1 + tq;
            const int i2 = iq2;
        }
    }
}
static void dispatch() {
    const bool use_split_kv_path = !use_ref && neq1 == 1;
    bool use_tiled = !use_ref &&
                               (q->type == GGML_TYPE_F32 &&
                                neq1 >= Q_TILE_SZ);
}
"""


def test_the_tiled_kernel_takes_any_number_of_rows_and_computes_only_those_it_holds():
    out = patch_llamacpp.patch(OPS)
    kernel = out[out.index("ggml_compute_forward_flash_attn_ext_tiled"): out.index("static void dispatch")]
    assert "Q_TILE_SZ, DK" not in kernel and "Q_TILE_SZ * KV" not in kernel and "Q_TILE_SZ, KV" not in kernel
    assert "Q_TILE_SZ * DV" not in kernel and "tq < Q_TILE_SZ" not in kernel  # only the rows a tile holds
    assert "iq1" not in kernel and "[h]" not in kernel and "slope *" not in kernel  # each row its position and head
    assert "r_i1[tq] = (g0 + tq)/rk2;" in kernel and "G = neq1*rk2" in kernel  # the heads of a kv head together
    assert "use_split_kv_path = false && !use_ref" in out and "neq1 >= Q_TILE_SZ" not in out
    assert out.startswith(OPS[: OPS.index("static void ggml")])  # nothing outside the kernel and the dispatch


@pytest.mark.parametrize("edit", ["simd_gemm(VKQ32, KQ, V32, Q_TILE_SZ", "neq1 >= Q_TILE_SZ);", "_ext_tiled("])
def test_another_llama_cpp_is_refused_naming_the_edit_and_left_unchanged(tmp_path, edit):
    ops = tmp_path / "ggml/src/ggml-cpu/ops.cpp"
    ops.parent.mkdir(parents=True)
    ops.write_text(OPS.replace(edit, "changed("))
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1 and "patch-llamacpp:" in run.stderr and "Traceback" not in run.stderr
    assert ops.read_text() == OPS.replace(edit, "changed(")
    good = tmp_path / "good"
    (good / "ggml/src/ggml-cpu").mkdir(parents=True)
    (good / "ggml/src/ggml-cpu/ops.cpp").write_text(OPS)
    assert subprocess.run([sys.executable, str(SCRIPT), str(good)], capture_output=True).returncode == 0
    patched = (good / "ggml/src/ggml-cpu/ops.cpp").read_text()
    assert patched == patch_llamacpp.patch(OPS)
    again = subprocess.run([sys.executable, str(SCRIPT), str(good)], capture_output=True, text=True)
    assert again.returncode == 1 and (good / "ggml/src/ggml-cpu/ops.cpp").read_text() == patched  # not twice
