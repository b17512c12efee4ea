//! Printing an error with its causes.
//!
//! Every error type says what failed and keeps its cause as a `source`
//! (never both in its message), so a cause is printed exactly once: by
//! `main` through anyhow's `{:#}`, and in log lines through [`Chain`].

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its sources: `a: b: c`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(Chain(&e).to_string(), "outer: inner");
    }
}
