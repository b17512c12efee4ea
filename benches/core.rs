//! Benchmark placeholder (core).

fn main() {}
