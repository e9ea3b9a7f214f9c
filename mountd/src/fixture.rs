//! Deterministic guest memory + disk images for tests and benchmarks: the
//! library's one generator ([`ckptfs::synth`]), re-exported under the names
//! mountd's tests and examples use.

pub use ckptfs::synth::{Fixture, Mix, Rng, write_fixture as write};
