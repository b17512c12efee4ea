//! A device with a simulated volatile write cache, for crash testing
//! (stub: see the crash-model work).
