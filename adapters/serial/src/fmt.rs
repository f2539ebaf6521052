//! Logging that costs nothing unless the `defmt` feature is on.
//!
//! `debug!` and `warn!` are textually scoped (`#[macro_use]` on this module, declared first in
//! lib.rs): a `use` of a macro named `warn` would clash with the built-in attribute.

#[cfg(feature = "defmt")]
macro_rules! warn {
    ($($arg:tt)*) => { defmt::warn!($($arg)*) };
}
#[cfg(not(feature = "defmt"))]
macro_rules! warn {
    ($($arg:tt)*) => {{}};
}

#[cfg(feature = "defmt")]
macro_rules! debug {
    ($($arg:tt)*) => { defmt::debug!($($arg)*) };
}
#[cfg(not(feature = "defmt"))]
macro_rules! debug {
    ($($arg:tt)*) => {{}};
}
