//! Benchmark placeholder (vhost).

fn main() {}
