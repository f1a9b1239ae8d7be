//! Decoding benchmark (filled in below).
fn main() {}
