//! Per-message cost of HMAC: verify a client message and re-sign it for the
//! next hop, against raw SHA-256 over the same bytes (two HMAC passes are
//! roughly four SHA-256 compressions per block plus a constant).
//!
//! `cargo bench --bench sign`

use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use sha2::Digest;
use wsguard::sign::{self, Direction, Key, MsgType, SeqState};

const SIZES: [usize; 3] = [64, 1024, 64 * 1024];

fn main() {
    divan::main();
}

fn keys() -> (Key, Key) {
    (
        Key::new("c1", vec![1u8; 32]).unwrap(),
        Key::new("p1", vec![2u8; 32]).unwrap(),
    )
}

#[divan::bench(args = SIZES)]
fn verify_and_resign(bencher: Bencher, size: usize) {
    let (client, upstream) = keys();
    let payload = vec![b'x'; size];
    let now = sign::now_ms();
    let msg = sign::sign(
        &client,
        Direction::C2s,
        1,
        now,
        "",
        MsgType::Binary,
        &payload,
    );
    let keys = [client];
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        // A fresh state each time so the seq check passes, as it would for
        // the next message of a connection.
        let mut state = SeqState::default();
        let p = sign::verify(
            &keys,
            Direction::C2s,
            "",
            MsgType::Binary,
            black_box(&msg),
            now,
            30_000,
            &mut state,
        )
        .unwrap();
        black_box(sign::sign(
            &upstream,
            Direction::C2s,
            1,
            now,
            "",
            MsgType::Binary,
            p,
        ))
    });
}

#[divan::bench(args = SIZES)]
fn sha256_once(bencher: Bencher, size: usize) {
    let payload = vec![b'x'; size];
    bencher
        .counter(BytesCount::new(size))
        .bench_local(|| black_box(sha2::Sha256::digest(black_box(&payload))));
}

#[divan::bench(args = SIZES)]
fn sha256_twice(bencher: Bencher, size: usize) {
    let payload = vec![b'x'; size];
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        black_box(sha2::Sha256::digest(black_box(&payload)));
        black_box(sha2::Sha256::digest(black_box(&payload)))
    });
}
