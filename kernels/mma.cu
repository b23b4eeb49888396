// Warp-level tensor-core multiply-accumulate wrappers called from cnnfast's Numba CUDA kernels.
//
// Each function is one mma.sync over a warp: all 32 lanes must call it together (warp-uniform
// control flow), each with its own fragment of A, B and C, and each gets its fragment of
// D = A * B + C back. The operands arrive as float32 and are rounded inside (TF32: cvt.rna,
// round to nearest, ties away from zero; BF16: cvt.rn, round to nearest even); accumulation is
// float32. Which lane holds which element is in README.md (the PTX ISA's "Matrix fragments for
// mma.m16n8k8" and "mma.m16n8k16"); cnnfast/cuda/_mma.py emulates each function, lane by lane,
// for Numba's simulator.
//
// Calling convention: Numba's ABI for cuda.declare_device - the int return is a status (always
// 0), the result is written through the first pointer (a UniTuple(float32, 4) in Numba).
// Needs sm_80 or newer.

struct cnnfast_f32x4 {
    float v[4];
};

// Not volatile: the same operand converted for several MMAs is converted once after inlining.
static __device__ __forceinline__ unsigned cnnfast_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// Two floats to a bf16x2 register: lo in bits 0-15 (the element with the lower index), hi in
// bits 16-31, each rounded to nearest even.
static __device__ __forceinline__ unsigned cnnfast_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// D (16 x 8) = A (16 x 8, row) * B (8 x 8, col) + C, TF32 operands, FP32 accumulate.
// Lane l, g = l / 4, t = l % 4:  a0 A[g][t]  a1 A[g+8][t]  a2 A[g][t+4]  a3 A[g+8][t+4]
//                                b0 B[t][g]  b1 B[t+4][g]
//                                c0 C[g][2t] c1 C[g][2t+1] c2 C[g+8][2t] c3 C[g+8][2t+1]
extern "C" __device__ int cnnfast_mma_tf32_m16n8k8(
    cnnfast_f32x4 *d, float a0, float a1, float a2, float a3, float b0, float b1, float c0,
    float c1, float c2, float c3) {
    float d0, d1, d2, d3;
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(cnnfast_tf32(a0)), "r"(cnnfast_tf32(a1)), "r"(cnnfast_tf32(a2)),
          "r"(cnnfast_tf32(a3)), "r"(cnnfast_tf32(b0)), "r"(cnnfast_tf32(b1)), "f"(c0), "f"(c1),
          "f"(c2), "f"(c3));
    d->v[0] = d0;
    d->v[1] = d1;
    d->v[2] = d2;
    d->v[3] = d3;
    return 0;
}

// D (16 x 8) = A (16 x 16, row) * B (16 x 8, col) + C, BF16 operands, FP32 accumulate.
// Lane l, g = l / 4, t = l % 4, e in {0, 1}:
//   a(0+e) A[g][2t+e]    a(2+e) A[g+8][2t+e]    a(4+e) A[g][2t+8+e]    a(6+e) A[g+8][2t+8+e]
//   b(0+e) B[2t+e][g]    b(2+e) B[2t+8+e][g]
//   c(0+e) C[g][2t+e]    c(2+e) C[g+8][2t+e]
extern "C" __device__ int cnnfast_mma_bf16_m16n8k16(
    cnnfast_f32x4 *d, float a0, float a1, float a2, float a3, float a4, float a5, float a6,
    float a7, float b0, float b1, float b2, float b3, float c0, float c1, float c2, float c3) {
    float d0, d1, d2, d3;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(cnnfast_bf16x2(a0, a1)), "r"(cnnfast_bf16x2(a2, a3)), "r"(cnnfast_bf16x2(a4, a5)),
          "r"(cnnfast_bf16x2(a6, a7)), "r"(cnnfast_bf16x2(b0, b1)), "r"(cnnfast_bf16x2(b2, b3)),
          "f"(c0), "f"(c1), "f"(c2), "f"(c3));
    d->v[0] = d0;
    d->v[1] = d1;
    d->v[2] = d2;
    d->v[3] = d3;
    return 0;
}
