//! The error type every body carries. A leaf: it imports nothing from the crate, so `body` and
//! `cache::fill` both use it without importing each other for it.

/// The error type carried by every body in the proxy, the cache's fills and the admin port.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(test)]
mod tests {
    /// Nothing below this module: a `use crate::` here would put it back into a circle.
    #[test]
    fn error_is_a_leaf() {
        let text = include_str!("error.rs");
        let imports: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("use crate::") || l.starts_with("pub use crate::"))
            .collect();
        assert_eq!(imports, Vec::<&str>::new());
    }
}
