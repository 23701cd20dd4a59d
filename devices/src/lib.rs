//! ftvmm devices.
