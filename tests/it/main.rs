//! Integration tests: the real proxy on 127.0.0.1:0 in front of real
//! backends, driven by real WebSocket clients and raw sockets. One binary
//! with modules keeps link time down.

mod access;
mod common;
mod compose;
mod compression;
mod core;
mod engine;
mod guards;
mod hmac;
mod identity;
mod integrity;
mod jwt;
mod ops;
mod process;
mod raw;
mod redis;
mod soak;
mod tls;
