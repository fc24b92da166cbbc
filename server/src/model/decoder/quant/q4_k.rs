//! GGUF Q4_K rewritten as Q4_1 blocks at load, for the Q4_1 kernels (candle 0.11 multiplies
//! Q4_K one activation row and one weight row at a time: 0.84x llama.cpp's decode rate on
//! Qwen2.5-Coder-1.5B Q4_K_M, where this gives 1.2x). A Q4_K super-block holds 256 values as eight 32-value blocks,
//! each `d * sc * q - dmin * m` with 6-bit `sc` and `m` and a 4-bit `q`: a Q4_1 block per
//! block, with `d * sc` and `-dmin * m` as its f16 scale and minimum. That rounding (2^-11
//! relative, far inside the 4-bit step) is the only change; the cost is 5 bits a weight
//! instead of 4.5.
use super::BLOCK;
use half::f16;

/// Values in a super-block.
const SUPER_BLOCK: usize = 256;
/// Bytes of a super-block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and minimums,
/// 128 bytes of nibbles.
const SUPER_BLOCK_BYTES: usize = 144;
/// Bytes of a Q4_1 block: f16 `d`, f16 `m`, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;

/// Bytes of a row of a [rows, cols] Q4_K matrix; refused unless `bytes` is exactly its
/// super-blocks.
pub fn row_bytes(bytes: &[u8], rows: usize, cols: usize) -> candle_core::Result<usize> {
    if cols == 0 || !cols.is_multiple_of(SUPER_BLOCK) {
        candle_core::bail!("a Q4_K row of {cols} values is not whole blocks of {SUPER_BLOCK}");
    }
    let row_bytes = cols / SUPER_BLOCK * SUPER_BLOCK_BYTES;
    if rows.checked_mul(row_bytes) != Some(bytes.len()) {
        candle_core::bail!(
            "{} bytes are not a [{rows}, {cols}] Q4_K matrix",
            bytes.len()
        );
    }
    Ok(row_bytes)
}

/// Whole super-blocks as Q4_1 blocks.
pub fn as_q4_1(super_blocks: &[u8]) -> Vec<u8> {
    let blocks = super_blocks.len() / SUPER_BLOCK_BYTES * (SUPER_BLOCK / BLOCK);
    let mut out = Vec::with_capacity(blocks * Q4_1_BYTES);
    for block in super_blocks.chunks_exact(SUPER_BLOCK_BYTES) {
        convert(block, &mut out);
    }
    out
}

fn convert(block: &[u8], out: &mut Vec<u8>) {
    let half = |i: usize| f16::from_bits(u16::from_le_bytes([block[i], block[i + 1]])).to_f32();
    let (d, dmin) = (half(0), half(2));
    let (scales, qs) = (&block[4..16], &block[16..]);
    for j in 0..SUPER_BLOCK / BLOCK {
        let (sc, m) = scale_min(scales, j);
        let mut q4_1 = [0u8; Q4_1_BYTES];
        q4_1[0..2].copy_from_slice(&f16::from_f32(d * f32::from(sc)).to_le_bytes());
        q4_1[2..4].copy_from_slice(&f16::from_f32(-dmin * f32::from(m)).to_le_bytes());
        // Blocks 2i and 2i + 1 are the low and high nibbles of the same 32 bytes; a Q4_1
        // byte k holds numbers k and k + 16.
        let (nibbles, shift) = (&qs[32 * (j / 2)..32 * (j / 2) + 32], 4 * (j % 2));
        for k in 0..16 {
            q4_1[4 + k] = ((nibbles[k] >> shift) & 0x0F) | ((nibbles[k + 16] >> shift) << 4);
        }
        out.extend_from_slice(&q4_1);
    }
}

/// Block `j`'s 6-bit scale and minimum, as ggml's `get_scale_min_k4` unpacks them.
fn scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::Matrix;
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// candle quantizes random weights to Q4_K and dequantizes them; the Q4_1 blocks made
    /// here give the same values to within the f16 rounding of each block's scale and minimum.
    #[test]
    fn q4_k_becomes_q4_1_with_the_same_values() {
        let (rows, cols) = (8, 2 * SUPER_BLOCK);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / 64) as f32 / 10.0))
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&dense, GgmlDType::Q4K).unwrap();
        let expected: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let matrix = Matrix::from_q4_k(&q.data().unwrap(), rows, cols).unwrap();
        let ids: Vec<u32> = (0..rows as u32).collect();
        let ours = matrix.embedding(&ids).unwrap();
        let largest = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // A value is at most `|d * sc| * 15 + |dmin * m|`, about twice the largest weight,
        // and each term moves by at most 2^-11 of itself.
        assert!(worst <= largest * 2.0 / 2048.0, "worst difference {worst}");
        assert!(largest > 1.0);
    }

    #[test]
    fn matrices_that_are_not_whole_super_blocks_are_refused() {
        let err = Matrix::from_q4_k(&[0; SUPER_BLOCK_BYTES], 1, 128)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not whole blocks"), "{err}");
        let err = Matrix::from_q4_k(&[0; SUPER_BLOCK_BYTES - 1], 1, SUPER_BLOCK)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("are not a [1, 256] Q4_K matrix"),
            "{err}"
        );
    }
}
