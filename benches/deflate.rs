//! permessage-deflate cost per message: flate2's zlib-rs backend (what
//! wsguard builds with) against miniz_oxide (flate2's default backend,
//! called directly here since one build has one flate2 backend), on
//! JSON-like 2 KiB and 16 KiB messages, each compressed or inflated as one
//! message without context takeover (the state is reset per message, as
//! the per-thread pool does).
//!
//! `cargo bench --bench deflate`
//!
//! The compressed sizes per backend and level are printed first (stderr).

use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use miniz_oxide::deflate::core::{create_comp_flags_from_zip_params, CompressorOxide};
use miniz_oxide::inflate::stream::InflateState;
use miniz_oxide::{DataFormat, MZFlush};
use wsguard::compression::{Deflater, InflateBudget, Inflated, Inflater};

const SIZES: [usize; 2] = [2 * 1024, 16 * 1024];
const LEVELS: [u32; 3] = [1, 3, 6];

fn main() {
    for size in SIZES {
        let data = json_like(size);
        for level in LEVELS {
            eprintln!(
                "{size} B JSON, level {level}: zlib-rs {} B, miniz_oxide {} B",
                zlib_rs_deflate(&mut zlib_rs_compressor(level), &data, &mut Vec::new()),
                miniz_deflate(&mut miniz_compressor(level), &data, &mut vec![0; size * 2])
            );
        }
    }
    divan::main();
}

/// Market-data-like JSON: repeated keys, varying numbers (a fixed LCG, so
/// every run compresses the same bytes).
fn json_like(n: usize) -> Vec<u8> {
    let mut s = String::from("[");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let syms = ["BTC-USD", "ETH-USD", "SOL-USD", "AAPL", "MSFT", "EUR-USD"];
    while s.len() < n {
        let sym = syms[(next() % syms.len() as u64) as usize];
        s.push_str(&format!(
            "{{\"type\":\"trade\",\"symbol\":\"{sym}\",\"price\":{}.{:04},\"size\":{},\"side\":\"{}\",\"ts\":{},\"id\":{}}},",
            next() % 70_000,
            next() % 10_000,
            next() % 5_000,
            if next() % 2 == 0 { "buy" } else { "sell" },
            1_700_000_000_000u64 + next() % 1_000_000,
            next()
        ));
    }
    s.truncate(n);
    s.into_bytes()
}

fn zlib_rs_compressor(level: u32) -> Compress {
    Compress::new_with_window_bits(Compression::new(level), false, 15)
}

/// One message, sync-flushed; returns the compressed length (tail included).
fn zlib_rs_deflate(c: &mut Compress, data: &[u8], out: &mut Vec<u8>) -> usize {
    c.reset();
    out.clear();
    out.reserve(data.len() + 64);
    c.compress_vec(data, out, FlushCompress::Sync).unwrap();
    out.len()
}

fn miniz_compressor(level: u32) -> Box<CompressorOxide> {
    Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(
        level as i32,
        -15,
        0,
    )))
}

fn miniz_deflate(c: &mut CompressorOxide, data: &[u8], out: &mut [u8]) -> usize {
    c.reset();
    let r = miniz_oxide::deflate::stream::deflate(c, data, out, MZFlush::Sync);
    r.status.unwrap();
    assert_eq!(r.bytes_consumed, data.len());
    r.bytes_written
}

#[divan::bench(args = SIZES, consts = LEVELS)]
fn deflate_zlib_rs<const LEVEL: u32>(bencher: Bencher, size: usize) {
    let data = json_like(size);
    let mut c = zlib_rs_compressor(LEVEL);
    let mut out = Vec::new();
    bencher
        .counter(BytesCount::new(size))
        .bench_local(|| zlib_rs_deflate(&mut c, black_box(&data), &mut out));
}

#[divan::bench(args = SIZES, consts = LEVELS)]
fn deflate_miniz<const LEVEL: u32>(bencher: Bencher, size: usize) {
    let data = json_like(size);
    let mut c = miniz_compressor(LEVEL);
    let mut out = vec![0; size * 2];
    bencher
        .counter(BytesCount::new(size))
        .bench_local(|| miniz_deflate(&mut c, black_box(&data), &mut out));
}

/// wsguard's own path: pooled state, tail stripped, output appended.
#[divan::bench(args = SIZES)]
fn deflate_wsguard(bencher: Bencher, size: usize) {
    let data = json_like(size);
    let mut d = Deflater::new(15, false).unwrap();
    let mut out = Vec::new();
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        out.clear();
        d.deflate(black_box(&data), true, &mut out).unwrap();
        out.len()
    });
}

/// The message compressed once at level 6 with its tail, the input every
/// inflate bench reads.
fn compressed(size: usize) -> (Vec<u8>, Vec<u8>) {
    let data = json_like(size);
    let mut z = Vec::new();
    zlib_rs_deflate(&mut zlib_rs_compressor(6), &data, &mut z);
    (data, z)
}

#[divan::bench(args = SIZES)]
fn inflate_zlib_rs(bencher: Bencher, size: usize) {
    let (data, z) = compressed(size);
    let mut d = Decompress::new_with_window_bits(false, 15);
    let mut out = vec![0; size + 1];
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        d.reset(false);
        d.decompress(black_box(&z), &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(d.total_out() as usize, data.len());
    });
}

#[divan::bench(args = SIZES)]
fn inflate_miniz(bencher: Bencher, size: usize) {
    let (data, z) = compressed(size);
    let mut st = InflateState::new_boxed(DataFormat::Raw);
    let mut out = vec![0; size + 1];
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        st.reset(DataFormat::Raw);
        let r =
            miniz_oxide::inflate::stream::inflate(&mut st, black_box(&z), &mut out, MZFlush::Sync);
        r.status.unwrap();
        assert_eq!(r.bytes_written, data.len());
    });
}

/// wsguard's own path: pooled state, tail appended, output buffer grown
/// under the cap and charged to the budget, allocated per message.
#[divan::bench(args = SIZES)]
fn inflate_wsguard(bencher: Bencher, size: usize) {
    let (data, mut z) = compressed(size);
    z.truncate(z.len() - 4);
    let budget = InflateBudget::new(1 << 30);
    let mut inf = Inflater::new(15, false);
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        let mut out = Inflated::new(&budget);
        inf.inflate_into(black_box(&z), true, 1 << 20, &mut out)
            .unwrap();
        assert_eq!(out.len(), data.len());
        out
    });
}
