//! The five C math functions the binary needs, in pure Rust, so that libm.so is never loaded.
//!
//! Only the metrics exporter's quantile and native-histogram code calls them. Loading libm.so for that
//! runs its IFUNC resolvers at start-up and leaves about half a megabyte of its pages resident in every
//! proxy, which matters for a sidecar whose whole idle footprint should stay under 5 MB. With these
//! definitions in the executable, the linker (`--as-needed`) drops libm. The `libm` crate is the Rust
//! project's port of musl's libm, so results match a C libm to the last bit or within 1 ulp.

#[unsafe(no_mangle)]
extern "C" fn exp(x: f64) -> f64 {
    libm::exp(x)
}

#[unsafe(no_mangle)]
extern "C" fn log(x: f64) -> f64 {
    libm::log(x)
}

#[unsafe(no_mangle)]
extern "C" fn log1p(x: f64) -> f64 {
    libm::log1p(x)
}

#[unsafe(no_mangle)]
extern "C" fn log2(x: f64) -> f64 {
    libm::log2(x)
}

#[unsafe(no_mangle)]
extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}
