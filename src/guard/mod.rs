//! Checks made before the backend is contacted (and, for message limits,
//! on every message). Each guard is small and synchronous on the hot path.

pub mod breaker;
pub mod introspect;
pub mod jwt;
pub mod limits;
pub mod origin;
pub mod redis_limits;
