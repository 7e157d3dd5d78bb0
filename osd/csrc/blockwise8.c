/* Block-wise 8-bit (de)quantisation of optimizer states on a CPU: the maths of
 * osd/quantization.py (torchao's dynamic code map, blocks of `block` elements, nearest code
 * by a table on a float's top 16 bits), one loop per direction instead of eleven torch ops.
 * Bit for bit the torch path's results (tests/test_native.py). Compiled and loaded by
 * osd/native.py; plain C99, no OpenMP (one thread: the torch path's index_select lookups
 * are single-threaded too, and a second OpenMP runtime beside torch's would spin threads
 * against it).
 */
#include <stdint.h>
#include <string.h>

/* out[b*block + i] = code_map[codes[b*block + i]] * absmax[b] */
void osd_dequantize_blockwise(const uint8_t *restrict codes, const float *restrict absmax,
                              const float *restrict code_map, float *restrict out,
                              int64_t n_blocks, int64_t block) {
    for (int64_t b = 0; b < n_blocks; b++) {
        const float scale = absmax[b];
        const uint8_t *restrict c = codes + b * block;
        float *restrict o = out + b * block;
        for (int64_t i = 0; i < block; i++) o[i] = code_map[c[i]] * scale;
    }
}

/* Per block b: absmax[b] = max(max_i |x_i|, 1e-12) (NaN if the block holds a NaN, as
 * torch.amax), then for s = x_i / absmax[b] and k = the top 16 bits of s:
 * codes[i] = below[k] + (s >= inside[k]), the index of the nearest code (ties round up). */
void osd_quantize_blockwise(const float *restrict x, const uint8_t *restrict below,
                            const float *restrict inside, uint8_t *restrict codes,
                            float *restrict absmax, int64_t n_blocks, int64_t block) {
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *restrict v = x + b * block;
        /* |x| as its bit pattern with the sign cleared: for non-negative floats the integer
         * order is the float order, and every NaN lies above +inf, so the maximum is NaN
         * when one is present (an integer maximum, which the compiler vectorises). */
        int32_t top = 0;
        for (int64_t i = 0; i < block; i++) {
            int32_t bits;
            memcpy(&bits, v + i, sizeof bits);
            bits &= 0x7fffffff;
            top = bits > top ? bits : top;
        }
        float scale;
        memcpy(&scale, &top, sizeof scale);
        if (scale < 1e-12f) scale = 1e-12f;
        absmax[b] = scale;
        uint8_t *restrict c = codes + b * block;
        for (int64_t i = 0; i < block; i++) {
            const float s = v[i] / scale;
            uint32_t key;
            memcpy(&key, &s, sizeof key);
            key >>= 16;
            c[i] = (uint8_t)(below[key] + (s >= inside[key]));
        }
    }
}
