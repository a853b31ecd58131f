//! zstd compression and bounded decompression.
//!
//! Compression runs before encryption (ciphertext does not compress). Decompression of a
//! backup must never let the backup choose how much memory it takes: the window is
//! capped at 2^[`WINDOW_LOG_MAX`] bytes, which every level Phoenix writes (1 to 19) stays
//! within, and output is produced in fixed-size buffers however well the input
//! compresses, so a decompression bomb costs time, never memory.

use std::fmt;

use bytes::Bytes;
use zstd::stream::raw::{
    CParameter, DParameter, Decoder, Encoder, InBuffer, Operation as _, OutBuffer,
};
use zstd::zstd_safe::CCtx;

use super::{Emit, Filter};
use crate::{Error, Result};

/// The largest window (log2 bytes) a backup may ask its decompressor for. Levels up to 19
/// use at most 2^23; the ultra levels (20-22) and long-distance matching are refused by
/// the configuration so that every backup Phoenix writes can be read back.
pub const WINDOW_LOG_MAX: u32 = 23;

/// The highest compression level accepted.
pub const MAX_LEVEL: i32 = 19;

/// Size of each output buffer.
const OUT_SIZE: usize = 128 * 1024;

/// Bounds of the input bytes per frame when compressing without workers.
const MIN_FRAME_SIZE: usize = 64 * 1024;
const MAX_FRAME_SIZE: usize = 4 * 1024 * 1024;

/// Compresses a stream into zstd frames.
///
/// Without workers the stream is a sequence of independent frames of `frame_size` input
/// bytes, each compressed in one call from one contiguous buffer. zstd's streaming
/// mode would copy every input into its ring buffer and, once that wraps, run its slower
/// external-dictionary match finder for the rest of the stream: on a plain dump at level
/// 1 that was a third of the compression time. A frame restarts the window (2 MiB at
/// most up to level 9), which costs under 1% of the compressed size with 4 MiB frames. The filter holds one
/// frame of input and one of output, so the runner sizes frames like its queues. With
/// workers,
/// zstd's multithreaded streaming mode splits the input into jobs itself.
pub struct ZstdCompress {
    mode: Mode,
}

enum Mode {
    Frames {
        cctx: CCtx<'static>,
        frame_size: usize,
        input: Vec<u8>,
        out: Vec<u8>,
        frames: u64,
    },
    Streaming {
        encoder: Encoder<'static>,
        out: Vec<u8>,
    },
}

impl fmt::Debug for ZstdCompress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ZstdCompress")
    }
}

fn compress_error(e: std::io::Error) -> Error {
    Error::io("zstd compression", e)
}

fn code_error(code: usize) -> Error {
    compress_error(std::io::Error::other(zstd::zstd_safe::get_error_name(code)))
}

impl ZstdCompress {
    /// A compressor at `level` (1 to [`MAX_LEVEL`]), using `workers` extra threads when
    /// non-zero (zstd's multithreaded mode), else writing frames of `frame_size` input
    /// bytes (kept within 64 KiB to 4 MiB).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a level out of range; an I/O error when zstd refuses a
    /// parameter.
    pub fn new(level: i32, workers: u32, frame_size: usize) -> Result<Self> {
        if !(1..=MAX_LEVEL).contains(&level) {
            return Err(Error::Invalid(format!(
                "zstd level must be 1 to {MAX_LEVEL}, not {level}"
            )));
        }
        let mode = if workers == 0 {
            let mut cctx = CCtx::try_create().ok_or_else(|| {
                compress_error(std::io::Error::other("cannot create a zstd context"))
            })?;
            cctx.set_parameter(CParameter::CompressionLevel(level))
                .map_err(code_error)?;
            cctx.set_parameter(CParameter::ChecksumFlag(true))
                .map_err(code_error)?;
            for parameter in match_finder(level) {
                cctx.set_parameter(parameter).map_err(code_error)?;
            }
            let frame_size = frame_size.clamp(MIN_FRAME_SIZE, MAX_FRAME_SIZE);
            Mode::Frames {
                cctx,
                frame_size,
                input: Vec::with_capacity(frame_size),
                out: Vec::with_capacity(zstd::zstd_safe::compress_bound(frame_size)),
                frames: 0,
            }
        } else {
            let mut encoder = Encoder::new(level).map_err(compress_error)?;
            encoder
                .set_parameter(CParameter::NbWorkers(workers))
                .map_err(compress_error)?;
            encoder
                .set_parameter(CParameter::ChecksumFlag(true))
                .map_err(compress_error)?;
            for parameter in match_finder(level) {
                encoder.set_parameter(parameter).map_err(compress_error)?;
            }
            Mode::Streaming {
                encoder,
                out: Vec::with_capacity(OUT_SIZE),
            }
        };
        Ok(Self { mode })
    }
}

/// Match-finder parameters Phoenix sets over zstd's own for `level`.
///
/// zstd's level 3 (double-fast, 5-byte minimum match, 2^17- and 2^16-entry hash tables)
/// took twice level 1's CPU on a plain dump for 6-8% less output: the hex of `bytea`
/// and numeric columns are full of 5-byte repeats that are not worth a match, and 768 KiB
/// of tables do not stay in cache beside the data. With level 2's minimum match (6) and
/// table sizes it keeps level 3's strategy and 2 MiB window. Measured on 256 MB of the
/// benchmark's plain dump: 2.25 -> 1.28 CPU-s per GB, output 1.5% smaller; on 256 MB of
/// Rust sources: 1.92 -> 1.71 CPU-s per GB, output 1.4% larger (still 7% smaller than
/// level 2's). Decompression is unaffected: the window, and so the memory a reader needs,
/// is the same.
fn match_finder(level: i32) -> Vec<CParameter> {
    match level {
        3 => vec![
            CParameter::MinMatch(6),
            CParameter::HashLog(16),
            CParameter::ChainLog(15),
        ],
        _ => Vec::new(),
    }
}

/// Compresses `input` as one frame into `out` and emits it; the buffers are kept for the
/// next frame (the compressed bytes are copied out: a quarter of the input, and no fresh
/// multi-MiB allocation per frame).
fn compress_frame(
    cctx: &mut CCtx<'static>,
    input: &mut Vec<u8>,
    out: &mut Vec<u8>,
    frames: &mut u64,
    emit: &mut Emit<'_>,
) -> Result<()> {
    out.clear();
    cctx.compress2(out, input).map_err(code_error)?;
    input.clear();
    *frames += 1;
    emit(Bytes::copy_from_slice(out))
}

fn emit_out(out: &mut Vec<u8>, emit: &mut Emit<'_>) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let full = std::mem::replace(out, Vec::with_capacity(OUT_SIZE));
    emit(Bytes::from(full))
}

impl Filter for ZstdCompress {
    fn name(&self) -> &'static str {
        "zstd"
    }

    fn process(&mut self, input: Bytes, emit: &mut Emit<'_>) -> Result<()> {
        match &mut self.mode {
            Mode::Frames {
                cctx,
                frame_size,
                input: pending,
                out,
                frames,
            } => {
                let mut rest = &input[..];
                while !rest.is_empty() {
                    let take = (*frame_size - pending.len()).min(rest.len());
                    pending.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if pending.len() == *frame_size {
                        compress_frame(cctx, pending, out, frames, emit)?;
                    }
                }
                Ok(())
            }
            Mode::Streaming { encoder, out } => {
                let mut input = InBuffer::around(&input);
                while input.pos() < input.src.len() {
                    let pos = out.len();
                    let mut output = OutBuffer::around_pos(out, pos);
                    encoder
                        .run(&mut input, &mut output)
                        .map_err(compress_error)?;
                    if out.len() == out.capacity() {
                        emit_out(out, emit)?;
                    }
                }
                // Keep output buffers large: emit only what fills them, the rest at
                // `finish`.
                Ok(())
            }
        }
    }

    fn finish(&mut self, emit: &mut Emit<'_>) -> Result<()> {
        match &mut self.mode {
            Mode::Frames {
                cctx,
                input,
                out,
                frames,
                ..
            } => {
                // An empty input still becomes one (empty) frame: the output is never
                // empty, so a reader can tell it from a lost stream.
                if !input.is_empty() || *frames == 0 {
                    compress_frame(cctx, input, out, frames, emit)?;
                }
                Ok(())
            }
            Mode::Streaming { encoder, out } => loop {
                let pos = out.len();
                let mut output = OutBuffer::around_pos(out, pos);
                let remaining = encoder.finish(&mut output, true).map_err(compress_error)?;
                if out.len() == out.capacity() || remaining == 0 {
                    emit_out(out, emit)?;
                }
                if remaining == 0 {
                    return Ok(());
                }
            },
        }
    }
}

/// Decompresses a zstd stream (one or more frames) with a bounded window.
pub struct ZstdDecompress {
    decoder: Decoder<'static>,
    out: Vec<u8>,
    /// True when the input so far ends exactly at the end of a frame.
    at_frame_end: bool,
    seen_input: bool,
}

impl fmt::Debug for ZstdDecompress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ZstdDecompress")
    }
}

fn decompress_error(e: std::io::Error) -> Error {
    Error::Integrity(format!(
        "zstd decompression failed (window limit 2^{WINDOW_LOG_MAX} bytes): {e}"
    ))
}

impl ZstdDecompress {
    /// A decompressor refusing frames whose window exceeds 2^[`WINDOW_LOG_MAX`] bytes.
    ///
    /// # Errors
    /// When zstd cannot create its context.
    pub fn new() -> Result<Self> {
        let mut decoder = Decoder::new().map_err(decompress_error)?;
        decoder
            .set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
            .map_err(decompress_error)?;
        Ok(Self {
            decoder,
            out: Vec::with_capacity(OUT_SIZE),
            at_frame_end: false,
            seen_input: false,
        })
    }

    /// Runs the decoder over `input` until it is consumed and no output is pending.
    fn drive(&mut self, input: &[u8], emit: &mut Emit<'_>) -> Result<()> {
        let mut input = InBuffer::around(input);
        loop {
            let pos = self.out.len();
            let consumed = input.pos();
            let mut output = OutBuffer::around_pos(&mut self.out, pos);
            let hint = self
                .decoder
                .run(&mut input, &mut output)
                .map_err(decompress_error)?;
            // A call that moved nothing (after a frame ended) answers with the size of the
            // next frame's header, which says nothing about the frame that ended.
            if input.pos() != consumed || self.out.len() != pos {
                self.at_frame_end = hint == 0;
            }
            let full = self.out.len() == self.out.capacity();
            if full || !self.out.is_empty() && input.pos() == input.src.len() {
                let data = std::mem::replace(&mut self.out, Vec::with_capacity(OUT_SIZE));
                emit(Bytes::from(data))?;
            }
            if input.pos() == input.src.len() && !full {
                return Ok(());
            }
        }
    }
}

impl Filter for ZstdDecompress {
    fn name(&self) -> &'static str {
        "unzstd"
    }

    fn process(&mut self, input: Bytes, emit: &mut Emit<'_>) -> Result<()> {
        if !input.is_empty() {
            self.seen_input = true;
        }
        self.drive(&input, emit)
    }

    fn finish(&mut self, emit: &mut Emit<'_>) -> Result<()> {
        self.drive(&[], emit)?;
        if !self.seen_input || !self.at_frame_end {
            return Err(Error::Integrity(
                "the compressed stream is truncated (its last zstd frame is incomplete)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::run;
    use super::*;

    fn dump_like(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0u64;
        while out.len() < n {
            out.extend_from_slice(
                format!(
                    "{i}\t2026-11-21 04:{:02}:00\t{}.{:02}\tcustomer-{}\n",
                    i % 60,
                    i * 7 % 1000,
                    i % 100,
                    i * 31 % 977
                )
                .as_bytes(),
            );
            i += 1;
        }
        out.truncate(n);
        out
    }

    #[test]
    fn compress_then_decompress_returns_the_input_for_any_buffer_sizes() {
        let data = dump_like(3 * 1024 * 1024 + 17);
        for (level, workers) in [(1, 0), (3, 2)] {
            let mut c = ZstdCompress::new(level, workers, 1 << 20).unwrap();
            let packed = run(&mut c, &data, 100_000).unwrap();
            assert!(packed.len() < data.len() / 3);
            let mut d = ZstdDecompress::new().unwrap();
            assert_eq!(run(&mut d, &packed, 1000).unwrap(), data);
        }
    }

    #[test]
    fn an_empty_input_still_becomes_a_frame_that_decompresses_to_nothing() {
        let packed = run(&mut ZstdCompress::new(1, 0, 1 << 20).unwrap(), &[], 1).unwrap();
        assert!(!packed.is_empty());
        let mut d = ZstdDecompress::new().unwrap();
        assert!(run(&mut d, &packed, 1000).unwrap().is_empty());
    }

    #[test]
    fn a_truncated_frame_is_an_integrity_error() {
        let data = dump_like(200_000);
        let packed = run(&mut ZstdCompress::new(3, 0, 1 << 20).unwrap(), &data, 4096).unwrap();
        let cut = &packed[..packed.len() - 5];
        let err = run(&mut ZstdDecompress::new().unwrap(), cut, 4096).unwrap_err();
        assert!(matches!(err, Error::Integrity(_)), "{err}");
    }

    #[test]
    fn a_frame_asking_for_a_window_above_the_bound_is_refused() {
        let mut encoder = Encoder::new(3).unwrap();
        encoder.set_parameter(CParameter::WindowLog(27)).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut packed = Vec::with_capacity(1 << 20);
        let mut input = InBuffer::around(&zeros);
        while input.pos() < zeros.len() {
            let pos = packed.len();
            encoder
                .run(&mut input, &mut OutBuffer::around_pos(&mut packed, pos))
                .unwrap();
        }
        loop {
            let pos = packed.len();
            if encoder
                .finish(&mut OutBuffer::around_pos(&mut packed, pos), true)
                .unwrap()
                == 0
            {
                break;
            }
        }
        let err = run(&mut ZstdDecompress::new().unwrap(), &packed, 4096).unwrap_err();
        assert!(err.to_string().contains("window limit"), "{err}");
    }

    #[test]
    fn a_highly_compressed_bomb_is_emitted_in_bounded_buffers() {
        let zeros = vec![0u8; 64 << 20];
        let packed = run(
            &mut ZstdCompress::new(1, 0, 4 << 20).unwrap(),
            &zeros,
            1 << 20,
        )
        .unwrap();
        assert!(packed.len() < 64 * 1024);
        let mut d = ZstdDecompress::new().unwrap();
        let mut largest = 0;
        let mut total = 0;
        let mut emit = |b: Bytes| {
            largest = largest.max(b.len());
            total += b.len();
            Ok(())
        };
        d.process(Bytes::from(packed), &mut emit).unwrap();
        d.finish(&mut emit).unwrap();
        assert_eq!(total, 64 << 20);
        assert!(largest <= OUT_SIZE);
    }
}
