//! Entry points shared by the cargo-fuzz targets in `fuzz/` and by the
//! corpus regression test in `tests/`. Each takes arbitrary bytes and must
//! never panic.
